"""The README's main job: the whole pipeline on tiny models, offline, on CPU."""

from __future__ import annotations

import json
import math

from trl_polar.data.loading import load_preference_dataset
from trl_polar.quickstart import QuickstartConfig, run_quickstart


def test_quickstart_learns_to_discriminate_policies(tmp_path):
    summary = run_quickstart(QuickstartConfig(out_dir=str(tmp_path), grpo_steps=2))
    # Held-out triples never seen in training: the reward model learned which answers share the reference's policy.
    assert summary["accuracy_before"] < 0.7
    assert summary["accuracy_after"] >= 0.95
    scores = summary["mean_scores_after"]
    assert scores["same policy as the reference"] > scores["another policy"]
    totals = summary["triples"]["synthesis"]
    assert totals["triples"] == summary["triples"]["train"] + summary["triples"]["heldout"]
    assert totals["prompts"] == totals["triples"] + totals["dropped_empty"] + totals["duplicate_prompts"]
    # GRPO is measured on one fixed set of held-out prompts before and after, and the verdict says which it was.
    grpo = summary["grpo"]
    assert grpo["steps"] == 2 and grpo["heldout_prompts"] == 16
    assert all(math.isfinite(grpo[k]) for k in ("mean_reward_before", "mean_reward_after", "change", "stderr"))
    assert math.isclose(grpo["change"], grpo["mean_reward_after"] - grpo["mean_reward_before"], abs_tol=1e-9)
    assert grpo["verdict"].startswith(("rose", "fell") if grpo["moved"] else "did not move")
    assert json.loads((tmp_path / "report.json").read_text())["accuracy_after"] == summary["accuracy_after"]
    table = (tmp_path / "summary.md").read_text()
    assert "held-out accuracy after training" in table and grpo["verdict"] in table
    assert "mean score after, same policy as the reference" in table and "rank_1" not in table
    evaluation = (tmp_path / "evaluation" / "summary.md").read_text()
    assert "| same policy as the reference |" in evaluation and "| another policy |" in evaluation
    assert (tmp_path / "evaluation" / "scores_by_rank.png").stat().st_size > 1000
    # The build-data output directory loads as a training set, manifest metadata aside.
    assert len(load_preference_dataset(str(tmp_path / "triples"))) == totals["triples"]
