"""The paper's scaling laws with the units resolved, and the power-law fit for users' own runs."""

from __future__ import annotations

import math

import pytest

from trl_polar.scaling import fit_power_law, plot_power_law, polar_batch_size, polar_learning_rate


@pytest.mark.parametrize(
    "params, base_tokens, rm_tokens, paper_lr, paper_batch",
    [(1.8e9, 2.5e12, 0.94e12, 1.4e-5, 1940), (7e9, 4.0e12, 3.6e12, 1.67e-5, 4343)],
)
def test_reproduces_the_paper_within_five_percent(params, base_tokens, rm_tokens, paper_lr, paper_batch):
    assert polar_learning_rate(params, base_tokens, rm_tokens) == pytest.approx(paper_lr, rel=0.05)
    assert polar_batch_size(params, rm_tokens) == pytest.approx(paper_batch, rel=0.05)


def test_bad_units_are_refused():
    with pytest.raises(ValueError, match="`rm_tokens` must be a positive number"):
        polar_learning_rate(1.8e9, 2.5e12, 0)
    with pytest.raises(ValueError, match="`num_params`"):
        polar_batch_size(-1, 1e12)


def test_power_law_fit_recovers_known_curves(tmp_path):
    compute = [1e17, 1e18, 1e19, 1e20]
    loss = [3.0 * c**-0.05 for c in compute]
    law = fit_power_law(compute, loss)
    assert law.exponent == pytest.approx(-0.05, abs=1e-9) and law.coefficient == pytest.approx(3.0, rel=1e-6)
    assert law.r_squared == pytest.approx(1.0)
    assert law.compute_for_loss(law(1e21)) == pytest.approx(1e21, rel=1e-6)
    floored = [0.3 + 50.0 * c**-0.1 for c in compute + [1e21, 1e22]]
    law = fit_power_law(compute + [1e21, 1e22], floored, with_floor=True)
    assert law.floor == pytest.approx(0.3, abs=0.01) and law.exponent == pytest.approx(-0.1, abs=0.01)
    with pytest.raises(ValueError, match="at least 2 runs"):
        fit_power_law([1.0], [1.0])
    pytest.importorskip("matplotlib")
    path = plot_power_law(compute, loss, fit_power_law(compute, loss), str(tmp_path / "fit.png"))
    assert (tmp_path / "fit.png").stat().st_size > 1000 and path.endswith("fit.png")
    assert math.isfinite(law(1e23))
