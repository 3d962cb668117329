"""Segment attention's kernels side by side on one POLAR-shaped row: the same backbone forward through each.

A row of ``--groups`` (prompt + reference) prefixes of ``--prefix`` tokens, each with G branches of 32-512 tokens,
through a random reward model's backbone; each kernel runs it on the same row, inference and (where the kernel has
gradients) forward + backward. The first call is timed apart (it compiles the flex kernel), then the best of
``--repeats``. The last line printed is one JSON object.

    python benchmarks/bench_kernels.py                                      # CPU: split, buckets, flex
    python benchmarks/bench_kernels.py --device cuda --dtype bf16 --hidden 2048 --layers 24 --heads 16 \\
        --kv-heads 8 --intermediate 8192                                    # CUDA: flex, buckets
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_mfu import device_name  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--groups", type=int, default=4, help="prefixes in the row")
    p.add_argument("--G", type=int, default=8, help="branches per prefix")
    p.add_argument("--prefix", type=int, default=780, help="prefix tokens (prompt ~256 + reference ~512 + markers)")
    p.add_argument("--min-completion", type=int, default=32)
    p.add_argument("--max-completion", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None):
    from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward
    from trl_polar.tiny import build_tiny_reward_model, build_tiny_tokenizer

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_tiny_reward_model(
        build_tiny_tokenizer(),
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192,
    ).to(device, dtype)
    rng = random.Random(args.seed)
    segments, length = [], 0
    for _ in range(args.groups):
        context = length
        segments.append(Segment(length, args.prefix))
        length += args.prefix
        for _ in range(args.G):
            n = rng.randint(args.min_completion, args.max_completion)
            segments.append(Segment(length, n, context, args.prefix))
            length += n
    ids = torch.randint(3, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).to(device)
    kernels = ["flex", "buckets"] if device.type == "cuda" else ["split", "buckets", "flex"]
    # Compiled flex has no backward on CPU (torch 2.13): CPU training runs the buckets only.
    trains = ["flex", "buckets"] if device.type == "cuda" else ["buckets"]
    result = {"device": device_name(device), "dtype": args.dtype, "row_tokens": length, "kernels": {}}
    runs = {}
    for kernel in kernels:

        def infer(kernel=kernel):
            with torch.inference_mode():
                return segment_forward(model.model, ids, SegmentLayout(segments, device, kernel=kernel))

        def train(kernel=kernel):
            hidden = segment_forward(model.model, ids, SegmentLayout(segments, device, kernel=kernel))
            hidden.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)

        runs[f"{kernel} inference"] = infer
        if kernel in trains:
            runs[f"{kernel} train"] = train
    # First calls apart (compilation), then rounds that run every kernel in turn, so that a slow spell of the
    # machine hits them alike.
    first, best, outputs = {}, dict.fromkeys(runs, float("inf")), {}
    for name, fn in runs.items():
        first[name], outputs[name] = _time(fn, device)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], _time(fn, device)[0])
    reference = outputs[f"{kernels[0]} inference"].float()
    for name in runs:
        entry = {"first_s": round(first[name], 4), "best_s": round(best[name], 4)}
        if name.endswith("inference"):
            entry["max_abs_diff"] = (outputs[name].float() - reference).abs().max().item()
        result["kernels"][name] = entry
        print(f"{name:<20} first {first[name]:8.3f} s   best {best[name]:8.3f} s", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
