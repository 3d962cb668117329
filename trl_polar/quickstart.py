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

import contextlib
import json
import logging
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Every model here loads without remote code, so no step stops to ask whether to trust it. The recipes set the
# paper's optimisation (learning rate from the scaling laws, batch, one epoch, schedule), not TRL's defaults.
REAL_SCALE = """\
The same pipeline at real scale (GPUs; see docs/):
  trl-polar build-data --policies a=Qwen/Qwen2.5-1.5B:base --policies b=meta-llama/Llama-3.2-1B:base \\
      --policies c=HuggingFaceTB/SmolLM2-1.7B:base --corpus corpus.jsonl --num-prompts 100000 \\
      --out polar-pt --backend vllm
  accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml -m trl_polar.cli train \\
      --recipe polar-pretrain --params 6e8 --base-tokens 3.6e13 --rm-tokens 1e9 \\
      --model_name_or_path Qwen/Qwen3-0.6B --train_data polar-pt --output_dir polar-rm --bf16 true
  accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml -m trl_polar.cli train \\
      --recipe polar-finetune --params 6e8 --model_name_or_path polar-rm --train_data preferences.jsonl \\
      --output_dir polar-rm-sft --bf16 true
  trl-polar evaluate --model polar-rm-sft --data heldout.jsonl --out eval/
  accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/grpo_polar.py \\
      --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model polar-rm-sft --dataset rl_prompts.jsonl \\
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
    """Sizes of the quickstart run; the defaults finish in about 30 s (30 s of CPU) on two CPU cores."""

    out_dir: str = field(default="polar-quickstart", metadata={"help": "Where data, models and the report go."})
    num_policies: int = field(default=2, metadata={"help": "Tiny policies in the pool."})
    num_prompts: int = field(default=320, metadata={"help": "Prompts answered by the pool (train + held out)."})
    heldout_fraction: float = field(default=0.25, metadata={"help": "Share of triples kept for evaluation."})
    max_new_tokens: int = field(default=24, metadata={"help": "Tokens each policy writes per answer."})
    epochs: float = field(default=4.0, metadata={"help": "Reward-model training epochs."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Reward-model learning rate (tiny models)."})
    grpo_steps: int = field(default=12, metadata={"help": "GRPO steps at the end (0 skips the RL stage)."})
    grpo_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the GRPO stage."})
    grpo_eval_prompts: int = field(
        default=16,
        metadata={"help": "Held-out prompts on which the policy's mean reward is measured before and after."},
    )
    grpo_samples: int = field(default=8, metadata={"help": "Answers sampled per held-out prompt for each measure."})
    seed: int = field(default=0, metadata={"help": "Seed of everything."})


def _corpus(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"text": f"Document {i} is about {rng.choice(CORPUS_TOPICS)}. It says that {rng.choice(CORPUS_TOPICS)} "
                 f"matters because of {rng.choice(CORPUS_TOPICS)}, and it ends here."}
        for i in range(n)
    ]  # fmt: skip


def _removals(totals: dict[str, int]) -> str:
    """The synthesis totals in words.

    >>> print(_removals({"prompts": 9, "dropped_empty": 1, "duplicate_prompts": 0, "generations": 27,
    ...                  "hit_max_new_tokens": 4}))
    removals: 1 of 9 prompts (an empty answer), 0 duplicate prompts; 4 of 27 answers stopped at max_new_tokens (kept)
    """
    return (
        f"removals: {totals['dropped_empty']} of {totals['prompts']} prompts (an empty answer), "
        f"{totals['duplicate_prompts']} duplicate prompts; {totals['hit_max_new_tokens']} of {totals['generations']} "
        "answers stopped at max_new_tokens (kept)"
    )


@contextlib.contextmanager
def quiet_libraries():
    """Stage lines and our own progress only: no weight-loading bars or load reports from the libraries."""
    import datasets
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            # TRL 1.16's GRPO reads transformers' deprecated `is_gradient_checkpointing` / `gradient_checkpointing_*`
            # itself; our own configs use the new `activation_checkpointing` names.
            warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


def _stage(name: str):
    logger.info("== %s", name)
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run_quickstart(config: QuickstartConfig | None = None) -> dict[str, Any]:
    """Run every stage and return the summary (also written to ``out_dir/report.json`` and ``summary.md``)."""

    import torch

    config = config or QuickstartConfig()
    threads = torch.get_num_threads()
    # Models this small gain nothing from a second thread; on a busy machine its spinning costs CPU and time.
    torch.set_num_threads(1)
    try:
        with quiet_libraries():
            return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: QuickstartConfig) -> dict[str, Any]:
    import torch

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
    print(f"{len(train_rows)} training and {len(eval_rows)} held-out triples; {_removals(totals)}")

    before, after, reward_model = _train_and_evaluate(train_rows, eval_rows, out, config, timings)

    grpo: dict[str, Any] = {}
    if config.grpo_steps > 0:
        start = _stage(f"5/5 {config.grpo_steps} GRPO steps rewarded by the trained model")
        grpo = _grpo(policies, reward_model, train_rows, eval_rows, out, config)
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
            progress=sys.stderr.isatty(),  # tqdm bars in a log file are lines of escape codes
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
    from transformers import AutoTokenizer, PrinterCallback

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
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=config.seed,
        activation_checkpointing=False,  # a tiny model has no memory to save
        disable_tqdm=True,  # `_Progress` prints one line per logging step instead of the trainer's dicts
    )
    trainer = PolarRewardTrainer(model=str(out / "backbone"), args=args, train_dataset=Dataset.from_list(train_rows))
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress())
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


def _progress():
    """A `TrainerCallback` printing one line per logging step: the step, the loss and the batch accuracy."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                accuracy = f", batch accuracy {float(logs['accuracy']):.2f}" if "accuracy" in logs else ""
                print(f"  step {state.global_step:>4}/{state.max_steps}: loss {float(logs['loss']):.3f}{accuracy}")

    return Progress()


def _write_summary(summary: dict[str, Any], out: Path) -> None:
    from .atomic import write_text

    write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    if summary["grpo"]:
        _plot_grpo(summary["grpo"], out / "evaluation" / "grpo_measures.png")
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


def _grpo(policies: list[str], reward_model: str, train_rows, eval_rows, out: Path, config: QuickstartConfig) -> dict:
    """GRPO of policy 0 rewarded by POLAR against references written by policy 1 (the target), measured on fixed
    held-out prompts by its POLAR reward and by the target's log-likelihood of its answers."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .policy_shift import Tracker, grpo_args, polar_reward_measure, sample_answers, target_loglik, train_grpo
    from .rewards import PolarReward
    from .scorer import PolarScorer

    tokenizer = AutoTokenizer.from_pretrained(policies[0])
    model = AutoModelForCausalLM.from_pretrained(policies[0])
    target = AutoModelForCausalLM.from_pretrained(policies[1])
    wrapper = train_rows[0]["wrapper"]  # the synthesised rows' wrapper, which the reward model was trained with
    held_out = list(dict.fromkeys(r["prompt"] for r in eval_rows))[: config.grpo_eval_prompts]
    train_prompts = list(dict.fromkeys(r["prompt"] for r in train_rows))
    written = sample_answers(
        target, tokenizer, train_prompts + held_out, 1, config.max_new_tokens, config.seed + 1, min_new_tokens=1
    )
    references = dict(zip(written.prompts, written.texts, strict=True))
    measures = {
        "reward": polar_reward_measure(PolarScorer(reward_model), references, wrapper),
        "target_loglik": target_loglik(target),
    }
    tracker = Tracker(tokenizer, held_out, measures, config.grpo_samples, config.max_new_tokens, config.seed)
    args = grpo_args(
        str(out / "grpo"), config.grpo_steps, config.grpo_learning_rate, config.max_new_tokens, config.seed,
        # GRPO builds its own sampling settings: the policy keeps to the pool's shared vocabulary.
        generation_kwargs={"suppress_tokens": model.generation_config.suppress_tokens},
    )  # fmt: skip
    dataset = Dataset.from_list([{"prompt": p, "reference": references[p]} for p in train_prompts])
    reward = PolarReward(reward_model, wrapper=wrapper, device="cpu")  # the quickstart runs on CPU by design
    train_grpo(model, [reward], args, dataset, tracker, every=max(1, config.grpo_steps // 3))
    return _verdict(tracker, config.grpo_steps)


def _verdict(tracker: Any, steps: int) -> dict[str, Any]:
    """The report's ``grpo`` object: both measures before and after, their standard errors, and whether both rose
    by more than 3 standard errors."""
    reward, loglik = tracker.change("reward"), tracker.change("target_loglik")
    moved = all(m["change"] > 3 * m["stderr"] for m in (reward, loglik))
    return {
        "reward_before": reward["before"],
        "reward_after": reward["after"],
        "reward_stderr": reward["stderr"],
        "target_loglik_before": loglik["before"],
        "target_loglik_after": loglik["after"],
        "target_loglik_stderr": loglik["stderr"],
        "moved": moved,
        "steps": steps,
        "heldout_prompts": len(tracker.prompts),
        "samples_per_prompt": tracker.samples,
        # Each measurement's mean over prompts and its standard error (between prompts), for the plot.
        "history": [
            {"step": row["step"], **{k + part: x for k, v in row.items() if k != "step" for part, x in _mean_se(v)}}
            for row in tracker.history
        ],
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
        where = f"{grpo['heldout_prompts']} held-out prompts x {grpo['samples_per_prompt']} answers"
        rows += [
            (f"GRPO ({grpo['steps']} steps): mean POLAR reward", _change(grpo, "reward")),
            ("GRPO: target's log-likelihood per token", _change(grpo, "target_loglik")),
            ("GRPO: moved towards the target", f"{'yes' if grpo['moved'] else 'no'} (both rise > 3 stderr; {where})"),
        ]
    else:
        rows.append(("GRPO", "skipped"))
    rows.append(("seconds per stage", ", ".join(f"{k} {v}" for k, v in summary["seconds"].items())))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'stage'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _mean_se(values: list[float]) -> list[tuple[str, float]]:
    return [("", statistics.fmean(values)), ("_stderr", statistics.stdev(values) / len(values) ** 0.5)]


def _plot_grpo(grpo: dict[str, Any], path: Path) -> None:
    """Both measures over the GRPO steps, each with its standard error between prompts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no GRPO plot (pip install 'trl-polar[plot]').")
        return
    from .atomic import atomic_write

    steps = [row["step"] for row in grpo["history"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = {"reward": "mean POLAR reward", "target_loglik": "target's log-likelihood per token"}
    for ax, (name, label) in zip(axes, names.items(), strict=True):
        means = [row[name] for row in grpo["history"]]
        errors = [row[f"{name}_stderr"] for row in grpo["history"]]
        ax.errorbar(steps, means, yerr=errors, marker="o", capsize=3)
        ax.set_xlabel("GRPO step")
        ax.set_title(label)
    fig.suptitle(f"Held-out prompts: {grpo['heldout_prompts']} x {grpo['samples_per_prompt']} answers; moved: "
                 f"{'yes' if grpo['moved'] else 'no'}")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def _change(grpo: dict[str, Any], name: str) -> str:
    before, after, stderr = grpo[f"{name}_before"], grpo[f"{name}_after"], grpo[f"{name}_stderr"]
    return f"{before:.3f} -> {after:.3f} (change {after - before:+.3f} +- {stderr:.3f} stderr)"
