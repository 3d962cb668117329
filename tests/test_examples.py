"""The RL example scripts run as users run them (one CPU process; 2-process runs: test_grpo_multiprocess)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["grpo_polar.py", "rloo_polar.py"])
def test_rl_example_trains_with_a_polar_reward(tmp_path, script, tiny_qwen2_rm_dir, tiny_qwen2_lm_dir):
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "reference": str(2 * i)} for i in range(8)]
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--model_name_or_path", tiny_qwen2_lm_dir,
         "--reward_model", tiny_qwen2_rm_dir, "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
         "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
         "--max_completion_length", "8", "--use_cpu", "--report_to", "none", "--logging_steps", "1"],
        capture_output=True, text=True, timeout=300, check=False, cwd=EXAMPLES,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    step = _step_metrics(out.stdout + out.stderr)
    # The reward TRL trained on is POLAR's raw score (no normalisation by default), for every completion: its mean
    # is PolarReward's own raw mean, and a sign flip or a lost row anywhere between the two would show here.
    assert step["rewards/polar_reward/mean"] == pytest.approx(step["polar_reward/raw_mean"], rel=2e-3)
    assert step["polar_reward/failed_frac"] == 0 and step["polar_reward/missing_reference_frac"] == 0
    # The completions of a group score differently, so the policy gets an advantage signal and a gradient...
    assert step["polar_reward/raw_min"] < step["polar_reward/raw_mean"] < step["polar_reward/raw_max"]
    assert step["rewards/polar_reward/std"] > 0 and math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    # ...and the saved policy moved from where it started (one Adam step of size ~lr = 1e-6 on each weight).
    trained, initial = (load_file(Path(d) / "model.safetensors") for d in (tmp_path / "out", tiny_qwen2_lm_dir))
    moved = max((trained[name].float() - initial[name].float()).abs().max().item() for name in initial)
    assert 5e-7 < moved < 1e-4


def _step_metrics(logs: str) -> dict[str, float]:
    """The metrics TRL printed for the training step (the dict that holds the reward's mean)."""
    for line in logs.splitlines():
        if "'rewards/polar_reward/mean'" in line:
            return {key: float(value) for key, value in ast.literal_eval(line[line.index("{") :]).items()}
    raise AssertionError(f"no reward metrics in the log: {logs[-3000:]}")
