"""The RL example scripts run as users run them (one CPU process; 2-process runs: test_grpo_multiprocess)."""

from __future__ import annotations

import ast
import json
import math
import os
import re
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


def test_grpo_example_scores_with_a_served_reward(tmp_path, tiny_qwen2_rm_dir, tiny_qwen2_lm_dir):
    pytest.importorskip("fastapi")
    import httpx
    from serving_helpers import API_KEY, start_servers

    (server,) = start_servers((tiny_qwen2_rm_dir, ("--api-key", API_KEY)))
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "reference": str(2 * i)} for i in range(4)]
    data = tmp_path / "rl.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "grpo_polar.py"), "--model_name_or_path", tiny_qwen2_lm_dir,
             "--reward_url", server.url, "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
             "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
             "--max_completion_length", "8", "--use_cpu", "--report_to", "none", "--logging_steps", "1"],
            capture_output=True, text=True, timeout=300, check=False, cwd=EXAMPLES,
            env={**os.environ, "TRL_POLAR_API_KEY": API_KEY},
        )  # fmt: skip
        metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    means = re.findall(r"'rewards/polar_reward/mean': '([^']+)'", out.stdout + out.stderr)
    assert means and all(math.isfinite(float(m)) for m in means)
    # The 4 completions of the one step were scored by the server (it counts the items it scored).
    scored = re.findall(r'^polar_items_total\{endpoint="/score"\} ([0-9.e+]+)$', metrics.text, re.M)
    assert scored and float(scored[0]) >= 4


def test_grpo_example_refuses_a_url_as_reward_model(tmp_path):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "grpo_polar.py"), "--model_name_or_path", "policy", "--reward_model",
         "http://10.0.0.5:8000", "--dataset", "rl.jsonl", "--output_dir", str(tmp_path / "out"), "--use_cpu"],
        capture_output=True, text=True, timeout=120, check=False, cwd=EXAMPLES,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--reward_url http://10.0.0.5:8000" in errors[0]


def test_the_7b_grpo_recipe_of_docs_rl_uses_only_flags_the_script_takes():
    import importlib.util
    import shlex

    from transformers import HfArgumentParser
    from trl import GRPOConfig

    text = (EXAMPLES.parent / "docs" / "rl.md").read_text()
    section = text[text.index("## GRPO at 7B on 8 GPUs") : text.index("## Pre-flight")]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    launch = " ".join(line.rstrip("\\ ") for line in commands[0].splitlines() if not line.startswith("trl-polar"))
    argv = shlex.split(launch)
    argv = argv[argv.index(next(a for a in argv if a.endswith("grpo_polar.py"))) + 1 :]
    spec = importlib.util.spec_from_file_location("grpo_polar", EXAMPLES / "grpo_polar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_polar"] = module  # dataclasses resolve the script's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["grpo_polar"]
    parser = HfArgumentParser((module.PolarRLArguments, GRPOConfig))
    namespace, unknown = parser.parse_known_args(argv)
    assert not unknown, f"docs/rl.md's 7B command passes flags grpo_polar.py does not take: {unknown}"
    assert namespace.vllm_mode == "colocate" and namespace.reward_model == "./POLAR-7B-llama"
    assert "grpo_7b_zero3.yaml" in launch
    # The served variant: the same script with two replicas.
    served = shlex.split(" ".join(line.rstrip("\\ ") for line in commands[1].splitlines() if "grpo_polar" in line))
    urls = served[served.index("--reward_urls") + 1 : served.index("...")]
    required = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"]
    assert parser.parse_known_args([*required, "--reward_urls", *urls])[0].reward_urls == urls
