"""The README's main job: the whole pipeline on tiny models, offline, on CPU."""

from __future__ import annotations

import json
import math

from trl_polar.data.loading import load_preference_dataset
from trl_polar.quickstart import QuickstartConfig, run_quickstart


def test_quickstart_learns_to_discriminate_policies(tmp_path):
    summary = run_quickstart(QuickstartConfig(out_dir=str(tmp_path), grpo_steps=2))
    # Held-out triples never seen in training: the reward model learned which answers share the reference's policy.
    assert summary["accuracy_before"] < 0.6
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.15
    assert summary["accuracy_after"] >= 0.65
    totals = summary["triples"]["synthesis"]
    assert totals["triples"] == summary["triples"]["train"] + summary["triples"]["heldout"]
    assert totals["prompts"] == totals["triples"] + totals["dropped_empty"] + totals["duplicate_prompts"]
    rewards = summary["grpo"]["mean_reward_per_step"]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    assert json.loads((tmp_path / "report.json").read_text())["accuracy_after"] == summary["accuracy_after"]
    assert "held-out accuracy after" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "evaluation" / "scores_by_rank.png").stat().st_size > 1000
    # The build-data output directory loads as a training set, manifest metadata aside.
    assert len(load_preference_dataset(str(tmp_path / "triples"))) == totals["triples"]
