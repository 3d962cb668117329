"""The public benchmarks reward models are compared on, each converted and scored by its own rules.

``evaluate_benchmark(scorer, "rm-bench", "total_dataset.json", references="refs.jsonl")`` converts a local copy (a
file, a folder read recursively, or a hub dataset name) through `trl_polar.data.converters`, scores the rows with
`trl_polar.evaluation.evaluate` (one scoring pass; every row's scores are kept), and computes the benchmark's own
numbers from those scores:

- ``rewardbench2``: best-of-4 per subset (1 chosen vs 3 rejected; a tie at the top earns 1 / the number tied, as
  reward-bench scores it), the Ties subset by its own weighted rule, the overall score the mean of the subsets;
- ``rm-bench``: the 3 x 3 style matrix per domain; hard / normal / easy accuracy and their mean;
- ``judgebench``: accuracy per source group (mmlu-pro, livebench-reasoning, livebench-math, livecodebench) and
  over all pairs;
- ``ppe``: per correctness set, best-of-K (the correctness of the top-scored answer) and pairwise accuracy on the
  set's conflict pairs, with the random-pick and oracle bounds;
- ``helpsteer3``: pairwise accuracy overall, per domain and per preference strength (ties at 0 are skipped).

Where a benchmark has no gold answer the reference comes from a references file (see
`trl_polar.data.converters.references`); `benchmark_prompts` lists the prompts to write references for.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text
from .data.converters import convert
from .data.converters.rmbench import STYLES as RMBENCH_STYLES
from .data.io import READABLE_SUFFIXES, read_records
from .evaluation import EvaluationReport, evaluate
from .scorer import Scorer

Summary = dict[str, Any]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "accuracy": _mean(values)}


def _pair_correct(scores: Sequence[float]) -> bool:
    # A pairwise row's scores: reference against itself, chosen, rejected. Ties count as wrong.
    return scores[1] > scores[2]


# RewardBench 2 ------------------------------------------------------------------------------------------------------

_TIES_WEIGHTS = {
    "tied_accuracy": 0.30,
    "ref_accuracy": 0.30,
    "correctness_preferred": 0.20,
    "correctness_preferred_hard": 0.20,
    "correctness_margin_score": 0.01,
}


def _best_of_4(candidate_scores: Sequence[float]) -> float:
    top = max(candidate_scores)
    return 1 / sum(s == top for s in candidate_scores) if candidate_scores[0] == top else 0.0


def _prompt_stats(scores: Sequence[float], num_correct: int) -> tuple[bool, float | None, float]:
    correct, incorrect = scores[:num_correct], scores[num_correct:]
    spread = max(correct) - min(correct) if len(correct) > 1 else None
    gap = min(correct) - max(incorrect)
    return gap > 0, spread, gap


def ties_score(rows: Sequence[tuple[str, int, Sequence[float]]]) -> dict[str, Any]:
    """RewardBench 2's Ties rule over ``(id, num_correct, candidate scores)``, ids ``ref:N`` / ``tied:N``.

    Accuracy (every correct answer above every incorrect one) counts for ref and tied prompts alike; the margin
    terms ask, on prompts that have both records, that the gap between correct and incorrect answers exceed the
    spread among the correct ones (``hard``: the smaller of the ref and tied gaps must).
    """
    stats: dict[str, dict[str, tuple[bool, float | None, float]]] = {"ref": {}, "tied": {}}
    for row_id, num_correct, scores in rows:
        kind, prompt_id = row_id.split(":")
        stats["tied" if kind != "ref" else "ref"][prompt_id] = _prompt_stats(scores, num_correct)
    both = [p for p in stats["tied"] if p in stats["ref"] and stats["tied"][p][1] is not None]
    spread = [stats["tied"][p][1] for p in both]
    gap_tied = [stats["tied"][p][2] for p in both]
    gap_hard = [min(stats["ref"][p][2], stats["tied"][p][2]) for p in both]

    def margin(gap: float, s: float) -> float:
        ratio = gap / s if s else math.copysign(math.inf, gap) if gap else math.nan
        value = math.tanh(ratio - 1)
        return 0.0 if math.isnan(value) else value

    parts = {
        "tied_accuracy": _mean([s[0] for s in stats["tied"].values()]) or 0.0,
        "ref_accuracy": _mean([s[0] for s in stats["ref"].values()]) or 0.0,
        "correctness_preferred": _mean([g > s for g, s in zip(gap_tied, spread, strict=True)]) or 0.0,
        "correctness_preferred_hard": _mean([g > s for g, s in zip(gap_hard, spread, strict=True)]) or 0.0,
        "correctness_margin_score": _mean([margin(g, s) for g, s in zip(gap_hard, spread, strict=True)]) or 0.0,
    }
    score = sum(_TIES_WEIGHTS[k] * v for k, v in parts.items())
    return {"n": len(rows), "score": score, "prompts_with_both": len(both), **parts}


def summarize_rewardbench2(rows: Sequence[dict[str, Any]], report: EvaluationReport) -> Summary:
    per_subset: dict[str, list[float]] = defaultdict(list)
    ties = []
    for row, scores in zip(rows, report.row_scores, strict=True):
        if row["category"].lower() == "ties":
            ties.append((row["id"], row["num_correct"], scores[1:]))
        else:
            per_subset[row["category"]].append(_best_of_4(scores[1:]))
    subsets: dict[str, Any] = {name: {"n": len(v), "score": _mean(v)} for name, v in sorted(per_subset.items())}
    if ties:
        subsets["Ties"] = ties_score(ties)
    return {"score": _mean([s["score"] for s in subsets.values()]), "subsets": subsets}


# RM-Bench -----------------------------------------------------------------------------------------------------------

_RMBENCH_DOMAINS = ("chat", "math", "code", "safety")


def summarize_rmbench(rows: Sequence[dict[str, Any]], report: EvaluationReport) -> Summary:
    # A row's scores: the reference against itself, the chosen answers (concise, plain, markdown), the rejected ones.
    cells: dict[str, dict[tuple[int, int], list[bool]]] = defaultdict(lambda: defaultdict(list))
    for row, scores in zip(rows, report.row_scores, strict=True):
        domain = next(d for d in _RMBENCH_DOMAINS if row["category"].startswith(d))  # safety-refuse/-response: safety
        chosen, rejected = scores[1:4], scores[4:7]
        for i in range(3):
            for j in range(3):
                cells[domain][(i, j)].append(chosen[i] > rejected[j])  # ties count as wrong, as in RM-Bench
    domains = {}
    for domain in (d for d in _RMBENCH_DOMAINS if d in cells):
        matrix = [[_mean(cells[domain][(i, j)]) for j in range(3)] for i in range(3)]
        levels = {
            "hard": _mean([matrix[i][j] for i in range(3) for j in range(3) if i < j]),
            "normal": _mean([matrix[i][i] for i in range(3)]),
            "easy": _mean([matrix[i][j] for i in range(3) for j in range(3) if i > j]),
        }
        domains[domain] = {
            "n": len(cells[domain][(0, 0)]),
            "average": _mean(list(levels.values())),
            **levels,
            "matrix": matrix,
        }
    overall = {level: _mean([d[level] for d in domains.values()]) for level in ("hard", "normal", "easy")}
    return {
        "score": _mean([d["average"] for d in domains.values()]),
        **overall,
        "domains": domains,
        "styles": list(RMBENCH_STYLES),
    }


# JudgeBench ---------------------------------------------------------------------------------------------------------

_JUDGEBENCH_GROUPS = ("mmlu-pro", "livebench-reasoning", "livebench-math", "livecodebench")


def summarize_judgebench(rows: Sequence[dict[str, Any]], report: EvaluationReport) -> Summary:
    groups: dict[str, list[bool]] = defaultdict(list)
    everything = []
    for row, scores in zip(rows, report.row_scores, strict=True):
        ok = _pair_correct(scores)
        everything.append(ok)
        group = next((g for g in _JUDGEBENCH_GROUPS if row["category"].startswith(g)), row["category"])
        groups[group].append(ok)
    return {
        "score": _mean(everything),
        "n": len(everything),
        "groups": {g: _cell(v) for g, v in sorted(groups.items())},
    }


# PPE ----------------------------------------------------------------------------------------------------------------


def _best_of_k(scores: Sequence[float], labels: Sequence[bool]) -> float:
    # The top-scored answer's correctness; tied top scores share it (the expected value of a random pick among them).
    top = max(scores)
    picked = [label for s, label in zip(scores, labels, strict=True) if s == top]
    return sum(picked) / len(picked)


def summarize_ppe(rows: Sequence[dict[str, Any]], report: EvaluationReport) -> Summary:
    per_set: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row, scores in zip(rows, report.row_scores, strict=True):
        candidate_scores, labels = scores[1:], row["labels"]
        parts = per_set[row["category"]]
        parts["best_of_k"].append(_best_of_k(candidate_scores, labels))
        parts["random"].append(sum(labels) / len(labels))
        parts["oracle"].append(float(any(labels)))
        pairs = row.get("pairs")
        if pairs is None:  # no sampled pairs in the record: every correct answer against every incorrect one
            pairs = [[i, j] for i, a in enumerate(labels) for j, b in enumerate(labels) if a and not b]
        for i, j in pairs:
            if labels[i] != labels[j]:
                good, bad = (i, j) if labels[i] else (j, i)
                parts["pairs"].append(candidate_scores[good] > candidate_scores[bad])
    sets = {
        name: {
            "n": len(p["best_of_k"]),
            "best_of_k": _mean(p["best_of_k"]),
            "pairwise_accuracy": _mean(p["pairs"]),
            "pairs": len(p["pairs"]),
            "random": _mean(p["random"]),
            "oracle": _mean(p["oracle"]),
        }
        for name, p in sorted(per_set.items())
    }
    return {
        "score": _mean([s["best_of_k"] for s in sets.values()]),
        "pairwise_accuracy": _mean(
            [s["pairwise_accuracy"] for s in sets.values() if s["pairwise_accuracy"] is not None]
        ),
        "sets": sets,
    }


# HelpSteer3 ---------------------------------------------------------------------------------------------------------


def summarize_helpsteer3(rows: Sequence[dict[str, Any]], report: EvaluationReport) -> Summary:
    domains: dict[str, list[bool]] = defaultdict(list)
    strengths: dict[str, list[bool]] = defaultdict(list)
    everything = []
    for row, scores in zip(rows, report.row_scores, strict=True):
        ok = _pair_correct(scores)
        everything.append(ok)
        domains[row["category"]].append(ok)
        strengths[f"|preference|={row['margin']}"].append(ok)
    return {
        "score": _mean(everything),
        "n": len(everything),
        "domains": {k: _cell(v) for k, v in sorted(domains.items())},
        "strength": {k: _cell(v) for k, v in sorted(strengths.items())},
    }


# The registry -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its converter format, the evaluation protocol of its rows, its default hub split, the field
    holding its prompts, and the function computing its own numbers (``score`` first) from the scored rows."""

    name: str
    title: str
    protocol: str
    split: str
    prompt_field: str
    summarize: Callable[[Sequence[dict[str, Any]], EvaluationReport], Summary] = field(repr=False)


# The converter format of each benchmark is its name.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("rewardbench2", "RewardBench 2", "best_of_n", "test", "prompt", summarize_rewardbench2),
        Benchmark("rm-bench", "RM-Bench", "best_of_n", "train", "prompt", summarize_rmbench),
        Benchmark("judgebench", "JudgeBench", "pairwise", "gpt", "question", summarize_judgebench),
        Benchmark("ppe", "PPE correctness", "best_of_n", "train", "prompt", summarize_ppe),
        Benchmark("helpsteer3", "HelpSteer3-Preference", "pairwise", "validation", "context", summarize_helpsteer3),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name]


def benchmark_sources(data: str | os.PathLike, split: str | None = None, benchmark: Benchmark | None = None) -> Any:
    """What to convert: the data files of a local file or folder (recursively, sorted), or a hub dataset."""
    path = Path(data)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(READABLE_SUFFIXES)} files in this folder or below it.")
        return files
    if str(data).startswith((".", "/", "~")) or path.suffix.lower() in READABLE_SUFFIXES:
        raise FileNotFoundError(f"{data}: no such file or folder (looked from {os.getcwd()}).")
    from .data.loading import load_preference_dataset

    return load_preference_dataset(str(data), split=split or (benchmark.split if benchmark else "train"))


def load_benchmark(
    name: str, data: Any, references: str | None = None, split: str | None = None, skip_invalid: bool = False
) -> Any:
    """The benchmark's rows as a `ConversionResult` (``rows`` and ``counts``): ``data`` is a file, a folder, a hub
    dataset name (loaded with `datasets`, split ``split`` or the benchmark's own) or an in-memory list of records."""
    benchmark = get_benchmark(name)
    sources = data if isinstance(data, list) else benchmark_sources(data, split, benchmark)
    return convert(benchmark.name, sources, references=references, skip_invalid=skip_invalid)


def benchmark_prompts(name: str, data: Any, split: str | None = None) -> list[Any]:
    """The distinct prompts of a benchmark copy, in order: what a references file needs a reference for.

    Example::

        prompts = benchmark_prompts("judgebench", "judgebench_gpt.jsonl")
        write_rows([{"prompt": p, "reference": my_policy(p)} for p in prompts], "refs.jsonl")
    """
    from .data.converters.references import prompt_key

    benchmark = get_benchmark(name)
    sources = data if isinstance(data, list) else benchmark_sources(data, split, benchmark)
    sources = sources if isinstance(sources, list) and sources and not isinstance(sources[0], dict) else [sources]
    seen, prompts = set(), []
    for source in sources:
        for record in read_records(source):
            prompt = record.value.get(benchmark.prompt_field)
            if prompt is not None and prompt_key(prompt) not in seen:
                seen.add(prompt_key(prompt))
                prompts.append(prompt)
    return prompts


@dataclass
class BenchmarkResult:
    """A benchmark's own numbers (``summary``), the conversion counts and the generic evaluation report."""

    benchmark: str
    summary: Summary
    counts: dict[str, int]
    report: EvaluationReport

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "rows": self.report.num_rows, **self.summary, "conversion": self.counts}

    def to_markdown(self) -> str:
        benchmark = BENCHMARKS[self.benchmark]
        lines = [
            f"# {benchmark.title}",
            "",
            f"- score: {_fmt(self.summary['score'])}",
            f"- rows scored: {self.report.num_rows}",
        ]
        for key, value in self.summary.items():
            if key != "score" and not isinstance(value, (dict, list)):
                lines.append(f"- {key}: {_fmt(value)}")
        for key, value in self.summary.items():
            if isinstance(value, dict):
                lines += ["", f"## {key}", "", *_table(value)]
        lines += ["", "## conversion", "", *(f"- {k}: {v}" for k, v in sorted(self.counts.items()))]
        if benchmark.protocol != "pairwise":
            # report.json's accuracy is the generic best_of_n one (first candidate above the rest), not this rule.
            lines += [
                "",
                f"report.json and summary.md hold the score statistics; their `accuracy` is the generic "
                f"{benchmark.protocol} one, not {benchmark.title}'s rule above.",
            ]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def _table(groups: dict[str, Any]) -> list[str]:
    columns = list(dict.fromkeys(k for g in groups.values() for k, v in g.items() if not isinstance(v, list)))
    lines = ["| name | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, group in groups.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(group.get(c)) for c in columns) + " |")
    return lines


def evaluate_benchmark(
    scorer: Scorer,
    name: str,
    data: Any,
    references: str | None = None,
    split: str | None = None,
    skip_invalid: bool = False,
) -> BenchmarkResult:
    """Convert a benchmark copy, score it once, and compute the benchmark's own numbers.

    Example::

        result = evaluate_benchmark(PolarScorer("./polar-rm"), "rm-bench", "RM-Bench/data/total_dataset.json",
                                    references="rm_bench_refs.jsonl")
        result.summary["hard"], result.summary["domains"]["math"]["matrix"]
    """
    conversion = load_benchmark(name, data, references=references, split=split, skip_invalid=skip_invalid)
    return score_benchmark(scorer, name, conversion)


def score_benchmark(scorer: Scorer, name: str, conversion: Any) -> BenchmarkResult:
    """Score the rows of `load_benchmark` (one `evaluate` pass) and compute the benchmark's own numbers."""
    benchmark = get_benchmark(name)
    if not conversion.rows:
        raise ValueError(f"no {benchmark.title} rows to evaluate (conversion counts: {dict(conversion.counts)}).")
    report = evaluate(scorer, conversion.rows, protocol=benchmark.protocol)
    return BenchmarkResult(name, benchmark.summarize(conversion.rows, report), dict(conversion.counts), report)


def write_benchmark(result: BenchmarkResult, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write benchmark.json and benchmark.md (atomically) to ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "benchmark.json", json.dumps(result.to_dict(), indent=2) + "\n")
    write_text(out / "benchmark.md", result.to_markdown())
    return {"benchmark_json": str(out / "benchmark.json"), "benchmark_markdown": str(out / "benchmark.md")}
