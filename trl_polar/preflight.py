"""A pre-flight check of a reward model on the rows of an RL run, before the run: does it rank answers sanely?

For N rows (prompt, reference) of the RL data, three answers are scored against each row's reference:

- ``copy``: the reference itself, r(p, ref, ref), the top of the scale (about 0 to +0.7 on the released
  checkpoints);
- ``perturbed``: the reference lightly changed (one word dropped, or a few words added to a very short one), a
  nearly right answer that should score just below the copy;
- ``wrong``: another row's reference, a fluent answer to another question, which should score far below
  (about -7 to -11 on the released checkpoints).

The check passes when, in at least ``min_agreement`` of the rows, copy > perturbed, perturbed > wrong and
copy > wrong, when the mean copy score is at least ``min_gap`` above the mean wrong score, and every score is
finite. A model that fails has the wrong tokenizer or template, an untrained head, or was trained on other data;
a long RL run would optimise noise.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .template import Text, flatten

KINDS = ("copy", "perturbed", "wrong")
ORDERINGS = (("copy", "perturbed"), ("perturbed", "wrong"), ("copy", "wrong"))
# The released checkpoints' raw scale (docs/rl.md, "The reward scale"): a model of your own may sit elsewhere.
RELEASED_SCALE = {"copy": (0.0, 0.7), "wrong": (-11.0, -7.0)}
# An added clause for references too short to lose a word.
_PADDING = "I think."


@dataclass
class PreflightReport:
    """What `preflight` measured: per-kind score statistics, the ordering rates and the verdict."""

    rows: int
    scores: dict[str, dict[str, float]]
    agreement: dict[str, float]
    gap: float
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check["passed"] for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        lines = [f"Reward pre-flight on {self.rows} rows: {'PASS' if self.passed else 'FAIL'}", ""]
        lines += ["| answer | mean | min | max |", "| --- | --- | --- | --- |"]
        for kind in KINDS:
            s = self.scores[kind]
            lines.append(f"| {kind} | {s['mean']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
        lines.append("")
        for check in self.checks:
            lines.append(f"- [{'x' if check['passed'] else ' '}] {check['name']}: {check['detail']}")
        lines += [f"- note: {note}" for note in self.notes]
        return "\n".join(lines)


def perturb(text: str, seed: int = 0) -> str:
    """A light perturbation of an answer: one inner word dropped, or, for fewer than 3 words, a clause added.

    >>> perturb("The answer is 4 because two and two make four.", seed=1)
    'The answer is because two and two make four.'
    >>> perturb("4")
    '4 I think.'
    """
    words = text.split(" ")
    if len([w for w in words if w]) < 3:
        return f"{text} {_PADDING}"
    drop = random.Random(seed).randrange(1, len(words) - 1)
    return " ".join(words[:drop] + words[drop + 1 :])


def wrong_answers(references: Sequence[str]) -> list[str]:
    """For each row, the next row's reference that differs from its own (wrapping around).

    >>> wrong_answers(["a", "a", "b"])
    ['b', 'b', 'a']
    """
    n = len(references)
    out = []
    for i, reference in enumerate(references):
        other = next((references[(i + k) % n] for k in range(1, n) if references[(i + k) % n] != reference), None)
        if other is None:
            raise ValueError("Every row has the same reference: the pre-flight needs rows with different references.")
        out.append(other)
    return out


def _first_reference(value: Any, row: int) -> str:
    # A row may list several references (PolarReward averages over them); the check uses the first.
    if isinstance(value, list) and value and not isinstance(value[0], dict):
        value = value[0]
    try:
        return flatten(value, f"row {row} reference")
    except ValueError as err:
        raise ValueError(f"row {row}: {err}") from None


def _stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def preflight(
    scorer: Any,
    prompts: Sequence[Text],
    references: Sequence[Any],
    *,
    min_agreement: float = 0.8,
    min_gap: float = 1.0,
    seed: int = 0,
) -> PreflightReport:
    """Score each row's reference, a perturbation of it and another row's reference; check the ordering.

    Args:
        scorer: anything with ``.score(prompts, references, candidates)``: a `PolarScorer`, a `PolarClient`.
        prompts: the rows' prompts (text or messages).
        references: the rows' references (text, messages, or a list of references: the first is used).
        min_agreement: the share of rows in which each ordering must hold.
        min_gap: how far the mean copy score must lie above the mean wrong score.
        seed: seeds the perturbations.
    """
    if len(prompts) != len(references) or len(prompts) < 2:
        raise ValueError(f"The pre-flight needs at least 2 rows of prompt and reference, got {len(prompts)}.")
    refs = [_first_reference(r, i) for i, r in enumerate(references)]
    answers = {
        "copy": refs,
        "perturbed": [perturb(r, seed + i) for i, r in enumerate(refs)],
        "wrong": wrong_answers(refs),
    }
    n = len(refs)
    flat = scorer.score(list(prompts) * 3, refs * 3, [a for kind in KINDS for a in answers[kind]])
    scores = {kind: [float(s) for s in flat[k * n : (k + 1) * n]] for k, kind in enumerate(KINDS)}
    finite = all(math.isfinite(s) for values in scores.values() for s in values)
    agreement = {f"{hi} > {lo}": sum(a > b for a, b in zip(scores[hi], scores[lo])) / n for hi, lo in ORDERINGS}
    stats = {kind: _stats(values) for kind, values in scores.items()} if finite else {}
    gap = stats["copy"]["mean"] - stats["wrong"]["mean"] if finite else float("nan")
    checks = [{"name": "finite scores", "passed": finite, "detail": "every score is a finite number"}]
    checks += [
        {
            "name": ordering,
            "passed": rate >= min_agreement,
            "detail": f"holds in {rate:.0%} of rows (needs {min_agreement:.0%})",
        }
        for ordering, rate in agreement.items()
    ]
    checks.append({"name": "copy well above wrong", "passed": gap >= min_gap,
                   "detail": f"mean gap {gap:.3f} (needs {min_gap:g})"})  # fmt: skip
    return PreflightReport(n, stats or {k: _stats([math.nan]) for k in KINDS}, agreement, gap, checks,
                           _scale_notes(stats))  # fmt: skip


def _scale_notes(stats: dict[str, dict[str, float]]) -> list[str]:
    notes = []
    for kind, (low, high) in RELEASED_SCALE.items():
        mean = stats.get(kind, {}).get("mean")
        if mean is not None and not low - 1 <= mean <= high + 1:
            notes.append(
                f"mean {kind} score {mean:.2f} is outside the released checkpoints' {low:g} to {high:g}: expected for "
                "a model of your own, a sign of a wrong template or tokenizer for a released one."
            )
    return notes
