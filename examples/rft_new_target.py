"""POLAR rewards closeness to whichever policy wrote the reference, even one it never saw: a laptop-scale check.

On CPU, offline, in a few minutes:

1. the quickstart's pipeline with a pool of four tiny policies: POLAR triples and a POLAR reward model;
2. a reference-free baseline trained with plain `trl.RewardTrainer` on pairs from the same triples, the chosen
   answer always written by one fixed pool policy (a conventional reward model that learned one notion of "good"),
   for the same number of optimizer steps at the same learning rate;
3. a new policy built like the pool's but never in it (the new target), which writes the references;
4. GRPO from the same start policy with each reward, measured on fixed held-out prompts by the mean per-token
   log-likelihood of the policy's answers under the new target and under the fixed policy (no reward model involved).

    python examples/rft_new_target.py --out-dir rft-new-target --seed 0

Its last line is one JSON object: per reward, the gain towards each policy and its standard error (between prompts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, FIXED = 0, 1  # pool policies: the one trained by GRPO, and the one the baseline learned to prefer


def reference_free_pairs(rows: list[dict], fixed: str) -> list[dict]:
    """Pairs whose chosen answer is the fixed policy's: every triple in which that policy wrote one answer.

    >>> rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "policy_a": "p1", "policy_b": "p0"},
    ...         {"prompt": "q", "chosen": "c", "rejected": "d", "policy_a": "p2", "policy_b": "p1"},
    ...         {"prompt": "r", "chosen": "e", "rejected": "f", "policy_a": "p2", "policy_b": "p3"}]
    >>> reference_free_pairs(rows, "p1")
    [{'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}, {'prompt': 'q', 'chosen': 'd', 'rejected': 'c'}]
    """
    pairs = []
    for row in rows:
        if fixed in (row["policy_a"], row["policy_b"]):
            ours, theirs = (
                (row["chosen"], row["rejected"]) if row["policy_a"] == fixed else (row["rejected"], row["chosen"])
            )
            pairs.append({"prompt": row["prompt"], "chosen": ours, "rejected": theirs})
    return pairs


def train_reference_free(rows: list[dict], out: Path, steps: int, config) -> str:
    """A conventional reward model: `trl.RewardTrainer` on (prompt, chosen, rejected) pairs from the same backbone."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    pairs = reference_free_pairs(rows, f"p{FIXED}")
    args = RewardConfig(
        output_dir=str(out / "reference-free-rm"), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=config.learning_rate, lr_scheduler_type="linear", save_strategy="no", report_to="none",
        use_cpu=True, seed=config.seed, activation_checkpointing=False, disable_tqdm=True, logging_steps=steps,
    )  # fmt: skip
    trainer = RewardTrainer(model=str(out / "backbone"), args=args, train_dataset=Dataset.from_list(pairs))
    trainer.remove_callback(PrinterCallback)  # its per-step dicts; the line below says what was trained
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"reference-free reward model: {len(pairs)} pairs, {steps} steps", flush=True)
    return args.output_dir


def rl_run(name: str, reward_funcs: list, references: dict | None, prompts, policies: dict, config, **kwargs):
    """GRPO of the start policy; the gains in the target's and the fixed policy's log-likelihood of its answers."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_polar.policy_shift import Tracker, grpo_args, target_loglik, train_grpo

    tokenizer = AutoTokenizer.from_pretrained(policies["start"])
    model = AutoModelForCausalLM.from_pretrained(policies["start"])
    measures = {k: target_loglik(AutoModelForCausalLM.from_pretrained(policies[k])) for k in ("new_target", "fixed")}
    tracker = Tracker(
        tokenizer, prompts["held_out"], measures, config.grpo_samples, config.max_new_tokens, config.seed
    )
    args = grpo_args(
        str(Path(config.out_dir) / f"grpo-{name}"), config.grpo_steps, config.grpo_learning_rate,
        config.max_new_tokens, config.seed,
        generation_kwargs={"suppress_tokens": model.generation_config.suppress_tokens},
    )  # fmt: skip
    rows = [{"prompt": p, **({"reference": references[p]} if references else {})} for p in prompts["train"]]
    print(f"\n== GRPO with the {name} reward", flush=True)
    train_grpo(model, reward_funcs, args, Dataset.from_list(rows), tracker, max(1, config.grpo_steps // 3), **kwargs)
    result = {}
    for key in ("new_target", "fixed"):
        change = tracker.change(key)
        result[f"gain_{key}"], result[f"stderr_{key}"] = change["change"], change["stderr"]
    return result


def main(argv: list[str] | None = None) -> dict:
    from trl_polar.quickstart import QuickstartConfig, quiet_libraries, run_quickstart

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="rft-new-target", help="Where models and data go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything.")
    cli = parser.parse_args(argv)
    # The quickstart's pipeline without its own GRPO stage: pool, triples, POLAR reward model (out/report.json).
    run_quickstart(QuickstartConfig(out_dir=cli.out_dir, num_policies=4, grpo_steps=0, seed=cli.seed))
    config = QuickstartConfig(out_dir=cli.out_dir, num_policies=4, seed=cli.seed)  # the RL runs: default steps
    with quiet_libraries():
        return compare(config)


def compare(config) -> dict:
    """The reference-free baseline, the new target and both RL runs; prints the table and the JSON line."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from trl_polar.data.loading import load_preference_dataset
    from trl_polar.policy_shift import sample_answers
    from trl_polar.rewards import PolarReward
    from trl_polar.tiny import build_tiny_policy_pool

    out = Path(config.out_dir)
    train_rows = list(load_preference_dataset(str(out / "triples")))
    # The POLAR model's optimizer steps: its training share of the triples, batch 8, `epochs` epochs.
    polar_rows = len(train_rows) - max(8, int(len(train_rows) * config.heldout_fraction))
    rm_steps = -(-polar_rows // 8) * int(config.epochs)
    baseline = train_reference_free(train_rows, out, rm_steps, config)

    pool = out / "policies"
    (new_target,) = build_tiny_policy_pool(
        AutoTokenizer.from_pretrained(pool / "policy_0"), pool, 1, seed=config.seed, first=config.num_policies
    )
    policies = {
        "start": str(pool / f"policy_{START}"),
        "fixed": str(pool / f"policy_{FIXED}"),
        "new_target": new_target,
    }
    all_prompts = list(dict.fromkeys(r["prompt"] for r in train_rows))
    prompts = {"train": all_prompts[config.grpo_eval_prompts :], "held_out": all_prompts[: config.grpo_eval_prompts]}
    tokenizer = AutoTokenizer.from_pretrained(new_target)
    written = sample_answers(AutoModelForCausalLM.from_pretrained(new_target), tokenizer, all_prompts, 1,
                             config.max_new_tokens, config.seed + 1, min_new_tokens=1)  # fmt: skip
    references = dict(zip(written.prompts, written.texts, strict=True))
    polar = PolarReward(str(out / "reward-model"), wrapper=train_rows[0]["wrapper"], device="cpu")
    results = {"polar": rl_run("POLAR", [polar], references, prompts, policies, config)}
    reward_model = AutoModelForSequenceClassification.from_pretrained(baseline, num_labels=1)
    results["reference_free"] = rl_run(
        "reference-free", [reward_model], None, prompts, policies, config,
        reward_processing_classes=[AutoTokenizer.from_pretrained(baseline)],
    )  # fmt: skip
    print_table(results, config)
    print(json.dumps(results))
    return results


def print_table(results: dict, config) -> None:
    where = f"{config.grpo_eval_prompts} held-out prompts x {config.grpo_samples} answers, {config.grpo_steps} steps"
    print(f"\nGain in the mean per-token log-likelihood of the policy's answers ({where}; +- stderr between prompts)")
    print(f"| reward         | towards the new target | towards the fixed policy p{FIXED} |")
    print("|----------------|------------------------|------------------------------|")
    for name, r in results.items():
        print(f"| {name:<14} | {r['gain_new_target']:+.3f} +- {r['stderr_new_target']:.3f} "
              f"{'':>7}| {r['gain_fixed']:+.3f} +- {r['stderr_fixed']:.3f} {'':>13}|")  # fmt: skip


if __name__ == "__main__":
    main()
