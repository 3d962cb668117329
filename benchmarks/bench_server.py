"""Reward-server throughput and latency: `trl-polar serve` under concurrent clients vs in-process PolarScorer.

The same items (GRPO-like groups: G completions per (prompt, reference)) are scored

- in-process: one `PolarScorer.score` call over all items (the best a single process does with the model);
- through the server: a real ``python -m trl_polar.cli serve`` subprocess on 127.0.0.1, ``--clients`` concurrent
  clients, each request one group of ``--items-per-request`` items, over real HTTP.

Reported: ``fraction_of_inprocess`` = server items/s at full load / in-process items/s (target >= 0.8), p50/p99
request latency at half and full load, and a long run (``--long-requests`` requests from ``--long-clients``
clients) that checks every request is answered exactly once (``lost``, ``duplicated``, ``mismatched``).
The model is randomly initialised and built offline (speed does not depend on the weights). The last line printed
is one JSON object.

    python benchmarks/bench_server.py                                   # the full run: 10,000 requests, 64 clients
    python benchmarks/bench_server.py --long-requests 1000 --rounds 2   # a smaller CPU run
    python benchmarks/bench_server.py --hidden 1024 --layers 12 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from bench_model import add_model_args, build_model  # noqa: E402
from serving_helpers import RawHTTP  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--groups", type=int, default=32, help="(prompt, reference) groups in the item set")
    p.add_argument("--G", type=int, default=8, help="completions per group")
    p.add_argument("--items-per-request", type=int, default=8, help="items per HTTP request (a group by default)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--reference-tokens", type=int, default=64)
    p.add_argument("--min-completion", type=int, default=16)
    p.add_argument("--max-completion", type=int, default=64)
    p.add_argument("--clients", type=int, default=32, help="concurrent clients at full load")
    p.add_argument("--rounds", type=int, default=3, help="passes over the item set per load level")
    p.add_argument("--long-requests", type=int, default=10000)
    p.add_argument("--long-clients", type=int, default=64)
    p.add_argument("--long-items-per-request", type=int, default=1, help="small requests: the most HTTP per item")
    p.add_argument("--budget", type=int, default=16384, help="max_tokens_per_batch (both sides)")
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_items(tokenizer, args):
    """Texts of about the requested token lengths, from random ids of the tokenizer's ordinary vocabulary."""
    rng = random.Random(args.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def text(n):
        ids = tokenizer.encode(tokenizer.decode([rng.choice(vocab) for _ in range(n)]), add_special_tokens=False)
        return tokenizer.decode(ids[:n])

    items = []
    for _ in range(args.groups):
        prompt, reference = text(args.prompt_tokens), text(args.reference_tokens)
        items += [
            (prompt, reference, text(rng.randint(args.min_completion, args.max_completion))) for _ in range(args.G)
        ]
    return items


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir):
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "trl_polar.cli",
        "serve",
        "--model",
        model_dir,
        "--port",
        str(port),
        "--device",
        args.device,
    ]
    cmd += ["--max-tokens-per-batch", str(args.budget)]
    cmd += ["--batch-window-ms", str(args.batch_window_ms), "--max-queue", "100000", "--log-level", "warning"]
    if args.dtype == "bf16":
        cmd += ["--dtype", "bf16"]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def load(url, requests, clients):
    """Send ``requests`` [(id, items)] from ``clients`` concurrent clients; return answers, latencies, seconds.

    Clients speak HTTP/1.1 through `RawHTTP` (tests/serving_helpers.py) rather than httpx: on a small shared machine
    httpx's per-request CPU would be taken from the server being measured.
    """
    host, port = url.rsplit("//", 1)[1].split(":")
    todo = iter(requests)
    answers: dict[int, list] = {}
    latencies: list[float] = []
    errors: list[str] = []

    async def client():
        http = RawHTTP(host, int(port))
        for rid, items in todo:
            body = {"id": rid, "items": [{"prompt": p, "reference": r, "candidate": c} for p, r, c in items]}
            started = time.perf_counter()
            try:
                status, payload = await http.post("/score", json.dumps(body).encode())
            except (OSError, asyncio.IncompleteReadError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                await http.close()
                continue
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(f"HTTP {status}: {payload[:200]!r}")
                continue
            answer = json.loads(payload)
            answers.setdefault(answer.get("id"), []).append(answer["scores"])
        await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return answers, latencies, time.perf_counter() - started, errors


def requests_for(items, per_request, n_requests, start_id=0):
    chunks = [items[i : i + per_request] for i in range(0, len(items), per_request)]
    return [(start_id + k, chunks[k % len(chunks)]) for k in range(n_requests)]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def check(answers, requests, expected_of):
    """Lost, duplicated and mismatched requests: every id answered once, with the scores of its own items."""
    lost = sum(1 for rid, _ in requests if rid not in answers)
    duplicated = sum(len(v) - 1 for v in answers.values() if len(v) > 1)
    mismatched = 0
    for rid, items in requests:
        for scores in answers.get(rid, [])[:1]:
            if len(scores) != len(items) or any(abs(s - expected_of[it]) > 1e-4 for s, it in zip(scores, items)):
                mismatched += 1
    unknown = sum(1 for rid in answers if rid not in {r for r, _ in requests})
    return lost, duplicated, mismatched, unknown


def main(argv=None):
    args = parse_args(argv)
    import torch

    from trl_polar.scorer import PolarScorer

    torch.manual_seed(args.seed)
    workdir = tempfile.mkdtemp(prefix="bench_server_")
    model_dir = os.path.join(workdir, "rm")
    build_model(args, model_dir)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    scorer = PolarScorer(model_dir, max_tokens_per_batch=args.budget, device=args.device, dtype=dtype)
    items = make_items(scorer.template.tokenizer, args)
    prompts, references, candidates = (list(x) for x in zip(*items))
    tokens = sum(len(x) for x in scorer.encode(prompts, references, candidates))
    print(f"{len(items)} items, {tokens} tokens, {args.groups} groups of {args.G}", flush=True)

    proc, url = start_server(args, model_dir)
    result = {}
    try:
        # Warm-up both sides: allocator, tokenizer caches, connections.
        expected = scorer.score(prompts, references, candidates)
        expected_of = dict(zip(items, expected))
        per_round = -(-len(items) // args.items_per_request)
        asyncio.run(load(url, requests_for(items, args.items_per_request, per_round), args.clients))

        # Rounds alternate in-process and server passes over the same items, so that a shared machine's changing
        # load hits both alike; each side reports its best round. The idle server uses no CPU meanwhile.
        inprocess_times, rounds = [], {"half": [], "full": []}
        levels = {"half": max(1, args.clients // 2), "full": args.clients}
        for _ in range(args.rounds):
            started = time.perf_counter()
            scorer.score(prompts, references, candidates)
            inprocess_times.append(time.perf_counter() - started)
            for name, clients in levels.items():
                reqs = requests_for(items, args.items_per_request, per_round)
                answers, latencies, seconds, errors = asyncio.run(load(url, reqs, clients))
                lost, duplicated, mismatched, _ = check(answers, reqs, expected_of)
                rounds[name].append((seconds, latencies, errors, lost, duplicated, mismatched))
        inprocess = len(items) / min(inprocess_times)
        print(f"in-process: {inprocess:.1f} items/s (best of {args.rounds})", flush=True)
        summary = {}
        for name, clients in levels.items():
            runs = rounds[name]
            latencies = [x for run in runs for x in run[1]]
            summary[name] = {
                "clients": clients,
                "requests": per_round * len(runs),
                "items_per_s": len(items) / min(run[0] for run in runs),
                "p50_ms": 1000 * percentile(latencies, 0.50),
                "p99_ms": 1000 * percentile(latencies, 0.99),
                "errors": sum(len(run[2]) for run in runs),
                "lost": sum(run[3] for run in runs),
                "duplicated": sum(run[4] for run in runs),
                "mismatched": sum(run[5] for run in runs),
            }
            print(f"{name} load ({clients} clients): {json.dumps(summary[name])}", flush=True)
        levels = summary
        reqs = requests_for(items, args.long_items_per_request, args.long_requests, start_id=10**9)
        answers, latencies, seconds, errors = asyncio.run(load(url, reqs, args.long_clients))
        lost, duplicated, mismatched, unknown = check(answers, reqs, expected_of)
        long_run = {
            "clients": args.long_clients,
            "requests": len(reqs),
            "seconds": seconds,
            "requests_per_s": len(reqs) / seconds,
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "errors": len(errors),
            "first_errors": errors[:3],
            "lost": lost,
            "duplicated": duplicated,
            "mismatched": mismatched,
            "unknown": unknown,
        }
        print(f"long run: {json.dumps(long_run)}", flush=True)
        import httpx

        metrics = httpx.get(url + "/metrics", timeout=10).text
        batches = [line for line in metrics.splitlines() if line.startswith(("polar_batches_total", "polar_scoring"))]
        result = {
            "fraction_of_inprocess": levels["full"]["items_per_s"] / inprocess,
            "inprocess_items_per_s": inprocess,
            "server_items_per_s": levels["full"]["items_per_s"],
            "inprocess_rounds_items_per_s": [round(len(items) / t, 2) for t in inprocess_times],
            "server_full_rounds_items_per_s": [round(len(items) / run[0], 2) for run in rounds["full"]],
            "half_load": levels["half"],
            "full_load": levels["full"],
            "long_run": long_run,
            "requests": len(reqs),
            "lost": lost,
            "duplicated": duplicated,
            "mismatched": mismatched,
            "server_metrics": batches,
            "device": args.device,
            "model": {"hidden": args.hidden, "layers": args.layers, "arch": args.arch},
            "items": len(items),
            "items_per_request": args.items_per_request,
            "torch_threads": torch.get_num_threads(),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
