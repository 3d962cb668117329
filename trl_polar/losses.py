"""Reward-model losses: Bradley–Terry on pairs (POLAR's loss) and Plackett–Luce on k-way rankings.

Both take rewards as a ``(groups, k)`` tensor whose columns are ordered best first; a ``valid`` mask allows
rankings of different lengths in one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Mean over pairs of ``-log σ(r_chosen - r_rejected - margin)``, plus TRL's optional centering term.

    Without margin and centering this is exactly POLAR's loss (xtuner's ranking loss averaged over pairs).

    >>> round(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item(), 4)
    0.3133
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def plackett_luce_loss(
    rewards: torch.Tensor,
    valid: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Mean over groups of the Plackett–Luce negative log-likelihood of the ranking given best first.

    ``-log P(ranking) = -Σ_i [r_i - log Σ_{j >= i} exp r_j]``; for k = 2 this is ``-log σ(r_1 - r_2)``, Bradley–Terry.
    ``valid`` (bool, same shape) marks the real candidates of each row; they must come first. The optional centering
    term is ``coef * mean((Σ_i r_i)^2)``, TRL's term for k = 2.

    >>> r = torch.tensor([[1.0, 0.0]])
    >>> bool(torch.isclose(plackett_luce_loss(r), bradley_terry_loss(r[:, 0], r[:, 1])))
    True
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"`rewards` must have shape (groups, k >= 2), got {tuple(rewards.shape)}.")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if (valid.sum(dim=1) < 2).any():
        raise ValueError("Every ranking needs at least 2 candidates.")
    masked = rewards.masked_fill(~valid, float("-inf"))
    # log Σ_{j >= i} exp r_j: a reversed cumulative logsumexp over the candidates still in the running.
    tail_lse = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
    terms = (rewards - tail_lse).masked_fill(~valid, 0.0)
    loss = -terms.sum(dim=1).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean(rewards.masked_fill(~valid, 0.0).sum(dim=1) ** 2)
    return loss


def ranking_accuracy(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the fraction of ordered candidate pairs (i better than j) the rewards order correctly.

    For pairs this is TRL's accuracy, ``r_chosen > r_rejected``.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    k = rewards.shape[1]
    better = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(1)  # i ranked above j
    pairs = better & valid[:, :, None] & valid[:, None, :]
    correct = (rewards[:, :, None] > rewards[:, None, :]) & pairs
    return correct.sum(dim=(1, 2)).float() / pairs.sum(dim=(1, 2)).clamp(min=1).float()
