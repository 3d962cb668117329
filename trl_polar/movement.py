"""A training run that could not change the model says so at its end, loudly.

A run whose optimizer steps all had learning rate 0 (a warmup longer than a short run rounds the first and only
step's rate to 0), or that left the value head where it started (a zero-initialised head stays at zero, so every
input scores 0), saves a model that is no better than the one it started from, while its logs look like a run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from .modeling import value_head

logger = logging.getLogger(__name__)


class MovementCheck(TrainerCallback):
    """Records the learning rate of every optimizer step and the value head at the start; warns at the end when no
    step had a learning rate above 0 or the head did not change."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.head: list[torch.Tensor] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.rates = []
        self.head = _head_copy(model)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # Called after optimizer.step() and before the scheduler steps: the rate in the groups is the one just used.
        if optimizer is not None:
            self.rates.append(max(group["lr"] for group in optimizer.param_groups))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.rates:
            return
        problem = unmoved(self.rates, self.head, _head_copy(model))
        if problem:
            logger.warning("TRAINING DID NOT MOVE THE MODEL: %s", problem)


def unmoved(rates: list[float], before: list[torch.Tensor] | None, after: list[torch.Tensor] | None) -> str | None:
    """Why a run with these step learning rates and value heads did not train, or None when it did.

    >>> unmoved([0.0], None, None).split(":")[0]
    'all 1 optimizer step(s) ran at learning rate 0'
    >>> unmoved([1e-5, 2e-5], None, None) is None
    True
    """
    if max(rates) == 0:
        return (
            f"all {len(rates)} optimizer step(s) ran at learning rate 0: a warmup (--warmup_steps, a recipe's 3%) "
            "longer than the run leaves its steps at 0. Train for more steps, or set --warmup_steps 0. The saved "
            "model scores as the starting one did."
        )
    if before is not None and after is not None and all(torch.equal(a, b) for a, b in zip(before, after)):
        zeros = " and is still all zeros: every input scores 0" if all(not t.any() for t in after) else ""
        return (
            f"the value head did not change in {len(rates)} optimizer step(s){zeros} (largest learning rate "
            f"{max(rates):.3g}): check that the head is trainable and that the loss reaches it."
        )
    return None


def _head_copy(model: Any) -> list[torch.Tensor] | None:
    if model is None:
        return None
    try:
        params = list(value_head(model).parameters())
    except ValueError:
        return None
    # Under ZeRO-3 each rank holds a shard of the head (ds_numel): there is nothing whole to compare.
    if not params or any(hasattr(p, "ds_numel") for p in params):
        return None
    return [p.detach().float().cpu().clone() for p in params]
