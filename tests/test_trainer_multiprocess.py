"""2-process training exactly as users launch it: `accelerate launch examples/train_polar.py` on CPU (gloo).

The saved weights of a 2-process run (2 x 2 rows per step) must equal a 1-process run (4 rows per step): same data,
same steps, gradients averaged across ranks.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from toy_data import toy_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_polar.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"
ACCELERATE = Path(sys.executable).with_name("accelerate")

pytestmark = pytest.mark.multiprocess


def _train_args(model_dir, data, out, per_device):
    return [
        str(SCRIPT),
        "--model_name_or_path",
        model_dir,
        "--train_data",
        data,
        "--output_dir",
        out,
        "--use_cpu",
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "false",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        str(per_device),
        "--learning_rate",
        "1e-3",
        "--max_length",
        "1024",
        "--max_response_length",
        "384",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--seed",
        "3",
        "--disable_tqdm",
        "true",
    ]


def _run(command, timeout):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory, tiny_qwen2_rm_dir):
    """The toy data as JSONL, and the single-process run every multi-process run must reproduce."""
    root = tmp_path_factory.mktemp("mp")
    data = str(root / "train.jsonl")
    Dataset.from_list(toy_rows(24, seed=2)).to_json(data)
    reference = str(root / "single")
    _run([sys.executable, *_train_args(tiny_qwen2_rm_dir, data, reference, per_device=4)], timeout=240)
    trained, initial = _weights(reference), _weights(tiny_qwen2_rm_dir)
    # Equal weights prove nothing if training left them where they started: the value head and most tensors must
    # have moved by far more than the tolerance the runs are compared at.
    moved = {
        name for name, value in trained.items() if (value.float() - initial[name].float()).abs().max() > 100 * ATOL
    }
    assert "score.weight" in moved and len(moved) > len(trained) // 2, sorted(set(trained) - moved)
    return data, trained


ATOL = 1e-5


def _assert_same_weights(out, reference):
    weights = _weights(out)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(
            weights[name].float(), value.float(), atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_ddp_two_processes_equal_single_process(tmp_path, tiny_qwen2_rm_dir, data_and_reference):
    data, reference = data_and_reference
    out = str(tmp_path / "ddp")
    log = _run(
        [
            str(ACCELERATE),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *_train_args(tiny_qwen2_rm_dir, data, out, per_device=2),
        ],
        timeout=240,
    )
    # 24 rows, 3 steps of 2 ranks x 2 rows: half an epoch (a silent single-process run would report 0.25).
    assert "'epoch': '0.5'" in log or "'epoch': 0.5" in log, log[-2000:]
    _assert_same_weights(out, reference)
    assert (Path(out) / "README.md").is_file()


# Slow: the first DeepSpeed run on a machine JIT-compiles its CPU communication op (~40-80 s); later runs take ~25 s.
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equal_single_process(tmp_path, tiny_qwen2_rm_dir, data_and_reference, stage):
    data, reference = data_and_reference
    out = str(tmp_path / f"zero{stage}")
    _run(
        [
            str(ACCELERATE),
            "launch",
            "--config_file",
            str(CONFIGS / f"deepspeed_zero{stage}.yaml"),
            *_train_args(tiny_qwen2_rm_dir, data, out, per_device=2),
        ],
        timeout=420,
    )
    _assert_same_weights(out, reference)
