"""The whole POLAR pipeline on a laptop: policy pool -> pre-training data -> reward model -> evaluation -> GRPO.

Everything is built offline and small enough for two CPU cores in well under a minute:

1. a pool of tiny random causal LMs, each writing with a vocabulary of its own (`trl_polar.tiny`);
2. prompts sampled from a built-in corpus, answered by the pool as POLAR pre-training triples (`trl_polar.data`);
3. a POLAR reward model pre-trained on them (`PolarRewardTrainer`);
4. held-out policy-discrimination accuracy before and after (`trl_polar.evaluation`);
5. a few GRPO steps of one policy, rewarded by the trained model against references (`PolarReward`), with the
   policy's mean reward on a fixed set of held-out prompts before and after.

The same steps at real scale are printed at the end.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REAL_SCALE = """\
The same pipeline at real scale (GPUs; see docs/):
  trl-polar build-data --policies a=Qwen/Qwen2.5-1.5B:base --policies b=meta-llama/Llama-3.2-1B:base \\
      --policies c=internlm/internlm2_5-1_8b:base --corpus corpus.jsonl --num-prompts 100000 \\
      --out polar-pt --backend vllm
  accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml -m trl_polar.cli train \\
      --model_name_or_path Qwen/Qwen3-0.6B --train_data polar-pt --output_dir polar-rm --bf16 true
  trl-polar evaluate --model polar-rm --data heldout.jsonl --out eval/
  accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/grpo_polar.py \\
      --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model polar-rm --dataset rl_prompts.jsonl \\
      --output_dir grpo-polar --bf16 true
"""

# What the ranks of a pre-training triple are, in words: the chosen answer shares the reference's policy.
RANK_LABELS = {"rank_1": "same policy as the reference", "rank_2": "another policy"}

CORPUS_TOPICS = [
    "the weather", "a recipe", "a football match", "the stock market", "a short story", "a math problem",
    "a travel plan", "a science fact", "a poem", "a product review", "a history lesson", "a programming task",
]  # fmt: skip


@dataclass
class QuickstartConfig:
    """Sizes of the quickstart run; the defaults finish in about 16 s on two idle CPU cores."""

    out_dir: str = field(default="polar-quickstart", metadata={"help": "Where data, models and the report go."})
    num_policies: int = field(default=2, metadata={"help": "Tiny policies in the pool."})
    num_prompts: int = field(default=320, metadata={"help": "Prompts answered by the pool (train + held out)."})
    heldout_fraction: float = field(default=0.25, metadata={"help": "Share of triples kept for evaluation."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens each policy writes per answer."})
    epochs: float = field(default=4.0, metadata={"help": "Reward-model training epochs."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Reward-model learning rate (tiny models)."})
    grpo_steps: int = field(default=3, metadata={"help": "GRPO steps at the end (0 skips the RL stage)."})
    grpo_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the GRPO stage."})
    grpo_eval_prompts: int = field(
        default=16,
        metadata={"help": "Held-out prompts on which the policy's mean reward is measured before and after."},
    )
    grpo_samples: int = field(default=4, metadata={"help": "Answers sampled per held-out prompt for that measure."})
    seed: int = field(default=0, metadata={"help": "Seed of everything."})


def _corpus(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"text": f"Document {i} is about {rng.choice(CORPUS_TOPICS)}. It says that {rng.choice(CORPUS_TOPICS)} "
                 f"matters because of {rng.choice(CORPUS_TOPICS)}, and it ends here."}
        for i in range(n)
    ]  # fmt: skip


def _stage(name: str):
    logger.info("== %s", name)
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run_quickstart(config: QuickstartConfig | None = None) -> dict[str, Any]:
    """Run every stage and return the summary (also written to ``out_dir/report.json`` and ``summary.md``)."""
    import torch

    config = config or QuickstartConfig()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    start = _stage(f"1/5 Building a pool of {config.num_policies} tiny policies")
    tokenizer, policies = _build_pool(out, config)
    timings["policies"] = time.perf_counter() - start

    start = _stage(f"2/5 Synthesising POLAR triples for {config.num_prompts} prompts")
    train_rows, eval_rows, totals = _synthesise(tokenizer, policies, out, config)
    timings["data"] = time.perf_counter() - start
    print(f"{len(train_rows)} training and {len(eval_rows)} held-out triples; removals: {totals}")

    before, after, reward_model = _train_and_evaluate(train_rows, eval_rows, out, config, timings)

    grpo: dict[str, Any] = {}
    if config.grpo_steps > 0:
        start = _stage(f"5/5 {config.grpo_steps} GRPO steps rewarded by the trained model")
        grpo = _grpo(policies[0], reward_model, train_rows, eval_rows, out, config)
        timings["grpo"] = time.perf_counter() - start

    summary = {
        "triples": {"train": len(train_rows), "heldout": len(eval_rows), "synthesis": totals},
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "reference_self_score_after": after.reference_self_score.get("mean"),
        "mean_scores_after": {
            RANK_LABELS[k]: v["mean"] for k, v in after.score_stats_by_rank.items() if k in RANK_LABELS
        },
        "grpo": grpo,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "config": asdict(config),
    }
    _write_summary(summary, out)
    return summary


def _build_pool(out: Path, config: QuickstartConfig) -> tuple[Any, list[str]]:
    from .tiny import build_tiny_causal_lm, build_tiny_policy_pool, build_tiny_tokenizer

    corpus = [d["text"] for d in _corpus(200, config.seed)]
    tokenizer = build_tiny_tokenizer(out / "tokenizer", corpus=corpus)
    policies = build_tiny_policy_pool(tokenizer, out / "policies", config.num_policies, seed=config.seed)
    # The backbone ships without the POLAR tokens, as any fresh backbone does: the trainer adds them.
    backbone_tokenizer = build_tiny_tokenizer(corpus=corpus, polar_tokens=False)
    build_tiny_causal_lm(backbone_tokenizer, seed=config.seed + 999, out_dir=out / "backbone", hidden_size=96)
    return tokenizer, policies


def _synthesise(tokenizer: Any, policies: list[str], out: Path, config: QuickstartConfig):
    """Training and held-out triples, and the synthesis totals."""
    from .data import PromptConfig, SamplingConfig, SynthesisConfig, sample_prompts, synthesize

    prompts = sample_prompts(
        _corpus(config.num_prompts * 2, config.seed),
        tokenizer,
        PromptConfig(num_prompts=config.num_prompts, max_prefix_tokens=12, seed=config.seed),
    )
    result = synthesize(
        prompts,
        SynthesisConfig(
            out_dir=str(out / "triples"),
            policies=[f"p{k}={path}:base" for k, path in enumerate(policies)],
            seed=config.seed,
            output_format="jsonl",
            batch_size=32,
            sampling=SamplingConfig(max_new_tokens=config.max_new_tokens, incomplete_endings="keep"),
        ),
    )
    rows = result.rows()
    random.Random(config.seed).shuffle(rows)
    n_eval = max(8, int(len(rows) * config.heldout_fraction))
    columns = ("prompt", "reference", "chosen", "rejected", "wrapper")
    rows = [{k: r[k] for k in columns} for r in rows]
    return rows[n_eval:], rows[:n_eval], result.totals


def _train_and_evaluate(train_rows, eval_rows, out: Path, config: QuickstartConfig, timings: dict[str, float]):
    """Held-out accuracy before and after pre-training the reward model; returns both reports and the model dir."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from .config import PolarConfig
    from .evaluation import evaluate, write_report
    from .scorer import PolarScorer
    from .trainer import PolarRewardTrainer

    start = _stage("3/5 Held-out accuracy before training")
    args = PolarConfig(
        output_dir=str(out / "reward-model"),
        max_length=256,
        max_response_length=64,
        # A random head gives chance-level accuracy before training; a zero head (upstream's choice, the default)
        # would tie every pair, which reads as 0% rather than as "not trained yet".
        zero_init_head=False,
        batching="padded",  # TRL's layout; rows of a few dozen tokens train in seconds with any layout
        per_device_train_batch_size=8,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        disable_tqdm=False,
    )
    trainer = PolarRewardTrainer(model=str(out / "backbone"), args=args, train_dataset=Dataset.from_list(train_rows))
    before = evaluate(PolarScorer(trainer.model, _trainer_template(trainer)), eval_rows)
    timings["eval_before"] = time.perf_counter() - start
    print(f"accuracy before: {before.accuracy:.3f}")

    start = _stage("4/5 Pre-training the POLAR reward model")
    trainer.train()
    trainer.save_model(args.output_dir)
    AutoTokenizer.from_pretrained(args.output_dir)  # the saved directory is complete and loads
    after = evaluate(PolarScorer(args.output_dir), eval_rows)
    write_report(after, out / "evaluation", rank_labels=RANK_LABELS)
    timings["train_and_eval"] = time.perf_counter() - start
    print(f"accuracy after: {after.accuracy:.3f}")
    return before, after, args.output_dir


def _write_summary(summary: dict[str, Any], out: Path) -> None:
    from .atomic import write_text

    write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    table = _table(summary)
    write_text(out / "summary.md", table + "\n" + "```\n" + REAL_SCALE + "```\n")
    print("\n" + table)
    print(f"\nReport: {out / 'report.json'}, {out / 'summary.md'}, plots in {out / 'evaluation'}\n")
    print(REAL_SCALE)


def _trainer_template(trainer: Any):
    """The template the trainer tokenizes with (its processing class carries the POLAR tokens)."""
    from .template import PolarTemplate

    args = trainer.args
    return PolarTemplate(
        trainer.processing_class,
        max_length=args.max_length,
        max_response_length=args.max_response_length,
        response_cut_side=args.response_cut_side,
        separator=args.separator,
        reward_token=args.reward_token,
    )


def _grpo(policy: str, reward_model: str, train_rows, eval_rows, out: Path, config: QuickstartConfig) -> dict:
    """GRPO on training prompts; the policy's mean reward on a fixed set of held-out prompts before and after."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from .rewards import PolarReward
    from .scorer import PolarScorer

    prompts = Dataset.from_list([{"prompt": r["prompt"], "reference": r["reference"]} for r in train_rows])
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    scorer = PolarScorer(reward_model)
    held_out = eval_rows[: config.grpo_eval_prompts]
    wrapper = train_rows[0]["wrapper"]  # the synthesised rows' wrapper, which the reward model was trained with
    args = GRPOConfig(
        output_dir=str(out / "grpo"),
        max_steps=config.grpo_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=config.max_new_tokens,
        learning_rate=config.grpo_learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=config.seed,
        # GRPO builds its own sampling settings: the policy keeps writing with its own vocabulary only.
        generation_kwargs={"suppress_tokens": model.generation_config.suppress_tokens},
    )
    measure = {"scorer": scorer, "rows": held_out, "wrapper": wrapper, "args": args, "config": config}
    before = _policy_rewards(model, tokenizer, **measure)
    reward = PolarReward(reward_model, wrapper=wrapper, device="cpu")  # the quickstart runs on CPU by design
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=prompts)
    trainer.train()
    after = _policy_rewards(trainer.model, tokenizer, **measure)
    return {"steps": config.grpo_steps, "heldout_prompts": len(held_out), **_compare(before, after)}


def _policy_rewards(model: Any, tokenizer: Any, *, scorer: Any, rows: list, wrapper: str, args: Any, config) -> list:
    """Per held-out prompt, the mean reward of `grpo_samples` answers sampled as GRPO samples (same seed each time)."""
    import torch

    model.eval()
    prompts, references, answers = [], [], []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
            out = model.generate(
                ids,
                do_sample=True,
                max_new_tokens=config.max_new_tokens,
                num_return_sequences=config.grpo_samples,
                pad_token_id=tokenizer.pad_token_id,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                **args.generation_kwargs,
            )
            for seq in out:
                prompts.append(row["prompt"])
                references.append(row["reference"])
                answers.append(tokenizer.decode(seq[ids.shape[1] :], skip_special_tokens=True))
    torch.random.set_rng_state(generator_state)
    scores = scorer.score(prompts, references, answers, wrapper)
    k = config.grpo_samples
    return [sum(scores[i : i + k]) / k for i in range(0, len(scores), k)]


def _compare(before: list[float], after: list[float]) -> dict[str, Any]:
    """Mean reward before and after, and whether the change is larger than twice its standard error."""
    import statistics

    diffs = [a - b for a, b in zip(after, before, strict=True)]
    change = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    moved = abs(change) > 2 * stderr
    if moved:
        verdict = f"{'rose' if change > 0 else 'fell'} by {abs(change):.3f} (more than twice its standard error)"
    else:
        verdict = f"did not move: the change {change:+.3f} is within twice its standard error ({stderr:.3f})"
    return {
        "mean_reward_before": statistics.fmean(before),
        "mean_reward_after": statistics.fmean(after),
        "change": change,
        "stderr": stderr,
        "moved": moved,
        "verdict": verdict,
    }


def _table(summary: dict[str, Any]) -> str:
    grpo = summary["grpo"]
    scores = summary.get("mean_scores_after", {})
    rows = [
        ("training triples", str(summary["triples"]["train"])),
        ("held-out triples", str(summary["triples"]["heldout"])),
        ("held-out accuracy before training", f"{summary['accuracy_before']:.3f}"),
        ("held-out accuracy after training", f"{summary['accuracy_after']:.3f}"),
        *((f"mean score after, {label}", f"{scores[label]:.3f}") for label in RANK_LABELS.values() if label in scores),
        ("r(p, ref, ref) after", f"{summary['reference_self_score_after']:.3f}"),
    ]
    if grpo:
        rows += [
            (
                f"GRPO: mean reward on {grpo['heldout_prompts']} held-out prompts",
                f"{grpo['mean_reward_before']:.3f} before, {grpo['mean_reward_after']:.3f} after "
                f"{grpo['steps']} steps: {grpo['verdict']}",
            )
        ]
    else:
        rows.append(("GRPO", "skipped"))
    rows.append(("seconds per stage", ", ".join(f"{k} {v}" for k, v in summary["seconds"].items())))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'stage'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)
