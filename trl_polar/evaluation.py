"""Evaluating POLAR reward models: pairwise, best-of-N and RMB-protocol accuracy, reward statistics, reports.

Three protocols, chosen from the columns a dataset has (or named explicitly):

- ``pairwise`` — rows ``prompt, reference, chosen, rejected``: correct when r(chosen) > r(rejected).
- ``best_of_n`` — rows ``prompt, reference, candidates`` (best first, k >= 2): correct when the first candidate
  scores above every other.
- ``rmb`` — rows ``prompt, ranking`` (best first, k >= 3) and no reference: the paper's protocol, where the
  top-ranked answer becomes the reference and the row is correct when the 2nd answer scores above the 3rd.

Every protocol also reports the reference scored against itself, r(p, ref, ref), which anchors the scale.
Ties count as wrong: a reward model that cannot separate two answers has not ranked them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write, write_text
from .scorer import EncodeError, Scorer

logger = logging.getLogger(__name__)

PROTOCOLS = ("pairwise", "best_of_n", "rmb")
PROTOCOL_COLUMNS = {
    "pairwise": {"prompt", "reference", "chosen", "rejected"},
    "best_of_n": {"prompt", "reference", "candidates"},
    "rmb": {"prompt", "ranking"},
}


@dataclass
class EvaluationReport:
    """What `evaluate` measured. `to_dict()` is the JSON report; `to_markdown()` the summary."""

    protocol: str
    num_rows: int
    accuracy: float
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    score_stats_by_rank: dict[str, dict[str, float]] = field(default_factory=dict)
    margin_stats: dict[str, float] = field(default_factory=dict)
    reference_self_score: dict[str, float] = field(default_factory=dict)
    scores_by_rank: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        report = asdict(self)
        report.pop("scores_by_rank")
        return report

    def to_markdown(self, rank_labels: Mapping[str, str] | None = None) -> str:
        """The summary; ``rank_labels`` names the ranks in words (e.g. ``{"rank_1": "same policy"}``)."""
        labels = rank_labels or {}
        lines = [
            f"# POLAR evaluation ({self.protocol})",
            "",
            f"- rows: {self.num_rows}",
            f"- accuracy: {self.accuracy:.4f}",
            f"- reference against itself: mean {self.reference_self_score.get('mean', float('nan')):.3f}",
            f"- margin (better - worse): mean {self.margin_stats.get('mean', float('nan')):.3f}, "
            f"min {self.margin_stats.get('min', float('nan')):.3f}",
            "",
            "| rank | n | mean | std | min | max |",
            "|---|---|---|---|---|---|",
        ]
        for rank, s in self.score_stats_by_rank.items():
            name = labels.get(rank, rank)
            lines.append(
                f"| {name} | {s['n']:.0f} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |"
            )
        if self.per_category:
            lines += ["", "| category | rows | accuracy |", "|---|---|---|"]
            for name, c in sorted(self.per_category.items()):
                lines.append(f"| {name} | {c['rows']:.0f} | {c['accuracy']:.4f} |")
        return "\n".join(lines) + "\n"


def _stats(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def detect_protocol(columns: Sequence[str]) -> str:
    """The protocol a dataset's columns call for."""
    cols = set(columns)
    for protocol, needed in PROTOCOL_COLUMNS.items():
        if needed <= cols:
            return protocol
    raise ValueError(
        f"Cannot tell the evaluation protocol from the columns {sorted(cols)}. Use prompt/reference/chosen/rejected "
        "(pairwise), prompt/reference/candidates (best_of_n, best first) or prompt/ranking (rmb, best first, the "
        "top answer becomes the reference). `trl-polar convert-data` turns common formats into these."
    )


def _rows_to_groups(rows: Sequence[dict[str, Any]], protocol: str) -> list[tuple[Any, Any, list[Any]]]:
    """(prompt, reference, candidates best first) per row, with row-numbered errors."""
    groups = []
    for i, row in enumerate(rows):
        if protocol == "pairwise":
            groups.append((row["prompt"], row["reference"], [row["chosen"], row["rejected"]]))
            continue
        column, least = ("candidates", 2) if protocol == "best_of_n" else ("ranking", 3)
        ranked = row[column]
        if not isinstance(ranked, (list, tuple)) or len(ranked) < least:
            size = len(ranked) if isinstance(ranked, (list, tuple)) else type(ranked).__name__
            raise ValueError(
                f"Row {i}, column '{column}': the {protocol} protocol needs a list of at least {least} answers, best "
                f"first; got {size}."
            )
        if protocol == "best_of_n":
            groups.append((row["prompt"], row["reference"], list(ranked)))
        else:
            groups.append((row["prompt"], ranked[0], list(ranked[1:3])))
    return groups


def evaluate(
    scorer: Scorer,
    rows: Sequence[dict[str, Any]],
    protocol: str = "auto",
    category_column: str | None = "category",
    wrapper: str = "sft",
) -> EvaluationReport:
    """Score every row's candidates (and each reference against itself) and measure accuracy.

    Args:
        scorer: a `trl_polar.scorer.Scorer`: a `PolarScorer`, a `PolarClient`, or anything with
            ``.score(prompts, references, candidates) -> list[float]``.
        rows: dicts (a `datasets.Dataset` works too).
        protocol: "pairwise", "best_of_n", "rmb" or "auto" (from the columns).
        category_column: report accuracy per value of this column where rows have it.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("No rows to evaluate.")
    if protocol == "auto":
        protocol = detect_protocol(rows[0].keys())
    elif protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be 'auto' or one of {PROTOCOLS}, got {protocol!r}.")
    _check_columns(rows[0].keys(), protocol)
    groups = _rows_to_groups(rows, protocol)
    per_group = _score_groups(scorer, groups, protocol)
    correct, margins = [], []
    scores_by_rank: dict[str, list[float]] = defaultdict(list)
    self_scores = []
    for self_score, *ranked in per_group:
        self_scores.append(self_score)
        for rank, s in enumerate(ranked, start=1 if protocol != "rmb" else 2):
            scores_by_rank[f"rank_{rank}"].append(s)
        correct.append(all(ranked[0] > other for other in ranked[1:]))
        margins.append(ranked[0] - max(ranked[1:]))
    return EvaluationReport(
        protocol=protocol,
        num_rows=len(rows),
        accuracy=sum(correct) / len(correct),
        per_category=_per_category(rows, correct, category_column),
        score_stats_by_rank={k: _stats(v) for k, v in sorted(scores_by_rank.items())},
        margin_stats=_stats(margins),
        reference_self_score=_stats(self_scores),
        scores_by_rank=dict(scores_by_rank),
    )


def _check_columns(columns: Any, protocol: str) -> None:
    missing = sorted(PROTOCOL_COLUMNS[protocol] - set(columns))
    if missing:
        hint = next((name for name, needed in PROTOCOL_COLUMNS.items() if needed <= set(columns)), "auto")
        raise ValueError(
            f"protocol {protocol!r} needs the columns {sorted(PROTOCOL_COLUMNS[protocol])}; the rows lack {missing} "
            f"(they have {sorted(columns)}). Use --protocol {hint}."
        )


def _answer_column(protocol: str, position: int) -> str:
    """The column of a group's ``position``-th scored answer (0: the reference scored against itself)."""
    if position == 0:
        return "reference" if protocol != "rmb" else "ranking[0]"
    if protocol == "pairwise":
        return ("chosen", "rejected")[position - 1]
    return f"candidates[{position - 1}]" if protocol == "best_of_n" else f"ranking[{position}]"


def _score_groups(scorer: Scorer, groups: list[tuple[Any, Any, list[Any]]], protocol: str) -> list[list[float]]:
    """Per group: r(p, ref, ref), then its candidates' scores, best first."""
    # One flat scoring call: candidates of a row share (prompt, reference), so the scorer computes that prefix once.
    prompts, references, candidates, owners = [], [], [], []
    for g, (prompt, reference, answers) in enumerate(groups):
        for answer in [reference, *answers]:
            prompts.append(prompt)
            references.append(reference)
            candidates.append(answer)
            owners.append(g)
    try:
        scores = scorer.score(prompts, references, candidates)
    except EncodeError as err:
        g = owners[err.index]
        position = err.index - owners.index(g)
        raise ValueError(f"Row {g}, column `{_answer_column(protocol, position)}`: {err.reason}") from None
    if len(scores) != len(candidates):
        raise ValueError(f"The scorer returned {len(scores)} scores for {len(candidates)} items.")
    per_group: list[list[float]] = [[] for _ in groups]
    for g, s in zip(owners, scores, strict=True):
        per_group[g].append(float(s))
    return per_group


def _per_category(rows: list[dict[str, Any]], correct: list[bool], column: str | None) -> dict[str, dict[str, float]]:
    if not column or not all(column in row for row in rows):
        return {}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for row, ok in zip(rows, correct, strict=True):
        by_category[str(row[column])].append(ok)
    return {k: {"rows": len(v), "accuracy": sum(v) / len(v)} for k, v in by_category.items()}


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")


def write_report(
    report: EvaluationReport,
    out_dir: str | os.PathLike,
    plots: bool = True,
    rank_labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write report.json, summary.md and (with matplotlib) PNG plots to `out_dir`; return the paths written.

    ``rank_labels`` names the ranks in words in summary.md and the plot legend, e.g. ``{"rank_1": "same policy as
    the reference", "rank_2": "another policy"}``; report.json keeps the rank keys.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": str(out / "report.json"), "markdown": str(out / "summary.md")}
    write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    write_text(out / "summary.md", report.to_markdown(rank_labels))
    if not plots:
        return written
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'trl-polar[plot]').")
        return written
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for rank, values in sorted(report.scores_by_rank.items()):
        ax.hist(values, bins=30, alpha=0.5, label=(rank_labels or {}).get(rank, rank))
    ax.set_xlabel("reward")
    ax.set_ylabel("answers")
    ax.set_title(f"Scores per rank ({report.protocol}, accuracy {report.accuracy:.3f})")
    ax.legend()
    fig.tight_layout()
    _save(fig, out / "scores_by_rank.png")
    plt.close(fig)
    written["scores_by_rank"] = str(out / "scores_by_rank.png")
    if report.per_category:
        names = sorted(report.per_category)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5))
        ax.bar(names, [report.per_category[n]["accuracy"] for n in names])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        _save(fig, out / "accuracy_by_category.png")
        plt.close(fig)
        written["accuracy_by_category"] = str(out / "accuracy_by_category.png")
    return written
