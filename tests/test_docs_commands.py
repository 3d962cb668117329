"""The training commands of README.md and docs/training.md, run as written at CPU size.

Each command keeps every flag the docs give (``--bf16 true``, the recipes and their scaling-law inputs),
with a tiny backbone and ``--use_cpu`` added; only the model and the data are swapped. A doc command that stops
working fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_data import toy_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch"]
ZERO2 = str(EXAMPLES / "accelerate_configs" / "deepspeed_zero2.yaml")

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture
def workdir(tmp_path, tiny_qwen2_lm_dir) -> Path:
    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16, seed=1)))
    (tmp_path / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16, seed=2)))
    (tmp_path / "lm").symlink_to(tiny_qwen2_lm_dir)
    return tmp_path


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_pretraining_then_fine_tuning_commands_of_docs_training(workdir):
    # docs/training.md, pre-training (paper §3.3) with the scaling-law recipe, on ZeRO-2.
    _run([*ACCELERATE, "--config_file", ZERO2, "-m", "trl_polar.cli", "train",
          "--recipe", "polar-pretrain", "--params", "1.7e9", "--base-tokens", "36e12", "--rm-tokens", "10e9",
          "--model_name_or_path", "lm", "--train_data", "pretrain.jsonl", "--output_dir", "polar-1.7b-base",
          "--per_device_train_batch_size", "8", "--bf16", "true", "--use_cpu"], workdir)  # fmt: skip
    assert (workdir / "polar-1.7b-base" / "config.json").is_file()
    # docs/training.md, fine-tuning from it with the fine-tuning recipe, plain and with LoRA.
    for extra, out in (([], "polar-1.7b"), (["--use_peft"], "polar-1.7b-lora")):
        _run([sys.executable, str(EXAMPLES / "train_polar.py"), "--recipe", "polar-finetune", "--params", "1.7e9",
              "--model_name_or_path", "polar-1.7b-base", "--train_data", "rankings.jsonl", "--output_dir", out,
              "--bf16", "true", *extra, "--use_cpu"], workdir)  # fmt: skip
        assert any((workdir / out).glob("*.safetensors"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_readme_train_command(workdir):
    # README.md: pre-training with the recipe on ZeRO-2 (the model and data swapped for tiny ones).
    _run([*ACCELERATE, "--config_file", ZERO2, "-m", "trl_polar.cli", "train", "--recipe", "polar-pretrain",
          "--params", "1.7e9", "--base-tokens", "36e12", "--rm-tokens", "10e9", "--model_name_or_path", "lm",
          "--train_data", "pretrain.jsonl", "--output_dir", "polar-1.7b-base", "--bf16", "true",
          "--use_cpu"], workdir)  # fmt: skip
    assert (workdir / "polar-1.7b-base" / "config.json").is_file()
