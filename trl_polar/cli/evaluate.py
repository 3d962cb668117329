"""``trl-polar evaluate``: accuracy, a report and plots, with a local model or a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import check_destination
from .errors import CLIError


def evaluate(
    data: Annotated[str, typer.Option(help="A .jsonl/.json/.parquet/.csv file or a hub dataset name.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json, summary.md and plots.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    protocol: Annotated[str, typer.Option(help="auto, pairwise, best_of_n or rmb.")] = "auto",
    split: Annotated[
        str | None,
        typer.Option(help="Dataset split (or slice, e.g. train[:1000]); default train, or the benchmark's."),
    ] = None,
    category_column: Annotated[str, typer.Option(help="Report accuracy per value of this column.")] = "category",
    max_tokens_per_batch: Annotated[int, typer.Option(help="Token budget of one scoring micro-batch.")] = 32768,
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    benchmark: Annotated[
        str | None,
        typer.Option(
            help="Score --data (a local copy or hub name) as this benchmark, by its own rules: "
            "rewardbench2 | rm-bench | judgebench | ppe | helpsteer3."
        ),
    ] = None,
    references: Annotated[
        str | None, typer.Option(help="With --benchmark: a file of prompt/reference rows (where it has no gold).")
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="With --benchmark: skip and count malformed records instead of stopping.")
    ] = False,
) -> None:
    """Accuracy of a POLAR reward model on pairwise, best-of-N or RMB-style data, with a report and plots."""
    from ..data.loading import load_preference_dataset
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import write_report

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    if benchmark is not None:
        from ..benchmark_sets import BENCHMARKS

        if benchmark not in BENCHMARKS:
            raise CLIError(f"Unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}.")
    check_destination(out, inputs=[data] if Path(data).exists() else [], directory=True)
    if model is not None:
        from ..scorer import PolarScorer

        scorer = PolarScorer(model, max_tokens_per_batch=max_tokens_per_batch, dtype="auto", show_progress=True)
    else:
        from ..serving.client import PolarClient

        scorer = PolarClient(url=url)
    if benchmark is not None:
        return _evaluate_benchmark(scorer, benchmark, data, out, references, split, skip_invalid, plots)
    rows = load_preference_dataset(data, split=split or "train")
    try:
        report = run_evaluation(scorer, rows, protocol=protocol, category_column=category_column)
    except ValueError as err:
        raise CLIError(f"{data}: {err}") from None
    paths = write_report(report, out, plots=plots)
    typer.echo(report.to_markdown())
    typer.echo("Wrote " + ", ".join(paths.values()))


def _evaluate_benchmark(
    scorer: Any,
    benchmark: str,
    data: str,
    out: Path,
    references: str | None,
    split: str | None,
    skip_invalid: bool,
    plots: bool,
) -> None:
    from ..benchmark_sets import evaluate_benchmark, write_benchmark
    from ..evaluation import write_report

    try:
        result = evaluate_benchmark(scorer, benchmark, data, references, split=split, skip_invalid=skip_invalid)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"{data}: {err}" if not str(err).startswith(str(data)) else str(err)) from None
    paths = write_report(result.report, out, plots=plots)
    paths.update(write_benchmark(result, out))
    typer.echo(result.to_markdown())
    typer.echo("Wrote " + ", ".join(paths.values()))
