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


def _bf16_rounding(value: float) -> float:
    """Half a bf16 step at ``value``: how far rounding a number to bf16 (8 significant bits) may move it.

    >>> _bf16_rounding(0.68)
    0.001953125
    """
    return 2.0 ** (math.floor(math.log2(abs(value))) - 8)


def _update(trainer, initial: dict) -> torch.Tensor:
    """What training changed: every parameter minus its value in the checkpoint, as one vector."""
    named = dict(trainer.model.named_parameters())
    return torch.cat([(named[name].detach().float() - value.float()).flatten() for name, value in initial.items()])


def test_every_batching_bf16_and_checkpointing_combination_trains(tmp_path, tiny_qwen2_rm_dir):
    """Each combination follows the fp32 run, within what bf16 costs the plain path, on a signal far larger.

    Measured here: training moves the second loss by 0.015 (against a run at lr 0); bf16 costs the plain (padded)
    path 1e-4 on the losses and 0.3% of the update's direction. The packed and shared-prefix paths return the loss
    rounded to bf16 (it sits on the bf16 grid: 0.6796875), so theirs may also be off by half a bf16 step (2e-3).
    A zero gradient, a sign flip or a lost row in any path moves a loss or the update by far more.
    """
    from safetensors.torch import load_file

    initial = load_file(f"{tiny_qwen2_rm_dir}/model.safetensors")
    ds = Dataset.from_list(toy_rows(8, seed=3))
    losses, updates = {}, {}
    for batching, bf16, checkpointing in itertools.product(BATCHINGS, (False, True), (False, True)):
        trainer, curve = _train(tmp_path, tiny_qwen2_rm_dir, ds, batching=batching, bf16=bf16,
                                gradient_checkpointing=checkpointing)  # fmt: skip
        assert len(curve) == 2 and all(math.isfinite(x) for x in curve), (batching, bf16, checkpointing, curve)
        key = (batching, bf16, checkpointing)
        losses[key], updates[key] = curve, _update(trainer, initial)
    _, untrained = _train(tmp_path, tiny_qwen2_rm_dir, ds, batching="padded", bf16=False, learning_rate=0.0)
    reference, update = losses["padded", False, False], updates["padded", False, False]

    def direction(u: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(u, update, dim=0).item()

    plain_loss_error = max(abs(a - b) for a, b in zip(losses["padded", True, False], reference, strict=True))
    plain_direction_error = 1 - direction(updates["padded", True, False])
    assert 0 < plain_loss_error < 1e-3 and 0 < plain_direction_error < 0.02  # bf16 really ran, and is close
    loss_tolerance = 2 * plain_loss_error + _bf16_rounding(max(reference))
    assert abs(reference[1] - untrained[1]) > 3 * loss_tolerance  # the step moved the loss: there is a signal
    for (batching, bf16, checkpointing), curve in losses.items():
        key = (batching, checkpointing)
        if bf16:
            assert curve == pytest.approx(reference, abs=loss_tolerance), key
            assert 1 - direction(updates[batching, bf16, checkpointing]) <= 2 * plain_direction_error, key
        else:
            # fp32: every batching and checkpointing gives the same losses and the same update, step after step.
            assert curve == pytest.approx(reference, abs=1e-5), key
            torch.testing.assert_close(updates[batching, bf16, checkpointing], update, atol=1e-6, rtol=0)


def test_shared_prefix_evaluates_under_bf16(tmp_path, tiny_qwen2_rm_dir):
    """Evaluation runs without gradients, so on CPU it takes the log-sum-exp split under bf16 autocast. Its metrics
    follow the fp32 ones within what bf16 costs the plain (padded) path, and they moved with the training step by
    far more (measured: eval loss 0.686 -> 0.667, mean reward -0.018 -> 0.021 after one step)."""
    ds = Dataset.from_list(toy_rows(8, seed=3))
    metrics = {}
    for batching, bf16 in (("padded", False), ("padded", True), ("shared_prefix", True)):
        trainer, _ = _train(tmp_path, tiny_qwen2_rm_dir, ds, eval_ds=ds, batching=batching, max_steps=1, bf16=bf16)
        metrics[batching, bf16] = trainer.evaluate()
    args = PolarConfig(output_dir=str(tmp_path / "untrained"), use_cpu=True, report_to="none", max_steps=1,
                       bf16=False, batching="padded")  # fmt: skip
    untrained = PolarRewardTrainer(model=tiny_qwen2_rm_dir, args=args, train_dataset=ds, eval_dataset=ds).evaluate()
    fp32, plain, shared = metrics["padded", False], metrics["padded", True], metrics["shared_prefix", True]
    for name in ("eval_loss", "eval_mean_reward"):
        plain_error = abs(plain[name] - fp32[name])
        assert 0 < plain_error < 5e-3, name
        # The shared-prefix path returns the loss in bf16 (on the bf16 grid): half a bf16 step more for the loss.
        tolerance = 2 * plain_error + (_bf16_rounding(fp32[name]) if name == "eval_loss" else 0.0)
        assert shared[name] == pytest.approx(fp32[name], abs=tolerance), name
        assert abs(fp32[name] - untrained[name]) > 3 * tolerance, name  # the metric moved: there is a signal


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


def test_a_bad_margin_names_its_row_and_column(tmp_path, tiny_qwen2_rm_dir):
    rows = toy_rows(4, seed=5, margin=True)
    rows[2]["margin"] = float("nan")
    with pytest.raises(ValueError, match=r"^train dataset, index 2, column `margin`: must be a finite number, got na"):
        _train(tmp_path, tiny_qwen2_rm_dir, Dataset.from_list(rows), bf16=False)


def test_max_row_length_must_be_positive():
    with pytest.raises(ValueError, match="`max_row_length` must be a positive integer or None, got 0"):
        PolarConfig(output_dir="x", use_cpu=True, max_row_length=0)
