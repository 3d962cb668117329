"""Evaluating POLAR reward models: pairwise, best-of-N and RMB-protocol accuracy, reward statistics, reports.

Three protocols, chosen from the columns a dataset has (or named explicitly):

- ``pairwise`` — rows ``prompt, reference, chosen, rejected``: correct when r(chosen) > r(rejected).
- ``best_of_n`` — rows ``prompt, reference, candidates`` (best first, k >= 2): correct when the first candidate
  scores above every other.
- ``rmb`` — rows ``prompt, ranking`` (best first, k >= 3) and no reference: the paper's protocol, where the
  top-ranked answer becomes the reference and the row is correct when the 2nd answer scores above the 3rd.

Every protocol also reports the reference scored against itself, r(p, ref, ref), which anchors the scale.
Ties count as wrong (and are counted): a reward model that cannot separate two answers has not ranked them.

A row that cannot be judged (a missing or non-text answer, too few candidates) is skipped and counted by reason.
Every distinct (prompt, reference, answer) is scored once however many rows hold it, and the answers of one
(prompt, reference) are scored in one call so that the scorer runs their shared prefix once. Categories written
as paths ("Helpfulness/Chat/Discussion") are also rolled up at every level of the path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write, write_text
from .scorer import EncodeError, Scorer
from .template import flatten

logger = logging.getLogger(__name__)

PROTOCOLS = ("pairwise", "best_of_n", "rmb")
PROTOCOL_COLUMNS = {
    "pairwise": {"prompt", "reference", "chosen", "rejected"},
    "best_of_n": {"prompt", "reference", "candidates"},
    "rmb": {"prompt", "ranking"},
}
# Items per scoring call: small enough for a progress bar that moves, large enough to fill micro-batches.
DEFAULT_CHUNK_ITEMS = 256


@dataclass
class EvaluationReport:
    """What `evaluate` measured. `to_dict()` is the JSON report; `to_markdown()` the summary.

    ``per_category`` holds each category's ``rows``, ``correct`` and ``accuracy``; ``category_rollup`` the same for
    every proper prefix of a category path, plus ``categories`` (how many it holds) and ``macro_accuracy`` (their
    unweighted mean). ``skipped`` counts the rows that could not be judged, by reason. ``throughput`` gives the
    scoring time, items/s and how much the shared (prompt, reference) prefixes saved.
    """

    protocol: str
    num_rows: int
    accuracy: float
    rows_read: int = 0
    ties: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sample: dict[str, Any] | None = None
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    category_rollup: dict[str, dict[str, float]] = field(default_factory=dict)
    score_stats_by_rank: dict[str, dict[str, float]] = field(default_factory=dict)
    margin_stats: dict[str, float] = field(default_factory=dict)
    reference_self_score: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    scores_by_rank: dict[str, list[float]] = field(default_factory=dict, repr=False)
    # Per row, in row order: r(p, ref, ref), then each scored answer's reward (what benchmark rules are computed from).
    row_scores: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        report = asdict(self)
        report.pop("scores_by_rank")
        report.pop("row_scores")
        return report

    def to_markdown(self, rank_labels: Mapping[str, str] | None = None) -> str:
        """The summary; ``rank_labels`` names the ranks in words (e.g. ``{"rank_1": "same policy"}``)."""
        labels = rank_labels or {}
        correct = round(self.accuracy * self.num_rows)
        lines = [f"# POLAR evaluation ({self.protocol})", ""]
        if self.sample:
            lines.append(
                f"- stratified sample: {self.sample['rows']} of {self.sample['from_rows']} rows (seed "
                f"{self.sample['seed']}); the numbers below estimate the full set's"
            )
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        lines += [
            f"- rows judged: {self.num_rows} of {self.rows_read}" + (f" (skipped: {skipped})" if skipped else ""),
            f"- accuracy: {self.accuracy:.4f} ({correct} of {self.num_rows}; ties, counted wrong: {self.ties})",
            f"- reference against itself: mean {self.reference_self_score.get('mean', float('nan')):.3f}",
            f"- margin (better - worse): mean {self.margin_stats.get('mean', float('nan')):.3f}, "
            f"min {self.margin_stats.get('min', float('nan')):.3f}",
        ]
        t = self.throughput
        if t:
            line = (
                f"- scored {t['items_scored']:.0f} distinct answers for {t['items_requested']:.0f} requested "
                f"in {t['seconds']:.1f} s ({t['items_per_second']:.1f} items/s, {t['rows_per_second']:.1f} rows/s); "
                f"{t['prefix_groups']:.0f} (prompt, reference) prefixes"
            )
            if "shared_token_fraction" in t:
                line += (
                    f", each run once: {t['tokens_saved']:.0f} of {t['tokens_run'] + t['tokens_saved']:.0f} tokens "
                    f"({t['shared_token_fraction']:.1%}) not recomputed"
                )
            lines.append(line)
        lines += ["", "| rank | n | mean | std | min | max |", "|---|---|---|---|---|---|"]
        for rank, s in self.score_stats_by_rank.items():
            name = labels.get(rank, rank)
            lines.append(
                f"| {name} | {s['n']:.0f} | {s['mean']:.3f} | {s['std']:.3f} | {s['min']:.3f} | {s['max']:.3f} |"
            )
        if self.per_category:
            lines += ["", "| category | n | accuracy |", "|---|---|---|"]
            # Rollups sit right above the categories they hold: sorting by path orders the tree.
            cells = {**self.per_category, **self.category_rollup}
            for name in sorted(cells):
                c = cells[name]
                if name in self.category_rollup:
                    lines.append(
                        f"| **{name}** (all {c['categories']:.0f}; mean of them {c['macro_accuracy']:.4f}) | "
                        f"{c['rows']:.0f} | **{c['accuracy']:.4f}** |"
                    )
                else:
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


def stratified_sample(
    rows: Sequence[dict[str, Any]], max_rows: int, column: str | None = "category", seed: int = 0
) -> list[int]:
    """Indices (in input order) of at most ``max_rows`` rows, drawn per value of ``column`` in proportion to its
    size (largest remainders), with at least one row of every value while ``max_rows`` allows.

    >>> rows = [{"category": "a"}] * 6 + [{"category": "b"}] * 3 + [{"category": "c"}]
    >>> picked = stratified_sample(rows, 5)
    >>> " ".join(row["category"] for i, row in enumerate(rows) if i in picked)
    'a a a b c'
    """
    if max_rows < 1:
        raise ValueError(f"`max_rows` must be at least 1, got {max_rows}.")
    if max_rows >= len(rows):
        return list(range(len(rows)))
    strata: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        strata[str(row.get(column)) if column else ""].append(i)
    names = sorted(strata)
    quota = {n: max_rows * len(strata[n]) / len(rows) for n in names}
    take = {n: int(quota[n]) for n in names}
    if max_rows >= len(names):
        take = {n: max(1, k) for n, k in take.items()}
    # Rows left over (or taken back, after the minimum of one) go by the largest remainders.
    by_remainder = sorted(names, key=lambda n: (quota[n] - int(quota[n]), len(strata[n])), reverse=True)
    while sum(take.values()) < max_rows:
        for n in by_remainder:
            if sum(take.values()) < max_rows and take[n] < len(strata[n]):
                take[n] += 1
    while sum(take.values()) > max_rows:
        n = max((n for n in names if take[n] > 1), key=lambda n: take[n] - quota[n])
        take[n] -= 1
    rng = random.Random(seed)
    return sorted(i for n in names for i in rng.sample(strata[n], take[n]))


def _answers(row: dict[str, Any], protocol: str) -> tuple[Any, Any, list[Any]] | str:
    """(prompt, reference, answers best first) of a row, or the reason it cannot be judged."""
    missing = [c for c in PROTOCOL_COLUMNS[protocol] if row.get(c) is None]
    if missing:
        return f"missing_{missing[0]}"
    if protocol == "pairwise":
        prompt, reference, answers = row["prompt"], row["reference"], [row["chosen"], row["rejected"]]
    else:
        column, least = ("candidates", 2) if protocol == "best_of_n" else ("ranking", 3)
        ranked = row[column]
        if not isinstance(ranked, (list, tuple)) or len(ranked) < least:
            return f"{column}_fewer_than_{least}"
        if protocol == "best_of_n":
            prompt, reference, answers = row["prompt"], row["reference"], list(ranked)
        else:
            prompt, reference, answers = row["prompt"], ranked[0], list(ranked[1:3])
    for value in (prompt, reference, *answers):
        try:
            flatten(value)
        except ValueError:
            return "not_text"
    return prompt, reference, answers


def evaluate(
    scorer: Scorer,
    rows: Sequence[dict[str, Any]],
    protocol: str = "auto",
    category_column: str | None = "category",
    wrapper: str = "sft",
    *,
    max_rows: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
    chunk_items: int = DEFAULT_CHUNK_ITEMS,
) -> EvaluationReport:
    """Score every row's answers (and each reference against itself) and measure accuracy.

    Args:
        scorer: a `trl_polar.scorer.Scorer`: a `PolarScorer`, a `PolarClient`, or anything with
            ``.score(prompts, references, candidates) -> list[float]``.
        rows: dicts (a `datasets.Dataset` works too).
        protocol: "pairwise", "best_of_n", "rmb" or "auto" (from the columns).
        category_column: report accuracy per value of this column where rows have it (and per level of a
            "/"-separated path).
        max_rows: judge a stratified sample of this many rows (per ``category_column``), a quick estimate.
        seed: the sample's seed.
        show_progress: a progress bar (with time left) over the distinct answers scored.
        chunk_items: answers per scoring call; the answers of one (prompt, reference) stay in one call.

    Example::

        report = evaluate(PolarScorer("./polar-rm"), rows, max_rows=2000)
        report.accuracy, report.per_category, report.category_rollup, report.throughput
    """
    rows = list(rows)
    if not rows:
        raise ValueError("No rows to evaluate.")
    if protocol == "auto":
        protocol = detect_protocol(rows[0].keys())
    elif protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be 'auto' or one of {PROTOCOLS}, got {protocol!r}.")
    _check_columns(rows[0].keys(), protocol)
    sample, numbers = None, range(len(rows))  # numbers: each row's place in the input, for messages
    if max_rows is not None and max_rows < len(rows):
        numbers = stratified_sample(rows, max_rows, category_column, seed)
        sample = {"rows": len(numbers), "from_rows": len(rows), "seed": seed, "stratified_by": category_column}
        rows = [rows[i] for i in numbers]
    judged, groups, judged_numbers, skipped = [], [], [], Counter()
    for i, row in zip(numbers, rows, strict=True):
        parsed = _answers(row, protocol)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            if skipped[parsed] <= 3:
                logger.warning("Row at index %d cannot be judged (%s); it is skipped and counted.", i, parsed)
            continue
        judged.append(row)
        groups.append(parsed)
        judged_numbers.append(i)
    if skipped:
        logger.warning("Skipped %d of %d rows that cannot be judged: %s", skipped.total(), len(rows), dict(skipped))
    if not groups:
        raise ValueError(f"None of the {len(rows)} rows can be judged under the {protocol} protocol: {dict(skipped)}.")
    per_group, throughput = _score_groups(
        scorer, groups, judged_numbers, protocol, wrapper, show_progress, chunk_items
    )
    correct, margins, ties = [], [], 0
    scores_by_rank: dict[str, list[float]] = defaultdict(list)
    self_scores = []
    for self_score, *ranked in per_group:
        self_scores.append(self_score)
        for rank, s in enumerate(ranked, start=1 if protocol != "rmb" else 2):
            scores_by_rank[f"rank_{rank}"].append(s)
        correct.append(all(ranked[0] > other for other in ranked[1:]))
        margins.append(ranked[0] - max(ranked[1:]))
        ties += ranked[0] == max(ranked[1:])
    per_category = _per_category(judged, correct, category_column)
    return EvaluationReport(
        protocol=protocol,
        num_rows=len(judged),
        accuracy=sum(correct) / len(correct),
        rows_read=len(rows),
        ties=ties,
        skipped=dict(skipped),
        sample=sample,
        per_category=per_category,
        category_rollup=_rollup(per_category),
        score_stats_by_rank={k: _stats(v) for k, v in sorted(scores_by_rank.items())},
        margin_stats=_stats(margins),
        reference_self_score=_stats(self_scores),
        throughput=throughput,
        scores_by_rank=dict(scores_by_rank),
        row_scores=per_group,
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


def _score_groups(
    scorer: Scorer,
    groups: list[tuple[Any, Any, list[Any]]],
    numbers: list[int],
    protocol: str,
    wrapper: str,
    show_progress: bool,
    chunk_items: int,
) -> tuple[list[list[float]], dict[str, float]]:
    """Per group: r(p, ref, ref), then its answers' scores, best first; and the throughput of the scoring."""
    # Each distinct (prompt, reference, answer) is one item, whichever rows hold it; items are kept together by
    # (prompt, reference), so that a scoring call holds a prefix's answers side by side and runs the prefix once.
    items: dict[tuple[str, str, str], int] = {}
    by_prefix: dict[tuple[str, str], list[int]] = defaultdict(list)
    values: list[tuple[Any, Any, Any]] = []
    slots: list[list[int]] = []
    origin: list[tuple[int, int]] = []  # (group, position) of each item's first holder, for error messages
    for g, (prompt, reference, answers) in enumerate(groups):
        prefix = (flatten(prompt), flatten(reference))
        slot = []
        for position, answer in enumerate([reference, *answers]):
            key = (*prefix, flatten(answer))
            if key not in items:
                items[key] = len(values)
                values.append((prompt, reference, answer))
                origin.append((g, position))
                by_prefix[prefix].append(items[key])
            slot.append(items[key])
        slots.append(slot)
    chunks: list[list[int]] = [[]]
    for members in by_prefix.values():
        if chunks[-1] and len(chunks[-1]) + len(members) > chunk_items:
            chunks.append([])
        chunks[-1].extend(members)
    from tqdm.auto import tqdm

    scores = [0.0] * len(values)
    tokens_run = tokens_saved = 0
    planned = False
    bar = tqdm(total=len(values), desc="POLAR evaluation", unit="item", disable=not show_progress)
    start = time.perf_counter()
    # A local scorer says what it ran (`PolarScorer.observe`); a remote one does not.
    observe = getattr(scorer, "observe", contextlib.nullcontext)
    for chunk in chunks:
        prompts, references, candidates = (list(column) for column in zip(*(values[i] for i in chunk), strict=True))
        try:
            with observe() as runs:
                got = scorer.score(prompts, references, candidates, wrapper)
        except EncodeError as err:
            g, position = origin[chunk[err.index]]
            bar.close()
            raise ValueError(
                f"Index {numbers[g]}, column `{_answer_column(protocol, position)}`: {err.reason}"
            ) from None
        if len(got) != len(chunk):
            bar.close()
            raise ValueError(f"The scorer returned {len(got)} scores for {len(chunk)} items.")
        for i, s in zip(chunk, got, strict=True):
            scores[i] = float(s)
        plan = runs[-1].plan if runs else None
        if plan:
            # A local scorer says what it ran: every unit's prefix once instead of once per member.
            planned = True
            tokens_run += sum(mb.tokens for mb in plan)
            tokens_saved += sum(u.prefix * (len(u.members) - 1) for mb in plan for u in mb.units)
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    throughput = {
        "seconds": seconds,
        "rows_per_second": len(groups) / seconds if seconds else float("inf"),
        "items_requested": sum(len(slot) for slot in slots),
        "items_scored": len(values),
        "items_per_second": len(values) / seconds if seconds else float("inf"),
        "prefix_groups": len(by_prefix),
    }
    if planned:
        throughput.update(
            tokens_run=tokens_run,
            tokens_saved=tokens_saved,
            shared_token_fraction=tokens_saved / (tokens_run + tokens_saved) if tokens_run + tokens_saved else 0.0,
        )
    return [[scores[i] for i in slot] for slot in slots], throughput


def _per_category(rows: list[dict[str, Any]], correct: list[bool], column: str | None) -> dict[str, dict[str, float]]:
    if not column or not all(column in row for row in rows):
        return {}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for row, ok in zip(rows, correct, strict=True):
        by_category[str(row[column])].append(ok)
    return {k: {"rows": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for k, v in by_category.items()}


def _rollup(per_category: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every proper prefix of the "/"-separated category paths: its rows pooled, and the mean of its categories."""
    held: dict[str, list[str]] = defaultdict(list)
    for name in per_category:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            held["/".join(parts[:depth])].append(name)
    rollup = {}
    for prefix, names in held.items():
        rows = sum(per_category[n]["rows"] for n in names)
        correct = sum(per_category[n]["correct"] for n in names)
        rollup[prefix] = {
            "rows": rows,
            "correct": correct,
            "accuracy": correct / rows,
            "categories": len(names),
            "macro_accuracy": sum(per_category[n]["accuracy"] for n in names) / len(names),
        }
    return rollup


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")


def _accuracy_bars(plt: Any, cells: dict[str, dict[str, float]], overall: float, title: str, by_level: bool) -> Any:
    """Horizontal bars, best on top (``by_level``: the top level first, then the next), each labelled with its
    full name and n, its value printed at its end."""
    depth = (lambda n: n.count("/")) if by_level else (lambda n: 0)
    names = sorted(cells, key=lambda n: (depth(n), -cells[n]["accuracy"], n))
    height = 0.9 + 0.26 * len(names)
    fig, ax = plt.subplots(figsize=(10, height))
    y = list(range(len(names)))[::-1]
    accuracy = [cells[n]["accuracy"] for n in names]
    ax.barh(y, accuracy, height=0.7, color="#4c72b0")
    for yi, value in zip(y, accuracy, strict=True):
        # The value is printed for every bar, so an accuracy of 0 (no bar at all) still reads.
        ax.text(value + 0.01, yi, f"{value:.3f}", va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # fmt: skip
    ax.set_yticks(y, [f"{n}  (n={cells[n]['rows']:.0f})" for n in names], fontsize=8)
    ax.axvline(overall, color="#c44e52", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def write_report(
    report: EvaluationReport,
    out_dir: str | os.PathLike,
    plots: bool = True,
    rank_labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write report.json, summary.md and (with matplotlib) PNG plots to `out_dir`; return the paths written.

    The plots: the score distribution per rank, accuracy per category and, where categories are paths, accuracy
    per level of the path (``accuracy_by_group.png``).

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
    if report.scores_by_rank:
        ax.legend()
    fig.tight_layout()
    _save(fig, out / "scores_by_rank.png")
    plt.close(fig)
    written["scores_by_rank"] = str(out / "scores_by_rank.png")
    figures = [("accuracy_by_category", report.per_category, "category", False)]
    if report.category_rollup:
        figures.append(("accuracy_by_group", report.category_rollup, "group of categories (rows pooled)", True))
    for name, cells, what, by_level in figures:
        if not cells:
            continue
        title = f"Accuracy per {what}: {report.protocol}, {report.num_rows} rows, overall {report.accuracy:.3f}"
        fig = _accuracy_bars(plt, cells, report.accuracy, title, by_level)
        _save(fig, out / f"{name}.png")
        plt.close(fig)
        written[name] = str(out / f"{name}.png")
    return written
