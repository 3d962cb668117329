"""Training on the library's own defaults, and every batching x bf16 x gradient-checkpointing combination.

TRL's RewardConfig turns bf16 and gradient checkpointing on by default; the real-scale commands in the docs pass
``--bf16`` and leave checkpointing on. These tests keep both as users get them.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from datasets import Dataset
from toy_data import toy_rows

from trl_polar.config import PolarConfig
from trl_polar.trainer import PolarRewardTrainer

BATCHINGS = ("padded", "packed", "shared_prefix")


def _train(tmp_path, model_dir, ds, eval_ds=None, **overrides):
    fields = {
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    args = PolarConfig(output_dir=str(tmp_path / "out"), **{**fields, **overrides})
    trainer = PolarRewardTrainer(model=model_dir, args=args, train_dataset=ds, eval_dataset=eval_ds)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_config_defaults_are_the_ones_the_matrix_covers():
    config = PolarConfig(output_dir="x", use_cpu=True)
    assert (config.batching, config.bf16, config.gradient_checkpointing) == ("shared_prefix", True, True)


def test_every_batching_bf16_and_checkpointing_combination_trains(tmp_path, tiny_qwen2_rm_dir):
    ds = Dataset.from_list(toy_rows(8, seed=3))
    losses = {}
    for batching, bf16, checkpointing in itertools.product(BATCHINGS, (False, True), (False, True)):
        _, curve = _train(tmp_path, tiny_qwen2_rm_dir, ds, batching=batching, bf16=bf16,
                          gradient_checkpointing=checkpointing)  # fmt: skip
        assert len(curve) == 2 and all(math.isfinite(x) for x in curve), (batching, bf16, checkpointing, curve)
        losses[batching, bf16, checkpointing] = curve
    reference = losses["padded", False, False]
    for (batching, bf16, checkpointing), curve in losses.items():
        if bf16:
            # bf16 keeps about 3 significant digits; the run must follow the fp32 run, not just finish.
            assert curve == pytest.approx(reference, abs=2e-2), (batching, checkpointing)
        else:
            # fp32: every batching and checkpointing gives the same losses, step after step.
            assert curve == pytest.approx(reference, abs=1e-5), (batching, checkpointing)


def test_shared_prefix_evaluates_under_bf16(tmp_path, tiny_qwen2_rm_dir):
    # Evaluation runs without gradients, so on CPU it takes the log-sum-exp split under bf16 autocast.
    ds = Dataset.from_list(toy_rows(8, seed=3))
    metrics = {}
    for batching in ("padded", "shared_prefix"):
        trainer, _ = _train(tmp_path, tiny_qwen2_rm_dir, ds, eval_ds=ds, batching=batching, max_steps=1)
        metrics[batching] = trainer.evaluate()
    assert metrics["shared_prefix"]["eval_loss"] == pytest.approx(metrics["padded"]["eval_loss"], abs=2e-2)
    assert metrics["shared_prefix"]["eval_mean_reward"] == pytest.approx(
        metrics["padded"]["eval_mean_reward"], abs=1e-2
    )


def test_train_command_on_its_defaults(tmp_path, tiny_qwen2_lm_dir):
    """`trl-polar train --config x.yaml` with only the model, the data, an output dir and use_cpu (docs/training.md).

    Everything else is the default: shared_prefix batching, bf16, gradient checkpointing, batch size 8, 3 epochs.
    A causal-LM backbone gets a zero value head, so the first loss is exactly log 2.
    """
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(16, seed=1)))
    config = tmp_path / "x.yaml"
    out = tmp_path / "polar-rm"
    config.write_text(
        yaml.safe_dump(
            {"model_name_or_path": tiny_qwen2_lm_dir, "train_data": str(data), "output_dir": str(out), "use_cpu": True}
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["max_steps"] == 6  # 16 rows / batch 8 x 3 epochs
    summary = next(ast.literal_eval(line) for line in run.stdout.splitlines() if "'train_loss'" in line)
    # From a zero head (loss log 2 at the first step) the toy task is learnt a little in 6 steps.
    assert 0.5 < float(summary["train_loss"]) < math.log(2)
    assert float(summary["accuracy"]) > 0.5
    from transformers import AutoModelForSequenceClassification

    from trl_polar.template import PolarTemplate

    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    template = PolarTemplate.from_pretrained(str(out))
    ids = torch.tensor([template.encode("Question 0: one two", "one two", "one two")])
    assert model(input_ids=ids).logits.shape == (1, 1)
    # The head learned: it is no longer the zero head a causal LM starts with.
    assert model.score.weight.abs().sum().item() > 0


def test_max_packed_length_is_the_old_name_of_max_row_length():
    with pytest.warns(FutureWarning, match="max_row_length"):
        config = PolarConfig(output_dir="x", use_cpu=True, max_packed_length=64)
    assert (config.max_row_length, config.max_packed_length) == (64, None)
    with pytest.raises(ValueError, match="same setting"):
        PolarConfig(output_dir="x", use_cpu=True, max_packed_length=64, max_row_length=32)
    with pytest.raises(ValueError, match="`max_row_length` must be a positive integer or None, got 0"):
        PolarConfig(output_dir="x", use_cpu=True, max_row_length=0)


def test_a_bad_margin_names_its_row_and_column(tmp_path, tiny_qwen2_rm_dir):
    rows = toy_rows(4, seed=5, margin=True)
    rows[2]["margin"] = float("nan")
    with pytest.raises(ValueError, match=r"^train dataset, index 2, column `margin`: must be a finite number, got na"):
        _train(tmp_path, tiny_qwen2_rm_dir, Dataset.from_list(rows), bf16=False)
