"""Scoring throughput and memory: naive POLAR scoring vs TRL's reward-model path vs PolarScorer vs the limit.

G completions per prompt, a ~256-token prompt, a ~512-token reference and completions of 32-512 tokens; a
randomly initialised reward model (speed does not depend on the weights), built offline.

- naive:   the full sequences, right-padded, ``--naive-batch`` per forward in input order, read at the reward token
           (what the official client's text + a transformers forward do);
- trl:     TRL GRPO's reward-model path: prompt + completion only (no reference: a speed reference, not POLAR),
           padded, one forward per ``--naive-batch`` completions, ``logits[:, 0]``;
- polar:   PolarScorer (token-budgeted unpadded rows, each shared prefix once, segment attention);
- limit:   a forward over the unique tokens only: PolarScorer's rows, but every completion runs as a sequence of its
           own, without attending to its prefix. No exact method reaches it: the gap is that attention.
- one sequence per group (forward only): the unique tokens of a group as one causal sequence through the model's own
           attention (prefix, then the completions back to back), the literal reading of "a forward over the unique
           tokens"; its completions attend to more than they need, so an exact scorer can beat it.

Peak memory is measured in fresh subprocesses (CUDA: max allocated; CPU: sampled RSS growth) while scoring
``--memory-completions`` completions. The last line printed is one JSON object.

    python benchmarks/bench_score.py                       # CPU defaults, a few minutes on 2 cores
    python benchmarks/bench_score.py --hidden 1024 --layers 12 --prompts 16 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_mfu import attention_pairs, device_name, device_peaks, mfu, model_flops  # noqa: E402
from bench_model import add_model_args, build_model, shapes, use_kernel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=4, help="prompts in the speed run")
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--reference-tokens", type=int, default=512)
    p.add_argument("--min-completion", type=int, default=32)
    p.add_argument("--max-completion", type=int, default=512)
    p.add_argument("--budget", type=int, default=32768, help="PolarScorer max_tokens_per_batch")
    p.add_argument("--naive-batch", type=int, default=16, help="sequences per naive / TRL forward")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every method once)")
    p.add_argument("--memory-completions", type=int, default=1024)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------- setup
def load(args, model_dir):
    from trl_polar.scorer import PolarScorer

    use_kernel(args)
    return PolarScorer(model_dir, max_tokens_per_batch=args.budget, device=args.device, dtype=args.dtype)


def make_items(tokenizer, n_prompts, args, seed):
    """Texts of about the requested token lengths, from random ids of the tokenizer's ordinary vocabulary."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]

    def text(n_tokens):
        # Decoded random ids re-tokenize differently; trim the re-tokenized ids so the part has n_tokens tokens.
        ids = tokenizer.encode(
            tokenizer.decode([rng.choice(vocab) for _ in range(n_tokens)]), add_special_tokens=False
        )
        return tokenizer.decode(ids[:n_tokens])

    prompts, references, candidates = [], [], []
    for _ in range(n_prompts):
        prompt, reference = text(args.prompt_tokens), text(args.reference_tokens)
        for _ in range(args.G):
            prompts.append(prompt)
            references.append(reference)
            candidates.append(text(rng.randint(args.min_completion, args.max_completion)))
    return prompts, references, candidates


# ------------------------------------------------------------------------------------------------------- methods
def _padded(ids_list, pad, device):
    longest = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, x in enumerate(ids_list):
        ids[j, : len(x)] = torch.tensor(x)
        mask[j, : len(x)] = 1
    return ids.to(device), mask.to(device)


def naive(scorer, prompts, references, candidates, batch):
    """Full POLAR sequences, encoded one by one as the official client does, then `naive_forward`."""
    template = scorer.template
    ids = [template.encode(p, r, c) for p, r, c in zip(prompts, references, candidates, strict=True)]
    return naive_forward(scorer, ids, batch)


def naive_forward(scorer, ids, batch):
    """Right-padded, in input order, `batch` sequences per forward; the model pools the reward token itself."""
    model = scorer.model
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), batch):
            input_ids, mask = _padded(ids[s : s + batch], scorer.pad_token_id, scorer.device)
            out.extend(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist())
    return out


def trl_path(scorer, prompts, candidates, batch):
    """TRL GRPO's reward-model scoring: prompt + completion text, padded right, one forward per call."""
    tokenizer, model = scorer.template.tokenizer, scorer.model
    texts = [p + c for p, c in zip(prompts, candidates, strict=True)]
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            enc = tokenizer(
                texts[s : s + batch], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
            ).to(scorer.device)
            out.extend(model(**enc).logits[:, 0].float().tolist())
    return out


def limit(scorer, prompts, references, candidates):
    """Unique tokens only: each prefix once, each completion's own tokens without attention to the prefix."""
    ids = scorer.encode(prompts, references, candidates)
    limit_forward(scorer, ids, list(zip(prompts, references, strict=True)))


def limit_forward(scorer, ids, keys):
    """PolarScorer's rows with every segment attending to itself only: each prefix once, each completion's own
    tokens as a sequence of their own. Every unique token runs once, unpadded; what is left out is the completions'
    attention to their prefix, which exact scoring cannot skip."""
    from trl_polar.packing import lay_out
    from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward

    with torch.inference_mode():
        for mb in scorer.plan(ids, keys):
            row = lay_out(ids, mb.units)
            alone = SegmentLayout([Segment(s.start, s.length) for s in row.segments], scorer.device)
            segment_forward(scorer._backbone, torch.tensor(row.input_ids, device=scorer.device), alone)


def one_sequence_forward(scorer, ids, keys, budget):
    """The unique tokens of each group as ONE causal sequence (prefix, then the completions back to back) through
    the model's own attention, right-padded and batched under ``budget`` tokens: the literal "forward over the unique
    tokens", in which every completion also attends to the completions before it."""
    groups = {}
    for seq, key in zip(ids, keys, strict=True):
        groups.setdefault(key, []).append(seq)
    sequences = []
    from trl_polar.packing import shared_prefix_length

    for seqs in groups.values():
        prefix = shared_prefix_length(seqs) if len(seqs) > 1 else 0
        sequences.append(list(seqs[0][:prefix]) + [t for x in seqs for t in x[prefix:]])
    sequences.sort(key=len, reverse=True)
    with torch.inference_mode():
        start = 0
        while start < len(sequences):
            stop = start + max(1, budget // len(sequences[start]))
            input_ids, _ = _padded(sequences[start:stop], scorer.pad_token_id, scorer.device)
            scorer._backbone(input_ids=input_ids, use_cache=False)
            start = stop


def unique_work(ids, keys):
    """Tokens left once every (prompt, reference) group's common prefix is counted once, and the query-key pairs
    those tokens need (each sees its prefix and causally itself): the useful work MFU counts."""
    from trl_polar.packing import group_units, lay_out

    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    tokens = pairs = 0
    for members in groups.values():
        row = lay_out(ids, group_units(ids, members))
        tokens += len(row)
        pairs += attention_pairs((s.start, s.length, s.context_start, s.context_length) for s in row.segments)
    return tokens, pairs


def timed(fns, repeats):
    """Best time and last result of each function. Every round runs all of them in turn, so that a slow spell of the
    machine hits every method alike instead of whichever ran during it."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, tokenizer caches
    best = dict.fromkeys(fns, float("inf"))
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


# ------------------------------------------------------------------------------------------------------- memory
def _rss_bytes():
    """Current resident memory (Linux /proc; elsewhere the lifetime peak, a weaker measure)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    """Highest resident memory seen while scoring: the lifetime peak would include model loading."""

    def __init__(self, every_s=0.002):
        import threading

        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s):
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self):
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


def _memory_worker(method, args, model_dir, queue):
    torch.manual_seed(0)
    scorer = load(args, model_dir)
    n_prompts = max(1, args.memory_completions // args.G)
    prompts, references, candidates = make_items(scorer.template.tokenizer, n_prompts, args, args.seed + 1)
    # Encode first (template caches and ids are not what is measured), then the forwards.
    scorer.encode(prompts, references, candidates)
    cuda = scorer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        sampler = _RssSampler()
    if method == "naive":
        naive(scorer, prompts, references, candidates, args.naive_batch)
    else:
        scorer.score(prompts, references, candidates)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    queue.put((len(candidates), max(0, peak - before)))


def peak_memory(method, args, model_dir):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(method, args, model_dir, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(args, model_dir)
        scorer = load(args, model_dir)
        params = sum(p.numel() for p in scorer.model.parameters())
        prompts, references, candidates = make_items(scorer.template.tokenizer, args.prompts, args, args.seed)
        ids = scorer.encode(prompts, references, candidates)
        n = len(candidates)
        total_tokens = sum(len(x) for x in ids)
        unique_tokens, unique_pairs = unique_work(ids, list(zip(prompts, references, strict=True)))
        config = scorer.model.config
        useful_flops = model_flops(config, unique_tokens, unique_pairs)
        gpu, peaks = device_name(scorer.device), device_peaks(scorer.device)
        peak, measured = peaks["datasheet"], peaks["measured_matmul"]
        print(
            f"model: {args.arch} {params / 1e6:.1f}M params, device {scorer.device}, {args.dtype}; "
            f"{args.prompts} prompts x G={args.G}: {n} completions, {total_tokens} tokens "
            f"(mean sequence {total_tokens / n:.0f}; {unique_tokens} unique); torch threads {torch.get_num_threads()}",
            flush=True,
        )
        keys = list(zip(prompts, references, strict=True))
        # The first call pays for settling the path and, on CUDA, for compiling the flex kernel.
        start = time.perf_counter()
        scorer.score_ids(ids, keys)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        first_call = time.perf_counter() - start
        times, results = timed(
            {
                "naive": lambda: naive(scorer, prompts, references, candidates, args.naive_batch),
                "trl": lambda: trl_path(scorer, prompts, candidates, args.naive_batch),
                "polar": lambda: scorer.score(prompts, references, candidates),
                "limit": lambda: limit(scorer, prompts, references, candidates),
                "encode": lambda: scorer.encode(prompts, references, candidates),
                "f_naive": lambda: naive_forward(scorer, ids, args.naive_batch),
                "f_polar": lambda: scorer.score_ids(ids, keys),
                "f_limit": lambda: limit_forward(scorer, ids, keys),
                "f_one": lambda: one_sequence_forward(scorer, ids, keys, args.budget),
            },
            args.repeats,
        )
        t_naive, t_trl, t_polar, t_limit, t_encode = (times[k] for k in ("naive", "trl", "polar", "limit", "encode"))
        f_naive, f_polar, f_limit, f_one = (times[k] for k in ("f_naive", "f_polar", "f_limit", "f_one"))
        s_naive, s_polar = results["naive"], results["polar"]
        max_diff = max(abs(a - b) for a, b in zip(s_naive, s_polar, strict=True))
        rows = [
            ("naive", t_naive, f_naive),
            ("trl (no reference)", t_trl, None),
            ("PolarScorer", t_polar, f_polar),
            ("limit", t_limit, f_limit),
            ("unique tokens, one sequence per group", None, f_one),
        ]
        print(f"{'method':<38} {'seconds':>9} {'completions/s':>14} {'vs naive':>9} {'forward s':>10} {'vs naive':>9}")
        for name, t, f in rows:
            end = f"{t:9.3f} {n / t:14.1f} {t_naive / t:8.2f}x" if t is not None else f"{'-':>9} {'-':>14} {'-':>9}"
            fwd = f"{f:10.3f} {f_naive / f:8.2f}x" if f is not None else f"{'-':>10} {'-':>9}"
            print(f"{name:<38} {end} {fwd}")
        print(f"PolarScorer tokenization alone: {t_encode:.3f} s ({scorer.encode_workers} threads)")
        print(f"max |naive - PolarScorer| = {max_diff:.2e}", flush=True)
        timings = {"polar": t_polar, "polar_forward": f_polar, "naive_forward": f_naive, "limit_forward": f_limit}
        utilisation = {name: mfu(useful_flops, t, peak) for name, t in timings.items()}
        measured_utilisation = {name: mfu(useful_flops, t, measured) for name, t in timings.items()}
        print(
            f"{gpu}: {useful_flops / 1e12:.2f} TFLOP of unique-token model work; MFU {utilisation} "
            f"(peak {peak / 1e12 if peak else None} TFLOP/s bf16 data sheet, "
            f"{measured / 1e12 if measured else None} measured); first call {first_call:.2f} s "
            f"(best {f_polar:.2f} s)",
            flush=True,
        )
        result = {
            "speedup_vs_naive": round(t_naive / t_polar, 3),
            "fraction_of_limit": round(t_limit / t_polar, 3),
            "speedup_vs_trl_path": round(t_trl / t_polar, 3),
            "forward_speedup_vs_naive": round(f_naive / f_polar, 3),
            "forward_fraction_of_limit": round(f_limit / f_polar, 3),
            "forward_fraction_of_one_sequence_limit": round(f_one / f_polar, 3),
            "encode_seconds": round(t_encode, 4),
            "completions_per_s": {
                "naive": round(n / t_naive, 2),
                "trl": round(n / t_trl, 2),
                "polar": round(n / t_polar, 2),
                "limit": round(n / t_limit, 2),
            },
            "max_abs_diff_vs_naive": max_diff,
            "completions": n,
            "tokens": total_tokens,
            "unique_tokens": unique_tokens,
            "params_millions": round(params / 1e6, 2),
            "device": str(scorer.device),
            "gpu": gpu,
            "dtype": args.dtype,
            "mfu": utilisation,
            "mfu_measured_peak": measured_utilisation,
            "peak_tflops": peak / 1e12 if peak else None,
            "measured_peak_tflops": round(measured / 1e12, 1) if measured else None,
            "unique_tflop": float(f"{useful_flops / 1e12:.6g}"),
            "first_call_seconds": round(first_call, 3),
            "compile_seconds": round(max(0.0, first_call - f_polar), 3),
            "kernel": args.kernel,
            "shapes": {
                **shapes(args, config),
                "prompts": args.prompts,
                "G": args.G,
                "prompt_tokens": args.prompt_tokens,
                "reference_tokens": args.reference_tokens,
                "completion_tokens": [args.min_completion, args.max_completion],
                "budget": args.budget,
            },
        }
        if not args.skip_memory:
            del scorer
            m_polar_n, m_polar = peak_memory("polar", args, model_dir)
            m_naive_n, m_naive = peak_memory("naive", args, model_dir)
            print(
                f"peak memory scoring {m_polar_n} completions: PolarScorer (budget {args.budget} tokens) "
                f"{m_polar / 2**20:.0f} MiB, naive ({args.naive_batch} per forward) {m_naive / 2**20:.0f} MiB",
                flush=True,
            )
            result.update(
                peak_memory_vs_naive=round(m_polar / max(m_naive, 1), 3),
                peak_memory_mib={"polar": round(m_polar / 2**20, 1), "naive": round(m_naive / 2**20, 1)},
                memory_completions=m_polar_n,
            )
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
