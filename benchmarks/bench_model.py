"""The reward model the scoring and serving benchmarks share: its flags and how it is built, offline."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Size flags of the random tiny POLAR reward model (speed does not depend on the weights)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=704)
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])


def build_model(args: argparse.Namespace, out_dir: str) -> None:
    """Save a random POLAR reward model of the requested size, with its tokenizer, to `out_dir`."""
    from trl_polar.tiny import build_tiny_reward_model, build_tiny_tokenizer

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
    )
