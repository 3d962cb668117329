"""``trl-polar evaluate``: accuracy, a report and plots, with a local model or a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..atomic import check_destination
from .errors import CLIError


def evaluate(
    data: Annotated[str, typer.Option(help="A .jsonl/.json/.parquet/.csv file or a hub dataset name.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json, summary.md and plots.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    protocol: Annotated[str, typer.Option(help="auto, pairwise, best_of_n or rmb.")] = "auto",
    split: Annotated[str, typer.Option(help="Dataset split (or slice, e.g. train[:1000]).")] = "train",
    category_column: Annotated[str, typer.Option(help="Report accuracy per value of this column.")] = "category",
    max_tokens_per_batch: Annotated[int, typer.Option(help="Token budget of one scoring micro-batch.")] = 32768,
    plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    max_rows: Annotated[
        int | None, typer.Option(help="Judge a sample of this many rows, stratified by the category column.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-rows sample.")] = 0,
) -> None:
    """Accuracy of a POLAR reward model on pairwise, best-of-N or RMB-style data, with a report and plots."""
    from ..data.loading import load_preference_dataset
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import write_report

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    check_destination(out, inputs=[data] if Path(data).exists() else [], directory=True)
    if model is not None:
        from ..scorer import PolarScorer

        # The evaluation's own bar spans the whole run; the scorer's would restart at every scoring call.
        scorer = PolarScorer(model, max_tokens_per_batch=max_tokens_per_batch, dtype="auto", show_progress=False)
    else:
        from ..serving.client import PolarClient

        scorer = PolarClient(url=url)
    rows = load_preference_dataset(data, split=split)
    try:
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
