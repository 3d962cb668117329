"""``trl-polar evaluate``: accuracy, a report and plots, with a local model or a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import check_destination
from .errors import CLIError
from .remote import ApiKey, server_client, server_errors


def evaluate(
    data: Annotated[str, typer.Option(help="A .jsonl/.json/.parquet/.csv file or a hub dataset name.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json, summary.md and plots.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    api_key: ApiKey = None,
    protocol: Annotated[str, typer.Option(help="auto, pairwise, best_of_n or rmb.")] = "auto",
    split: Annotated[
        str | None,
        typer.Option(help="Dataset split (or slice, e.g. train[:1000]); default: train, or that of --benchmark."),
    ] = None,
    category_column: Annotated[str, typer.Option(help="Report accuracy per value of this column.")] = "category",
    max_tokens_per_batch: Annotated[int, typer.Option(help="Token budget of one scoring micro-batch.")] = 16384,
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    max_rows: Annotated[
        int | None, typer.Option(help="Judge a sample of this many rows, stratified by the category column.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-rows sample.")] = 0,
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
    inputs = [p for p in (data, references) if p is not None and Path(p).exists()]
    check_destination(out, inputs=inputs, directory=True)
    # A benchmark is converted before the model loads, so that a bad record or a missing reference stops at once.
    conversion = _load_benchmark(benchmark, data, references, split, skip_invalid) if benchmark else None
    if model is not None:
        from ..scorer import PolarScorer

        # The evaluation's own bar spans the whole run; the scorer's would restart at every scoring call.
        scorer = PolarScorer(model, max_tokens_per_batch=max_tokens_per_batch, dtype="auto", show_progress=False)
    else:
        scorer = server_client(url, api_key)
    if benchmark is not None:
        with server_errors(url):
            return _evaluate_benchmark(scorer, benchmark, data, conversion, out, plots)
    rows = load_preference_dataset(data, split=split or "train")
    try:
        with server_errors(url):
            report = run_evaluation(
                scorer,
                rows,
                protocol=protocol,
                category_column=category_column,
                max_rows=max_rows,
                seed=seed,
                show_progress=True,
            )
    except ValueError as err:
        raise CLIError(f"{data}: {err}") from None
    paths = write_report(report, out, plots=plots)
    typer.echo(report.to_markdown())
    typer.echo("Wrote " + ", ".join(paths.values()))


def _load_benchmark(benchmark: str, data: str, references: str | None, split: str | None, skip: bool) -> Any:
    from ..benchmark_sets import BENCHMARKS, load_benchmark

    if benchmark not in BENCHMARKS:
        raise CLIError(f"Unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}.")
    try:
        return load_benchmark(benchmark, data, references=references, split=split, skip_invalid=skip)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err) if str(err).startswith(str(data)) else f"{data}: {err}") from None


def _evaluate_benchmark(scorer: Any, benchmark: str, data: str, conversion: Any, out: Path, plots: bool) -> None:
    from ..benchmark_sets import score_benchmark, write_benchmark
    from ..evaluation import write_report

    try:
        result = score_benchmark(scorer, benchmark, conversion)
    except ValueError as err:
        raise CLIError(f"{data}: {err}") from None
    paths = write_report(result.report, out, plots=plots)
    paths.update(write_benchmark(result, out))
    typer.echo(result.to_markdown())
    typer.echo("Wrote " + ", ".join(paths.values()))
