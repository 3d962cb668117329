"""The losses give the numbers the papers define."""

from __future__ import annotations

import math

import pytest
import torch

from trl_polar.losses import bradley_terry_loss, plackett_luce_loss, ranking_accuracy


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_matches_hand_computed_value():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    expected = -(_logsig(1.0) + _logsig(-1.0)) / 2  # 0.8133
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)


def test_bradley_terry_margin_and_centering_as_trl():
    chosen, rejected, margin = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5]), torch.tensor([0.5, 0.0])
    expected = -(_logsig(0.5) + _logsig(-1.0)) / 2 + 0.01 * ((3.0**2 + 2.0**2) / 2)
    assert bradley_terry_loss(chosen, rejected, margin, 0.01).item() == pytest.approx(expected, abs=1e-6)


def test_listwise_equals_bradley_terry_for_pairs_values_and_gradients():
    torch.manual_seed(0)
    rewards = torch.randn(16, 2, requires_grad=True)
    pl = plackett_luce_loss(rewards, center_rewards_coefficient=0.01)
    (g_pl,) = torch.autograd.grad(pl, rewards)
    bt = bradley_terry_loss(rewards[:, 0], rewards[:, 1], center_rewards_coefficient=0.01)
    (g_bt,) = torch.autograd.grad(bt, rewards)
    assert pl.item() == pytest.approx(bt.item(), abs=1e-6)
    torch.testing.assert_close(g_pl, g_bt)


def test_listwise_three_way_hand_computed():
    r = [3.0, 1.0, 2.0]
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = -((r[0] - lse(r)) + (r[1] - lse(r[1:])))
    assert plackett_luce_loss(torch.tensor([r])).item() == pytest.approx(expected, abs=1e-6)


def test_listwise_mixed_lengths_mask_short_rankings():
    # A pair padded into a 3-wide batch scores exactly as the pair alone.
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.5, 1.5, 99.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    both = plackett_luce_loss(rewards, valid)
    alone = (plackett_luce_loss(rewards[:1]) + bradley_terry_loss(rewards[1:, 0], rewards[1:, 1])) / 2
    assert both.item() == pytest.approx(alone.item(), abs=1e-6)


def test_listwise_prefers_the_right_order():
    good, bad = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 2.0, 3.0]])
    assert plackett_luce_loss(good) < plackett_luce_loss(bad)


def test_listwise_rejects_single_candidate():
    with pytest.raises(ValueError, match="at least 2"):
        plackett_luce_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[True, False]]))


def test_ranking_accuracy_counts_ordered_pairs():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: (0>1 yes, 0>2 yes, 1>2 no) = 2/3; row 1: (0>1 yes) = 1
    torch.testing.assert_close(ranking_accuracy(rewards, valid), torch.tensor([2 / 3, 1.0]))
