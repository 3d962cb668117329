"""The reward model the scoring and serving benchmarks share: its flags and how it is built, offline."""

from __future__ import annotations

import argparse
import os


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Size flags of the random tiny POLAR reward model (speed does not depend on the weights)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the tokenizer's size)")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "flex", "buckets", "split"],
        help="segment attention kernel (auto: flex on CUDA, the split or buckets on CPU)",
    )


def use_kernel(args: argparse.Namespace) -> None:
    """Make ``--kernel`` the segment attention kernel of every layout this process builds without one."""
    os.environ["TRL_POLAR_ATTENTION_KERNEL"] = args.kernel


def shapes(args: argparse.Namespace, config) -> dict:
    """The model's shape, as the benchmarks report it."""
    return {
        "arch": args.arch,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def build_model(args: argparse.Namespace, out_dir: str) -> None:
    """Save a random POLAR reward model of the requested size, with its tokenizer, to `out_dir`."""
    from trl_polar.tiny import build_tiny_reward_model, build_tiny_tokenizer

    vocab = {"vocab_size": args.vocab} if args.vocab else {}
    build_tiny_reward_model(
        build_tiny_tokenizer(),
        arch=args.arch,
        seed=args.seed,
        out_dir=out_dir,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=8192,
        **vocab,
    )
