"""POLAR's training recipes: the paper's and the released configs' hyperparameters as `PolarConfig` values.

Two recipes, ``polar-pretrain`` and ``polar-finetune``. Their values and sources (docs/training.md has the table):

- fine-tuning, paper App. D.2.2: learning rate 1e-5 (POLAR-1.8B) and 2e-5 (POLAR-7B), batch 320, one epoch;
- the released fine-tuning configs (InternLM/POLAR ``examples/xtuner_configs/POLAR_{1_8B,7B}_full_varlenattn_
  custom_dataset.py`` at 80626f3): AdamW betas (0.9, 0.95), weight decay 0, gradient clipping 1.0, linear warmup
  over 3% of the run, then cosine decay to 0.1 x lr, ``max_length`` 16384, ``max_response_length`` 4096, one epoch;
- pre-training, paper App. D.1.2: learning rate and batch size from the scaling laws (`trl_polar.scaling`), one
  epoch over the data. The paper names no optimiser or schedule for pre-training (it follows "standard LLM
  pre-training practice"), and no pre-training config was released; the recipe uses the fine-tuning config's.

The paper's batch sizes are global (samples, i.e. pairs, per optimizer step). Transformers' global batch is
``per_device_train_batch_size x gradient_accumulation_steps x world size``: the recipe keeps the per-device batch
(what fits in memory, your choice) and sets the accumulation to reach the paper's batch, warning when the product
cannot equal it exactly.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from .scaling import polar_batch_size, polar_learning_rate

logger = logging.getLogger(__name__)

RECIPES = ("polar-pretrain", "polar-finetune")
# What a recipe takes besides config fields.
RECIPE_INPUTS = ("num_params", "base_tokens", "rm_tokens", "global_batch_size", "world_size")
FINETUNE_GLOBAL_BATCH = 320  # paper App. D.2.2
# Fine-tuning learning rates by model size (paper App. D.2.2); a size is matched to the nearer one (log scale).
FINETUNE_LEARNING_RATES = {1.8e9: 1e-5, 7e9: 2e-5}
DEFAULT_FINETUNE_LEARNING_RATE = 1e-5  # without a size: POLAR-1.8B's, the lower (the paper guards over-optimisation)

# The values both recipes share, from the released fine-tuning config (line numbers at InternLM/POLAR 80626f3).
COMMON_VALUES: dict[str, Any] = {
    "num_train_epochs": 1.0,  # max_epochs = 1 (line 46): "should not be trained for more than 1 epoch"
    "adam_beta1": 0.9,  # betas = (0.9, 0.95) (line 49)
    "adam_beta2": 0.95,
    "weight_decay": 0.0,  # line 50
    "max_grad_norm": 1.0,  # line 51
    "warmup_steps": 0.03,  # warmup_ratio = 0.03 (line 52); a float below 1 is a ratio of the run
    "lr_scheduler_type": "cosine_with_min_lr",  # LinearLR then CosineAnnealingLR(eta_min=lr * 0.1) (lines 143-160)
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "max_length": 16384,  # line 34
    "max_response_length": 4096,  # line 35
    "loss_type": "bradley_terry",  # loss_type = "ranking", penalty_type = "none" (lines 30-31)
}


def world_size_from_env() -> int:
    """The number of training processes: WORLD_SIZE as `accelerate launch` and `torchrun` set it, else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r} is not an integer; unset it or pass world_size=.") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} must be >= 1.")
    return size


def finetune_learning_rate(num_params: float | None) -> float:
    """The paper's fine-tuning learning rate for a model of `num_params` parameters (nearer size, log scale)."""
    if num_params is None:
        return DEFAULT_FINETUNE_LEARNING_RATE
    nearest = min(FINETUNE_LEARNING_RATES, key=lambda size: abs(math.log(num_params / size)))
    return FINETUNE_LEARNING_RATES[nearest]


def accumulation_for(global_batch: int, per_device: int, world_size: int) -> int:
    """Gradient accumulation steps that bring per_device x world_size closest to `global_batch` (at least 1)."""
    return max(1, round(global_batch / (per_device * world_size)))


def recipe_values(
    name: str,
    *,
    num_params: float | None = None,
    base_tokens: float | None = None,
    rm_tokens: float | None = None,
    global_batch_size: int | None = None,
    learning_rate: float | None = None,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """The `PolarConfig` fields recipe `name` sets.

    Args:
        name: ``"polar-pretrain"`` or ``"polar-finetune"``.
        num_params, base_tokens, rm_tokens: plain counts (1.8e9, 2.5e12, 0.94e12). Pre-training needs all three
            for the scaling-law learning rate and ``num_params`` and ``rm_tokens`` for its batch size; fine-tuning
            uses ``num_params`` only, to pick the paper's learning rate for the nearer model size.
        global_batch_size: samples per optimizer step instead of the paper's (320, or the scaling law's).
        learning_rate: a learning rate of your own instead of the paper's.
        per_device_train_batch_size: samples per device and micro-step (kept as given).
        gradient_accumulation_steps: your own accumulation; by default the recipe sets it to reach the global batch.
        world_size: training processes; default WORLD_SIZE from the environment, else 1.

    >>> values = recipe_values("polar-finetune", per_device_train_batch_size=8, world_size=4)
    >>> values["learning_rate"], values["gradient_accumulation_steps"], values["adam_beta2"]
    (1e-05, 10, 0.95)
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {list(RECIPES)}.")
    world_size = world_size_from_env() if world_size is None else world_size
    if name == "polar-finetune":
        lr = learning_rate if learning_rate is not None else finetune_learning_rate(num_params)
        target = global_batch_size if global_batch_size is not None else FINETUNE_GLOBAL_BATCH
    else:
        needed = (["num_params", "base_tokens", "rm_tokens"] if learning_rate is None else []) + (
            ["num_params", "rm_tokens"] if global_batch_size is None else []
        )
        given = {"num_params": num_params, "base_tokens": base_tokens, "rm_tokens": rm_tokens}
        missing = [n for n in dict.fromkeys(needed) if given[n] is None]
        if missing:
            raise ValueError(
                f"Recipe 'polar-pretrain' takes its learning rate and batch size from the paper's scaling laws and "
                f"needs {missing} (plain counts, e.g. num_params=1.8e9, base_tokens=2.5e12, rm_tokens=0.94e12; "
                "flags --params, --base-tokens, --rm-tokens). Or give learning_rate and global_batch_size yourself."
            )
        lr = learning_rate if learning_rate is not None else polar_learning_rate(num_params, base_tokens, rm_tokens)
        target = global_batch_size if global_batch_size is not None else polar_batch_size(num_params, rm_tokens)
    for label, value in (("per_device_train_batch_size", per_device_train_batch_size), ("world_size", world_size),
                         ("global_batch_size", target)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{label}` must be a positive integer, got {value!r}.")
    accumulation = gradient_accumulation_steps or accumulation_for(target, per_device_train_batch_size, world_size)
    effective = per_device_train_batch_size * accumulation * world_size
    if effective != target:
        logger.warning(
            "recipe %s: global batch %d (per_device_train_batch_size %d x gradient_accumulation_steps %d x %d "
            "processes) instead of the recipe's %d: pick per_device_train_batch_size and the number of processes so "
            "that their product divides %d.",
            name, effective, per_device_train_batch_size, accumulation, world_size, target, target,
        )  # fmt: skip
    return {
        **COMMON_VALUES,
        "lr_scheduler_kwargs": dict(COMMON_VALUES["lr_scheduler_kwargs"]),
        "learning_rate": lr,
        "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
    }
