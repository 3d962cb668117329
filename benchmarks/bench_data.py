"""Triples per second of policy-pool synthesis: the batched transformers backend against a plain loop.

The plain loop is what one writes without this library: for each prompt, three separate ``generate`` calls on one
prompt each (A twice, B once). The batched backend groups each policy's requests of a shard and generates them
``batch_size`` at a time. Both use the same policies, prompts and sampling settings; model loading is excluded
(every model is loaded and warmed up before timing).

    python benchmarks/bench_data.py                          # tiny random policies, CPU
    python benchmarks/bench_data.py --policies a=Qwen/Qwen2.5-0.5B:base --policies b=...  # real policies
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def plain_loop(prompts, backend, policies, sampling, seed):
    """One prompt at a time, three generate calls per prompt, no batching (the baseline)."""
    import torch

    triples = 0
    for row in prompts:
        a, b = random.Random(f"{seed}/pair/{row['prompt_id']}").sample(policies, 2)
        for policy in (a, a, b):
            model, tokenizer = backend._load(policy)
            ids = tokenizer(row["prompt"], return_tensors="pt").to(backend.device)
            with torch.no_grad():
                model.generate(
                    **ids,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
        triples += 1
    return triples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", action="append", help="[NAME=]PATH[:base|:chat]; default: 3 tiny policies")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prefix-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--hidden-size", type=int, default=64, help="width of the tiny policies")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from trl_polar.data import PromptConfig, SamplingConfig, SynthesisConfig, Synthesizer, sample_prompts
    from trl_polar.data.synthesis import Policy, TransformersBackend
    from trl_polar.tiny import build_tiny_causal_lm, build_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    if args.policies:
        policies = [Policy.parse(p) for p in args.policies]
    else:
        tokenizer = build_tiny_tokenizer(polar_tokens=False)
        policies = []
        for i in range(3):
            size = {"hidden_size": args.hidden_size, "intermediate_size": 2 * args.hidden_size}
            build_tiny_causal_lm(tokenizer, seed=i, out_dir=work / f"p{i}", **size)
            policies.append(Policy(f"p{i}", str(work / f"p{i}"), "base"))
    tokenizer = AutoTokenizer.from_pretrained(policies[0].path)
    words = [
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "an",
        "were",
        "are",
        "which",
        "this",
        "be",
        "or",
    ]
    rng = random.Random(0)
    corpus = [{"text": " ".join(rng.choice(words) for _ in range(200))} for _ in range(args.num_prompts)]
    prompts = sample_prompts(corpus, tokenizer, PromptConfig(max_prefix_tokens=args.max_prefix_tokens, seed=0))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    results = []
    backend = TransformersBackend(batch_size=1, device=device, max_loaded=len(policies))
    plain_loop(prompts.rows[:2], backend, policies, sampling, 0)  # load and warm up every model
    start = time.perf_counter()
    n = plain_loop(prompts.rows, backend, policies, sampling, 0)
    baseline = n / (time.perf_counter() - start)
    results.append(("plain loop, 1 prompt per generate", baseline))
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        backend.batch_size = batch_size
        config = SynthesisConfig(
            out_dir=str(work / f"bs{batch_size}"),
            policies=policies,
            shard_size=len(prompts),
            batch_size=batch_size,
            progress=False,
            sampling=sampling,
        )
        start = time.perf_counter()
        result = Synthesizer(config, backend=backend).run(prompts)
        elapsed = time.perf_counter() - start
        # Every prompt's three trajectories were generated; count prompts, not the triples kept after cleaning.
        results.append(
            (f"trl_polar transformers backend, batch_size={batch_size}", result.totals["prompts"] / elapsed)
        )

    print(f"\ndevice={device} policies={len(policies)} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"torch_threads={torch.get_num_threads()}")  # fmt: skip
    print(f"| {'path':<48} | triples/s | vs plain |")
    print(f"|{'-' * 50}|-----------|----------|")
    for name, rate in results:
        print(f"| {name:<48} | {rate:9.2f} | {rate / baseline:7.2f}x |")


if __name__ == "__main__":
    main()
