"""POLAR's recipes: the paper's hyperparameters, set by `PolarConfig.from_recipe` and `trl-polar train --recipe`,
and read back from what the trainer ran with (optimizer, scheduler, logged learning rates)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from toy_data import toy_rows
from typer.testing import CliRunner

from trl_polar.cli import app
from trl_polar.cli.train import parse_train_args
from trl_polar.config import PolarConfig
from trl_polar.recipes import recipe_values
from trl_polar.scaling import polar_learning_rate

FAST_FLAGS = ["--use_cpu", "true", "--report_to", "none", "--bf16", "false", "--gradient_checkpointing", "false",
              "--max_length", "1024", "--max_response_length", "384", "--disable_tqdm", "true"]  # fmt: skip


def test_finetune_recipe_is_the_papers():
    config = PolarConfig.from_recipe("polar-finetune", output_dir="out", use_cpu=True, world_size=1)
    assert (config.learning_rate, config.num_train_epochs) == (1e-5, 1.0)
    assert (config.adam_beta1, config.adam_beta2, config.weight_decay, config.max_grad_norm) == (0.9, 0.95, 0.0, 1.0)
    assert config.lr_scheduler_type == "cosine_with_min_lr" and config.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert config.get_warmup_steps(1000) == 30  # 3% of the run
    assert (config.max_length, config.max_response_length, config.loss_type) == (16384, 4096, "bradley_terry")
    # Global batch 320 = per-device batch x accumulation x processes.
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 40)
    assert recipe_values("polar-finetune", world_size=4)["gradient_accumulation_steps"] == 10
    assert (
        recipe_values("polar-finetune", per_device_train_batch_size=2, world_size=1)["gradient_accumulation_steps"]
        == 160
    )
    # The paper's learning rate for the nearer model size: 1e-5 for 1.8B, 2e-5 for 7B.
    sizes = (1.8e9, 3e9, 7e9, 14e9)
    rates = [recipe_values("polar-finetune", num_params=n, world_size=1)["learning_rate"] for n in sizes]
    assert rates == [1e-5, 1e-5, 2e-5, 2e-5]
    overridden = PolarConfig.from_recipe("polar-finetune", output_dir="out", use_cpu=True, learning_rate=3e-6,
                                         world_size=1)  # fmt: skip
    assert overridden.learning_rate == 3e-6 and overridden.adam_beta2 == 0.95


def test_pretrain_recipe_takes_the_scaling_laws(caplog):
    values = recipe_values("polar-pretrain", num_params=1.8e9, base_tokens=2.5e12, rm_tokens=0.94e12,
                           per_device_train_batch_size=4, world_size=97)  # fmt: skip
    assert values["learning_rate"] == pytest.approx(1.4293e-5, rel=1e-4)
    assert values["gradient_accumulation_steps"] == 5  # 4 x 5 x 97 = 1940, the scaling law's batch
    with caplog.at_level(logging.WARNING, logger="trl_polar.recipes"):
        values = recipe_values("polar-pretrain", num_params=1.8e9, base_tokens=2.5e12, rm_tokens=0.94e12,
                               per_device_train_batch_size=4, world_size=8)  # fmt: skip
    assert values["gradient_accumulation_steps"] == 61
    assert "global batch 1952 (per_device_train_batch_size 4 x gradient_accumulation_steps 61 x 8 processes) " \
           "instead of the recipe's 1940" in caplog.text  # fmt: skip
    with pytest.raises(ValueError, match=r"needs \['base_tokens'\] .* --params, --base-tokens, --rm-tokens"):
        recipe_values("polar-pretrain", num_params=1.8e9, rm_tokens=0.94e12)
    # A learning rate and a batch of one's own need no scaling-law inputs.
    values = recipe_values("polar-pretrain", learning_rate=2e-5, global_batch_size=64, world_size=1)
    assert (values["learning_rate"], values["gradient_accumulation_steps"]) == (2e-5, 8)
    with pytest.raises(
        ValueError, match=r"Unknown recipe 'polar'; choose one of \['polar-pretrain', 'polar-finetune'\]"
    ):
        recipe_values("polar")


def test_a_recipe_gives_defaults_that_the_file_and_the_flags_override(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("recipe: polar-pretrain\nlearning_rate: 3.0e-5\nper_device_train_batch_size: 4\n")
    base = ["--model_name_or_path", "m", "--train_data", "d.jsonl", "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "true", "--params", "7e9", "--rm-tokens", "3.6e12"]  # fmt: skip
    script, config = parse_train_args(base, str(config_file))
    assert script.recipe == "polar-pretrain" and config.learning_rate == 3e-5  # the file's, no --base-tokens needed
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, round(4343 / 4))
    assert (config.adam_beta2, config.num_train_epochs, config.lr_scheduler_type) == (0.95, 1.0, "cosine_with_min_lr")
    flags = ["--base-tokens", "4e12", "--learning_rate", "1e-6", "--gradient_accumulation_steps", "3",
             "--adam_beta2", "0.99"]  # fmt: skip
    _, config = parse_train_args([*base, *flags], str(config_file))
    assert (config.learning_rate, config.gradient_accumulation_steps, config.adam_beta2) == (1e-6, 3, 0.99)
    script, config = parse_train_args(["--model_name_or_path", "m", "--train_data", "d.jsonl", "--output_dir", "o",
                                       "--use_cpu", "true", "--recipe", "polar-pretrain", "--params", "7e9",
                                       "--base-tokens", "4e12", "--rm-tokens", "3.6e12"])  # fmt: skip
    assert config.learning_rate == pytest.approx(polar_learning_rate(7e9, 4e12, 3.6e12))
    # Without a recipe, TRL's defaults stay.
    _, plain = parse_train_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o",
                                 "--use_cpu", "true"])  # fmt: skip
    assert (plain.learning_rate, plain.num_train_epochs, plain.adam_beta2) == (1e-4, 3.0, 0.999)


def test_train_cli_with_the_finetune_recipe_runs_with_the_papers_optimizer_and_schedule(
    tmp_path, tiny_qwen2_rm_dir, caplog
):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(16, seed=5)))
    out = tmp_path / "out"
    steps = 8  # 16 rows, 2 per step, one epoch (the recipe's)
    with caplog.at_level(logging.WARNING, logger="trl_polar.recipes"):
        result = CliRunner().invoke(
            app,
            ["train", "--recipe", "polar-finetune", "--params", "7e9", "--model_name_or_path", tiny_qwen2_rm_dir,
             "--train_data", str(rows), "--output_dir", str(out), "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "steps",
             "--save_steps", str(steps), *FAST_FLAGS],
        )  # fmt: skip
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    checkpoint = out / f"checkpoint-{steps}"
    peak, warmup = 2e-5, math.ceil(0.03 * steps)  # the paper's 7B learning rate; 3% warmup, rounded up: 1 step
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for group in optimizer["param_groups"]:
        assert tuple(group["betas"]) == (0.9, 0.95) and group["weight_decay"] == 0.0
        assert group["initial_lr"] == peak and group["lr"] == pytest.approx(0.1 * peak)  # cosine ends at 0.1 x lr
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert scheduler["base_lrs"] == [peak] * len(optimizer["param_groups"]) and scheduler["last_epoch"] == steps
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["max_steps"] == steps and state["num_train_epochs"] == 1
    lrs = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert len(lrs) == steps
    # The learning rate of each step: linear warmup from 0, then cosine from the peak down to 0.1 x peak, which the
    # optimizer holds after the last step.
    cosine = [
        peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))) for k in range(steps)
    ]
    assert warmup == 1 and lrs == pytest.approx([0.0, *cosine[warmup:]])
    assert lrs[warmup] == pytest.approx(peak) and all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    assert "global batch 2 (per_device_train_batch_size 2 x gradient_accumulation_steps 1 x 1 processes)" in (
        caplog.text
    )
