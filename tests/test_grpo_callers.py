"""TRL 1.16's own GRPOTrainer with PolarReward and AsyncPolarReward beside a plain reward function: rows that fail
get None under on_error="none", and TRL's logged rewards are those of the other rows (tiny models, one step on CPU).
"""

from __future__ import annotations

import math

import pytest

from trl_polar.rewards import strip_think
from trl_polar.scorer import PolarScorer

N_PROMPTS = 4


def test_grpo_trainer_with_failed_rows(tmp_path, tiny_qwen2_lm_dir, tiny_qwen2_rm_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trl_polar.rewards import AsyncPolarReward, PolarReward

    seen = []

    def length(prompts, completions, reference, **kwargs):
        # A plain reward beside POLAR's; it also notes what TRL passed, in TRL's order.
        seen.extend(zip(prompts, completions, reference, strict=True))
        return [float(len(c)) for c in completions]

    # The references are message lists; in rows 1 and 3 the message has no content, which the scorer refuses: those
    # rows fail (they are not missing a reference), and only they.
    dataset = Dataset.from_dict(
        {
            "prompt": [f"Question {i}: what is {i} plus {i}?" for i in range(N_PROMPTS)],
            "reference": [
                [{"role": "assistant", "content": f"The answer is {2 * i}." if i % 2 == 0 else None}]
                for i in range(N_PROMPTS)
            ],
        }
    )
    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    polar = PolarReward(scorer, on_error="none")
    polar_async = AsyncPolarReward(scorer, on_error="none", name="polar_async")
    args = GRPOConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to="none", max_steps=1,
        per_device_train_batch_size=8, num_generations=2, max_completion_length=8, logging_steps=1,
        save_strategy="no", seed=0,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_lm_dir, padding_side="left")
    trainer = GRPOTrainer(
        model=tiny_qwen2_lm_dir,
        reward_funcs=[polar, polar_async, length],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "rewards/polar_reward/mean" in entry)
    assert len(seen) == 8
    scored = [(p, c, ref) for p, c, ref in seen if ref[0]["content"] is not None]
    assert len(scored) == 4
    expected = scorer.score(
        [p for p, _, _ in scored], [r for _, _, r in scored], [strip_think(c) for _, c, _ in scored]
    )
    mean = sum(expected) / len(expected)
    # TRL averages each reward over the rows that got one: POLAR's mean is that of the scored rows alone.
    assert log["rewards/polar_reward/mean"] == pytest.approx(mean, abs=1e-4)
    assert log["rewards/polar_async/mean"] == pytest.approx(mean, abs=1e-4)
    assert log["polar_reward/failed_frac"] == log["polar_async/failed_frac"] == pytest.approx(0.5)
    assert log["polar_reward/missing_reference_frac"] == 0.0
    assert log["rewards/length/mean"] == pytest.approx(sum(len(c) for _, c, _ in seen) / 8)
    assert math.isfinite(log["loss"])
