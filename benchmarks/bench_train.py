"""Training throughput: TRL's RewardTrainer against PolarRewardTrainer's padded, packed and shared_prefix modes.

All methods train the same model on the same POLAR-shaped triples (prompt ~256 tokens, reference ~512, answers
32-512) for the same number of steps. Throughput counts real tokens: the full chosen and rejected sequences, as a
padded batch without its padding would hold them, so every method is credited with the same tokens per row and the
ratios are ratios of time. The *limit* runs forward+backward+optimizer step over only the unique tokens of each batch
(no padding, each prefix once, every segment attending to itself only): no exact layout reaches it, since branches
must attend to their prefix.

    python benchmarks/bench_train.py            # prints a table, then one JSON line
    python benchmarks/bench_train.py --rows 48 --batch 4 --steps 6 --hidden 256 --layers 4
    python benchmarks/bench_train.py --hidden 2048 --layers 24 --heads 16 --kv-heads 8 --intermediate 8192 \
        --vocab 92544 --dtype bf16 --rows 64 --batch 8 --steps 4           # 1.8B-shaped, on a GPU

On a GPU the JSON line also gives each method's model FLOPs utilisation (`bench_mfu`: the unique tokens' training
FLOPs, 3x the forward, per second over the device's dense bf16 peak). TRL's RewardTrainer has no padding-free mode
(trl 1.16), so its padded batches are the baseline.

Targets: shared_prefix >= 2x TRL's RewardTrainer and >= 0.85 of the limit; on a GPU >= 35% MFU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_mfu import attention_pairs, device_name, mfu, model_flops, peak_bf16_flops  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402

from trl_polar.collator import PolarDataCollator  # noqa: E402
from trl_polar.config import PolarConfig  # noqa: E402
from trl_polar.modeling import add_polar_tokens, value_head  # noqa: E402
from trl_polar.tiny import build_tiny_tokenizer, tiny_config  # noqa: E402
from trl_polar.trainer import PolarRewardTrainer  # noqa: E402

# fmt: off
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by", "an",
         "be", "this", "are", "from", "or", "have", "not", "but", "one", "all"]
# fmt: on


def _text(tokenizer, rng: random.Random, tokens: int) -> str:
    words = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.extend(rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing"]) for _ in range(max(1, tokens // 8)))
    return " ".join(words)


def make_rows(tokenizer, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": _text(tokenizer, rng, rng.randint(200, 300)),
            "reference": _text(tokenizer, rng, rng.randint(400, 600)),
            "chosen": _text(tokenizer, rng, rng.randint(32, 512)),
            "rejected": _text(tokenizer, rng, rng.randint(32, 512)),
        }
        for _ in range(n)
    ]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step after the first (the first pays for allocator and kernel warm-up, and on
    CUDA for compiling the flex kernel: it is kept apart as ``first``)."""

    def __init__(self):
        self.times: list[float] = []
        self.first = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > 1:
            self.times.append(time.perf_counter() - self._start)
        else:
            self.first = time.perf_counter() - self._start


BF16 = False  # set by --dtype bf16: mixed precision (bf16 autocast, fp32 master weights) in every method


def _args(out: str, batch: int, steps: int, cls=PolarConfig, **extra):
    return cls(
        output_dir=out,
        use_cpu=not torch.cuda.is_available(),
        bf16=BF16,
        report_to="none",
        gradient_checkpointing=False,
        save_strategy="no",
        per_device_train_batch_size=batch,
        max_steps=steps + 1,
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def run_trl(model_dir, tokenizer, template, rows, batch, steps, out) -> float:
    from trl import RewardConfig, RewardTrainer

    # TRL on pre-concatenated POLAR text: the best a user gets from the stock trainer.
    texts = [
        {
            "chosen": template.format(r["prompt"], r["reference"], r["chosen"]),
            "rejected": template.format(r["prompt"], r["reference"], r["rejected"]),
        }
        for r in rows
    ]
    timer = StepTimer()
    trainer = RewardTrainer(
        model=_load(model_dir),
        args=_args(out, batch, steps, RewardConfig, max_length=None),
        train_dataset=Dataset.from_list(texts),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    del trainer
    _release()
    return sum(timer.times), timer.first


def run_polar(model_dir, tokenizer, rows, batch, steps, out, batching) -> float:
    timer = StepTimer()
    args = _args(out, batch, steps, batching=batching, max_length=4096, max_response_length=1024)
    trainer = PolarRewardTrainer(
        model=_load(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    del trainer
    _release()
    return sum(timer.times), timer.first


def run_limit(model_dir, tokenizer, template, rows, batch, steps) -> tuple[float, float]:
    """Unique tokens only (each prefix once, no padding); returns (seconds, unique tokens per pair).

    The batch's unique tokens form one unpadded row in which every segment (a prefix, a branch) attends only to
    itself, through the same bucketed segment attention shared_prefix uses: every unique token runs once and nothing
    is masked or padded. What it leaves out, the branches' attention to their prefix, exact training cannot skip.
    """
    from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _load(model_dir).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collator = PolarDataCollator(pad_token_id=tokenizer.pad_token_id, batching="shared_prefix")
    encoded = [
        dict(
            zip(
                ("chosen_ids", "rejected_ids"),
                template.encode_pair(r["prompt"], r["reference"], r["chosen"], r["rejected"]),
            )
        )
        for r in rows
    ]
    rng = random.Random(0)
    total, unique = 0.0, []
    for step in range(steps + 1):
        collated = collator(rng.sample(encoded, batch))
        start = time.perf_counter()
        alone = SegmentLayout([Segment(s, n) for s, n, _, _ in collated["segments"].tolist()], torch.device(device))
        reads = collated["reward_positions"]
        ids = collated["input_ids"][0]
        if step:
            unique.append(len(ids) / batch)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=BF16):
            hidden = segment_forward(model.model, ids.to(device), alone)
            loss = value_head(model)(hidden[reads.to(device)]).float().sum() / batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            total += time.perf_counter() - start
    del model, optimizer
    _release()
    return total, sum(unique) / len(unique)


def _release() -> None:
    # A finished trainer holds its model and optimizer through reference cycles: free them before the next method.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(model_dir):
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )


def unique_work(collator, encoded) -> tuple[float, float]:
    """Mean unique tokens and query-key pairs of a pair: its prefix once, each token seeing its prefix and itself."""
    tokens = pairs = 0
    for pair in encoded:
        batch = collator([pair])
        tokens += batch["input_ids"].shape[1]
        pairs += attention_pairs(batch["segments"].tolist())
    return tokens / len(encoded), pairs / len(encoded)


def main() -> None:
    global BF16
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one more runs first as warm-up)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4x hidden)")
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the tokenizer's size)")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: mixed precision")
    parser.add_argument(
        "--kernel", default="auto", choices=["auto", "flex", "buckets"], help="segment attention kernel"
    )
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    BF16 = opts.dtype == "bf16"
    from trl_polar import segment_attention

    segment_attention.DEFAULT_KERNEL = opts.kernel

    work = tempfile.mkdtemp(prefix="bench_train_")
    tokenizer = build_tiny_tokenizer(os.path.join(work, "tok"), polar_tokens=False)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(work, "tok"))
    torch.manual_seed(opts.seed)
    config = tiny_config(
        tokenizer,
        opts.arch,
        hidden_size=opts.hidden,
        intermediate_size=opts.intermediate or 4 * opts.hidden,
        num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads,
        num_key_value_heads=opts.kv_heads,
        num_labels=1,
        max_position_embeddings=8192,
        **({"vocab_size": opts.vocab} if opts.vocab else {}),
    )
    model = AutoModelForSequenceClassification.from_config(config)
    template = add_polar_tokens(tokenizer, model, max_length=4096, max_response_length=1024)
    model_dir = os.path.join(work, "rm")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = make_rows(tokenizer, opts.rows, opts.seed)
    pairs = [template.encode_pair(r["prompt"], r["reference"], r["chosen"], r["rejected"]) for r in rows]
    tokens_per_row = sum(len(c) + len(r) for c, r in pairs) / len(pairs)
    timed_rows = opts.batch * opts.steps

    collator = PolarDataCollator(pad_token_id=tokenizer.pad_token_id, batching="shared_prefix")
    unique_tokens, unique_pairs = unique_work(collator, [{"chosen_ids": c, "rejected_ids": r} for c, r in pairs])
    step_flops = opts.batch * model_flops(config, unique_tokens, unique_pairs, training=True)

    seconds, first = {}, {}
    seconds["trl RewardTrainer"], first["trl RewardTrainer"] = run_trl(
        model_dir, tokenizer, template, rows, opts.batch, opts.steps, os.path.join(work, "trl")
    )
    for batching in ("padded", "packed", "shared_prefix"):
        seconds[f"polar {batching}"], first[f"polar {batching}"] = run_polar(
            model_dir, tokenizer, rows, opts.batch, opts.steps, os.path.join(work, batching), batching
        )
    seconds["limit (unique tokens)"], unique_per_row = run_limit(
        model_dir, tokenizer, template, rows, opts.batch, opts.steps
    )

    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_bf16_flops(device)
    print(
        f"device: {device}; model: {opts.arch} hidden {opts.hidden}, {opts.layers} layers, {opts.heads} heads "
        f"({opts.kv_heads} KV), MLP {config.intermediate_size}, vocab {config.vocab_size}; {opts.dtype}; "
        f"{opts.batch} pairs/step, {opts.steps} timed steps; {tokens_per_row:.0f} real tokens per pair, "
        f"{unique_per_row:.0f} unique"
    )
    print(f"{'method':<32}{'s/step':>10}{'real tok/s':>14}{'vs TRL':>9}{'of limit':>10}{'MFU':>8}")
    trl, limit = seconds["trl RewardTrainer"], seconds["limit (unique tokens)"]
    utilisation = {}
    for name, value in seconds.items():
        rate = tokens_per_row * timed_rows / value
        utilisation[name] = mfu(step_flops * opts.steps, value, peak)
        shown = f"{utilisation[name]:.3f}" if utilisation[name] is not None else "-"
        print(
            f"{name:<32}{value / opts.steps:>10.3f}{rate:>14.0f}{trl / value:>8.2f}x{limit / value:>10.2f}{shown:>8}"
        )
    shared = seconds["polar shared_prefix"]
    print(
        json.dumps(
            {
                "speedup_vs_trl": round(trl / shared, 3),
                "fraction_of_limit": round(limit / shared, 3),
                "packed_speedup_vs_trl": round(trl / seconds["polar packed"], 3),
                "padded_speedup_vs_trl": round(trl / seconds["polar padded"], 3),
                "mfu": {
                    "shared_prefix": utilisation["polar shared_prefix"],
                    "packed": utilisation["polar packed"],
                    "padded": utilisation["polar padded"],
                    "trl": utilisation["trl RewardTrainer"],
                    "limit": utilisation["limit (unique tokens)"],
                },
                "first_step_seconds": {name: round(value, 3) for name, value in first.items()},
                "seconds_per_step": {name: round(value / opts.steps, 4) for name, value in seconds.items()},
                "tokens_per_pair": round(tokens_per_row, 1),
                "unique_tokens_per_pair": round(unique_per_row, 1),
                "device": device,
                "gpu": device,
                "peak_tflops": peak / 1e12 if peak else None,
                "dtype": opts.dtype,
                "kernel": opts.kernel,
                "shapes": {
                    "arch": opts.arch,
                    "hidden": opts.hidden,
                    "layers": opts.layers,
                    "heads": opts.heads,
                    "kv_heads": opts.kv_heads,
                    "intermediate": config.intermediate_size,
                    "vocab": config.vocab_size,
                    "pairs_per_step": opts.batch,
                    "timed_steps": opts.steps,
                    "prompt_tokens": [200, 300],
                    "reference_tokens": [400, 600],
                    "answer_tokens": [32, 512],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
