"""Training throughput: TRL's RewardTrainer against PolarRewardTrainer's padded, packed and shared_prefix modes.

All methods train the same model on the same POLAR-shaped triples (prompt ~256 tokens, reference ~512, answers
32-512) for the same steps, in the same order (sequential sampling: step i takes rows i*batch to (i+1)*batch, so the
timed steps' tokens are known exactly). Throughput counts real tokens: the full chosen and rejected sequences, as a
padded batch without its padding would hold them, so every method is credited with the same tokens per row and the
ratios are ratios of time. The *limit* runs forward+backward+optimizer step over only the unique tokens of each batch
(no padding, each prefix once, every segment attending to itself only): no exact layout reaches it, since branches
must attend to their prefix.

    python benchmarks/bench_train.py            # prints a table, then one JSON line
    python benchmarks/bench_train.py --rows 48 --batch 4 --steps 6 --hidden 256 --layers 4
    python benchmarks/bench_train.py --hidden 2048 --layers 24 --heads 16 --kv-heads 8 --intermediate 8192 \
        --vocab 92544 --dtype bf16 --rows 64 --batch 8 --steps 4           # 1.8B-shaped, on a GPU

The model is built once (on the GPU when there is one), saved once (bf16 with ``--dtype bf16``) and loaded once per
method. ``--warmup`` steps run first, untimed: they compile the flex kernel (forward and backward) and warm the
allocator, so no timed step contains a compile; the JSON reports any compile that still happened while timing. On a
GPU the JSON gives each method's model FLOPs utilisation (`bench_mfu`: the timed steps' unique tokens' training FLOPs,
3x the forward, per second) against the data-sheet peak and against the measured bf16 matmul peak. After each method
a ``{"partial": ...}`` JSON line holds what has finished, for a run cut short. TRL's RewardTrainer has no padding-free
mode (trl 1.16), so its padded batches are the baseline. Importing this module needs neither trl nor datasets.

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
from bench_mfu import attention_pairs, device_name, device_peaks, mfu, model_flops  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402

from trl_polar.modeling import add_polar_tokens, value_head  # noqa: E402
from trl_polar.tiny import build_tiny_tokenizer, tiny_config  # noqa: E402

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


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step after the ``warmup`` first ones (those compile the flex kernel on CUDA and
    warm the allocator: their total is kept apart as ``first``), and the graphs compiled while timing."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: list[float] = []
        self.first = 0.0
        self.graphs_while_timing = 0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._graphs = _graphs()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        if state.global_step > self.warmup:
            self.times.append(elapsed)
            self.graphs_while_timing = _graphs() - self._graphs
        else:
            self.first += elapsed

    def result(self) -> dict:
        return {"seconds": sum(self.times), "first": self.first, "graphs_while_timing": self.graphs_while_timing}


BF16 = False  # set by --dtype bf16: mixed precision (bf16 autocast, fp32 master weights) in every method


def _args(cls, out: str, batch: int, steps: int, **extra):
    return cls(
        output_dir=out,
        use_cpu=not torch.cuda.is_available(),
        bf16=BF16,
        report_to="none",
        gradient_checkpointing=False,
        save_strategy="no",
        per_device_train_batch_size=batch,
        max_steps=steps,
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def _sequential(trainer) -> None:
    """Sequential sampling: every method sees the same rows in the same steps."""
    from torch.utils.data import SequentialSampler

    dataset = trainer.train_dataset
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(dataset)


def run_trl(model_dir, tokenizer, template, rows, batch, steps, warmup, out) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # TRL on pre-concatenated POLAR text: the best a user gets from the stock trainer.
    texts = [
        {
            "chosen": template.format(r["prompt"], r["reference"], r["chosen"]),
            "rejected": template.format(r["prompt"], r["reference"], r["rejected"]),
        }
        for r in rows
    ]
    timer = StepTimer(warmup)
    trainer = RewardTrainer(
        model=_load(model_dir),
        args=_args(RewardConfig, out, batch, warmup + steps, max_length=None),
        train_dataset=Dataset.from_list(texts),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    _sequential(trainer)
    trainer.train()
    del trainer
    _release()
    return timer.result()


def run_polar(model_dir, tokenizer, rows, batch, steps, warmup, out, batching) -> dict:
    from datasets import Dataset

    from trl_polar.config import PolarConfig
    from trl_polar.trainer import PolarRewardTrainer

    timer = StepTimer(warmup)
    args = _args(PolarConfig, out, batch, warmup + steps, batching=batching, max_length=4096, max_response_length=1024)
    trainer = PolarRewardTrainer(
        model=_load(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    _sequential(trainer)
    trainer.train()
    del trainer
    _release()
    return timer.result()


def run_limit(model_dir, encoded, batch, steps, warmup) -> dict:
    """Unique tokens only (each prefix once, no padding), the same batches in the same order.

    The batch's unique tokens form one unpadded row in which every segment (a prefix, a branch) attends only to
    itself, through the same segment attention shared_prefix uses: every unique token runs once and nothing is
    masked or padded. What it leaves out, the branches' attention to their prefix, exact training cannot skip.
    """
    from trl_polar.collator import PolarDataCollator
    from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _load(model_dir).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collator = PolarDataCollator(pad_token_id=0, batching="shared_prefix")
    total = first = 0.0
    graphs = 0
    for step in range(warmup + steps):
        if step == warmup:
            graphs = _graphs()
        collated = collator(encoded[step * batch : (step + 1) * batch])
        start = time.perf_counter()
        alone = SegmentLayout([Segment(s, n) for s, n, _, _ in collated["segments"].tolist()], torch.device(device))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=BF16):
            hidden = segment_forward(model.model, collated["input_ids"][0].to(device), alone)
            loss = value_head(model)(hidden[collated["reward_positions"].to(device)]).float().sum() / batch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        total, first = (total + elapsed, first) if step >= warmup else (total, first + elapsed)
    graphs = _graphs() - graphs
    del model, optimizer
    _release()
    return {"seconds": total, "first": first, "graphs_while_timing": graphs}


def _release() -> None:
    # A finished trainer holds its model and optimizer through reference cycles: free them before the next method.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(model_dir):
    # fp32 master weights (bf16 runs autocast), straight onto the GPU where there is one.
    cuda = torch.cuda.is_available()
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", **({"device_map": "cuda"} if cuda else {})
    )


def timed_work(encoded, batch, steps, warmup) -> tuple[int, int, int]:
    """Unique tokens, query-key pairs and real tokens of the timed steps' pairs: each prefix once, each token seeing
    its prefix and itself (real tokens: the full chosen and rejected sequences)."""
    from trl_polar.collator import PolarDataCollator

    collator = PolarDataCollator(pad_token_id=0, batching="shared_prefix")
    tokens = pairs = real = 0
    for pair in encoded[warmup * batch : (warmup + steps) * batch]:
        collated = collator([pair])
        tokens += collated["input_ids"].shape[1]
        pairs += attention_pairs(collated["segments"].tolist())
        real += len(pair["chosen_ids"]) + len(pair["rejected_ids"])
    return tokens, pairs, real


METHODS = {
    "shared_prefix": "polar shared_prefix",
    "trl": "trl RewardTrainer",
    "limit": "limit (unique tokens)",
    "packed": "polar packed",
    "padded": "polar padded",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows made; (warmup + steps) * batch of them train")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile, allocator)")
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
    parser.add_argument(
        "--methods",
        default="shared_prefix,trl,limit,packed,padded",
        help="comma-separated, run in this order (the targets' methods first, for a run cut short)",
    )
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    if opts.rows < (opts.warmup + opts.steps) * opts.batch:
        parser.error(f"--rows must be at least (warmup + steps) * batch = {(opts.warmup + opts.steps) * opts.batch}")
    return opts


def build(opts, work: str):
    """The tokenizer, template, config and the model saved once (bf16 under --dtype bf16) to ``work``/rm."""
    build_tiny_tokenizer(os.path.join(work, "tok"), polar_tokens=False)
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
    # Random init of a 1.8B model takes minutes on a CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForSequenceClassification.from_config(config)
    template = add_polar_tokens(tokenizer, model, max_length=4096, max_response_length=1024)
    model_dir = os.path.join(work, "rm")
    model.to(torch.bfloat16 if BF16 else torch.float32).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    _release()
    return tokenizer, template, config, model_dir


def run_methods(opts, model_dir, tokenizer, template, rows, encoded, work, on_done) -> dict:
    results = {}
    common = (opts.batch, opts.steps, opts.warmup)
    for method in opts.methods.split(","):
        if method == "trl":
            result = run_trl(model_dir, tokenizer, template, rows, *common, f"{work}/trl")
        elif method == "limit":
            result = run_limit(model_dir, encoded, *common)
        elif method in ("padded", "packed", "shared_prefix"):
            result = run_polar(model_dir, tokenizer, rows, *common, f"{work}/{method}", method)
        else:
            raise SystemExit(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
        results[method] = result
        on_done(results)
    return results


def summary(opts, config, results, work_done, peaks, device) -> dict:
    unique_tokens, unique_pairs, real_tokens = work_done
    flops = model_flops(config, unique_tokens, unique_pairs, training=True)
    per_step = {name: r["seconds"] / opts.steps for name, r in results.items()}
    trl, limit, shared = results.get("trl"), results.get("limit"), results.get("shared_prefix")
    ratio = lambda a, b: round(a["seconds"] / b["seconds"], 3) if a and b else None  # noqa: E731
    return {
        "speedup_vs_trl": ratio(trl, shared),
        "fraction_of_limit": ratio(limit, shared),
        "packed_speedup_vs_trl": ratio(trl, results.get("packed")),
        "padded_speedup_vs_trl": ratio(trl, results.get("padded")),
        "mfu": {name: mfu(flops, r["seconds"], peaks["datasheet"]) for name, r in results.items()},
        "mfu_measured_peak": {name: mfu(flops, r["seconds"], peaks["measured_matmul"]) for name, r in results.items()},
        "first_step_seconds": {name: round(r["first"], 3) for name, r in results.items()},
        "seconds_per_step": {name: round(value, 4) for name, value in per_step.items()},
        "graphs_compiled_while_timing": {name: r["graphs_while_timing"] for name, r in results.items()},
        "real_tokens_per_second": {name: round(real_tokens / r["seconds"], 1) for name, r in results.items()},
        "timed_tokens": {"real": real_tokens, "unique": unique_tokens, "attention_pairs": unique_pairs},
        "tokens_per_pair": round(real_tokens / (opts.batch * opts.steps), 1),
        "unique_tokens_per_pair": round(unique_tokens / (opts.batch * opts.steps), 1),
        "device": device,
        "gpu": device,
        "peak_tflops": peaks["datasheet"] / 1e12 if peaks["datasheet"] else None,
        "measured_peak_tflops": round(peaks["measured_matmul"] / 1e12, 1) if peaks["measured_matmul"] else None,
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
            "warmup_steps": opts.warmup,
            "prompt_tokens": [200, 300],
            "reference_tokens": [400, 600],
            "answer_tokens": [32, 512],
        },
    }


def main(argv=None) -> dict:
    global BF16
    opts = parse_args(argv)
    BF16 = opts.dtype == "bf16"
    # The kernel of every layout the trainer and the limit build (they take no kernel argument).
    os.environ["TRL_POLAR_ATTENTION_KERNEL"] = opts.kernel
    work = tempfile.mkdtemp(prefix="bench_train_")
    tokenizer, template, config, model_dir = build(opts, work)
    rows = make_rows(tokenizer, opts.rows, opts.seed)
    encoded = [
        dict(
            zip(
                ("chosen_ids", "rejected_ids"),
                template.encode_pair(r["prompt"], r["reference"], r["chosen"], r["rejected"]),
            )
        )
        for r in rows
    ]
    work_done = timed_work(encoded, opts.batch, opts.steps, opts.warmup)
    device = device_name("cuda" if torch.cuda.is_available() else "cpu")
    peaks = device_peaks("cuda" if torch.cuda.is_available() else "cpu")

    def partial(results):
        print(json.dumps({"partial": True, **summary(opts, config, results, work_done, peaks, device)}), flush=True)

    results = run_methods(opts, model_dir, tokenizer, template, rows, encoded, work, partial)
    result = summary(opts, config, results, work_done, peaks, device)
    print(
        f"device: {device}; model: {opts.arch} hidden {opts.hidden}, {opts.layers} layers, {opts.heads} heads "
        f"({opts.kv_heads} KV), MLP {config.intermediate_size}, vocab {config.vocab_size}; {opts.dtype}; "
        f"{opts.batch} pairs/step, {opts.warmup} warm-up + {opts.steps} timed steps; "
        f"{result['tokens_per_pair']:.0f} real tokens per pair, {result['unique_tokens_per_pair']:.0f} unique"
    )
    print(f"{'method':<32}{'s/step':>10}{'real tok/s':>14}{'MFU':>8}{'MFU meas.':>10}{'graphs':>8}")
    for name in results:
        shown = [
            f"{v:.3f}" if v is not None else "-" for v in (result["mfu"][name], result["mfu_measured_peak"][name])
        ]
        print(
            f"{METHODS[name]:<32}{result['seconds_per_step'][name]:>10.3f}{result['real_tokens_per_second'][name]:>14.0f}"
            f"{shown[0]:>8}{shown[1]:>10}{result['graphs_compiled_while_timing'][name]:>8}"
        )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
