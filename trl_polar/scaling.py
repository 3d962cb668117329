"""POLAR's scaling laws: learning rate and batch size for reward-model pre-training, and loss-vs-compute fits.

The paper (arXiv:2507.05197, App. D.1.2) fits, on models of 100M-924M parameters,

    LR = 2.306e-4 * N^0.01125 * Dp^-0.66587 * Drm^0.33916
    BS = 31.9032  * N^0.06944 * Drm^0.52997            (samples per optimizer step)

with N the model size, Dp the tokens the base model was pre-trained on and Drm the tokens of reward-model
pre-training. The paper says "all in millions"; its own numbers (POLAR-1.8B: LR 1.4e-5, batch 1,940; POLAR-7B:
LR 1.67e-5, batch 4,343, App. D.1.2 and Table 6) come out, to four significant figures, with binary units: N in
units of 2^20 parameters ("mebi-parameters") and Dp, Drm in units of 2^30 tokens ("gibi-tokens"). The functions
below take plain counts (1.8e9 parameters, 2.5e12 tokens) and convert them to those units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PARAMS_UNIT = 2**20  # N is counted in units of 2^20 parameters
TOKENS_UNIT = 2**30  # Dp and Drm are counted in units of 2^30 tokens


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
            raise ValueError(f"`{name}` must be a positive number (a plain count, e.g. 1.8e9), got {value!r}.")


def polar_learning_rate(num_params: float, base_tokens: float, rm_tokens: float) -> float:
    """The paper's fitted peak learning rate for POLAR pre-training (App. D.1.2).

    Args:
        num_params: model parameters, a plain count (e.g. 1.8e9); used in units of 2^20.
        base_tokens: tokens the base model was pre-trained on (e.g. 2.5e12); used in units of 2^30.
        rm_tokens: tokens of POLAR pre-training (e.g. 0.94e12); used in units of 2^30.

    >>> f"{polar_learning_rate(1.8e9, 2.5e12, 0.94e12):.4g}"
    '1.429e-05'
    """
    _check_positive(num_params=num_params, base_tokens=base_tokens, rm_tokens=rm_tokens)
    n, dp, drm = num_params / PARAMS_UNIT, base_tokens / TOKENS_UNIT, rm_tokens / TOKENS_UNIT
    return 2.306e-4 * n**0.01125 * dp**-0.66587 * drm**0.33916


def polar_batch_size_exact(num_params: float, rm_tokens: float) -> float:
    """The paper's fitted batch size before rounding (e.g. 1,939.7 samples for POLAR-1.8B)."""
    _check_positive(num_params=num_params, rm_tokens=rm_tokens)
    n, drm = num_params / PARAMS_UNIT, rm_tokens / TOKENS_UNIT
    return 31.9032 * n**0.06944 * drm**0.52997


def polar_batch_size(num_params: float, rm_tokens: float) -> int:
    """The paper's fitted batch size (samples per optimizer step) for POLAR pre-training, rounded.

    >>> polar_batch_size(1.8e9, 0.94e12), polar_batch_size(7e9, 3.6e12)
    (1940, 4343)
    """
    return round(polar_batch_size_exact(num_params, rm_tokens))


@dataclass(frozen=True)
class PretrainingPlan:
    """The scaling-law recipe of one pre-training run: what `trl-polar scaling` prints."""

    num_params: float
    base_tokens: float
    rm_tokens: float
    learning_rate: float
    batch_size: int
    tokens_per_sample: float | None = None

    @property
    def steps(self) -> int | None:
        """Optimizer steps to spend `rm_tokens` (one epoch), when the mean tokens per sample is known."""
        if self.tokens_per_sample is None:
            return None
        return math.ceil(self.rm_tokens / (self.batch_size * self.tokens_per_sample))

    def lines(self) -> list[str]:
        """The plan as printed lines, plain counts and the paper's units side by side."""
        out = [
            f"model size:      {self.num_params:.4g} parameters (N = {self.num_params / PARAMS_UNIT:,.1f} x 2^20)",
            f"base tokens:     {self.base_tokens:.4g} (Dp = {self.base_tokens / TOKENS_UNIT:,.1f} x 2^30)",
            f"budget:          {self.rm_tokens:.4g} tokens of POLAR pre-training, one epoch "
            f"(Drm = {self.rm_tokens / TOKENS_UNIT:,.1f} x 2^30)",
            f"learning rate:   {self.learning_rate:.4g} (peak)",
            f"batch size:      {self.batch_size} samples per optimizer step",
        ]
        if self.steps is not None:
            out.append(
                f"steps:           {self.steps:,} at {self.tokens_per_sample:,.0f} tokens per sample "
                f"({self.batch_size * self.tokens_per_sample:.4g} tokens per step)"
            )
        return out


def pretraining_plan(
    num_params: float, base_tokens: float, rm_tokens: float, tokens_per_sample: float | None = None
) -> PretrainingPlan:
    """Learning rate, batch size and (with `tokens_per_sample`) steps for pre-training on `rm_tokens` tokens.

    >>> plan = pretraining_plan(7e9, 4.0e12, 3.6e12)
    >>> f"{plan.learning_rate:.3g}", plan.batch_size
    ('1.67e-05', 4343)
    """
    if tokens_per_sample is not None:
        _check_positive(tokens_per_sample=tokens_per_sample)
    return PretrainingPlan(
        num_params,
        base_tokens,
        rm_tokens,
        polar_learning_rate(num_params, base_tokens, rm_tokens),
        polar_batch_size(num_params, rm_tokens),
        tokens_per_sample,
    )


@dataclass(frozen=True)
class PowerLaw:
    """loss = coefficient * compute ** exponent (+ floor, when fitted with one)."""

    coefficient: float
    exponent: float
    floor: float = 0.0
    r_squared: float = float("nan")

    def __call__(self, compute: float) -> float:
        return self.coefficient * compute**self.exponent + self.floor

    def compute_for_loss(self, loss: float) -> float:
        """The compute at which the fitted curve reaches `loss`."""
        if loss <= self.floor:
            raise ValueError(f"loss {loss} is at or below the fitted floor {self.floor}: the curve never reaches it.")
        return ((loss - self.floor) / self.coefficient) ** (1.0 / self.exponent)


def fit_power_law(compute: Sequence[float], loss: Sequence[float], with_floor: bool = False) -> PowerLaw:
    """Fit loss against compute (e.g. FLOPs or tokens x parameters) by least squares in log-log space.

    With ``with_floor`` an irreducible loss ``floor`` is searched too (the fit is then done on ``loss - floor``).

    >>> law = fit_power_law([1e18, 1e19, 1e20], [2.0, 1.0, 0.5])
    >>> round(law.exponent, 4), round(law(1e21), 4)
    (-0.301, 0.25)
    """
    import numpy as np

    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"`compute` and `loss` must be 1-D and of the same length, got {c.shape} and {y.shape}.")
    if len(c) < (3 if with_floor else 2):
        raise ValueError(f"Need at least {3 if with_floor else 2} runs to fit, got {len(c)}.")
    if (c <= 0).any() or (y <= 0).any():
        raise ValueError("`compute` and `loss` must be positive to fit a power law.")

    def fit(floor: float) -> PowerLaw:
        x, z = np.log(c), np.log(y - floor)
        slope, intercept = np.polyfit(x, z, 1)
        residual = z - (slope * x + intercept)
        total = ((z - z.mean()) ** 2).sum()
        r2 = 1.0 - (residual**2).sum() / total if total > 0 else 1.0
        return PowerLaw(float(np.exp(intercept)), float(slope), float(floor), float(r2))

    if not with_floor:
        return fit(0.0)
    floors = np.linspace(0.0, y.min() * 0.999, 200)
    return max((fit(f) for f in floors), key=lambda law: law.r_squared)


def plot_power_law(compute: Sequence[float], loss: Sequence[float], law: PowerLaw, path: str) -> str:
    """Save a log-log plot of the runs and the fitted curve to `path` (needs the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError as e:
        raise ImportError("Plotting needs matplotlib: pip install 'trl-polar[plot]'.") from e
    grid = np.geomspace(min(compute), max(compute), 100)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(compute, loss, "o", label="runs")
    label = f"{law.coefficient:.3g} C^{law.exponent:.3f}" + (f" + {law.floor:.3g}" if law.floor else "")
    ax.loglog(grid, [law(g) for g in grid], "-", label=label)
    ax.set_xlabel("compute")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
