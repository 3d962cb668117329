"""``trl-polar preflight``: is the reward sane on N rows of the RL data, before a long run? Exit 1 when not."""

from __future__ import annotations

import json
import random
from typing import Annotated

import typer

from .errors import CLIError
from .remote import ApiKey, server_client, server_errors


def preflight_command(
    data: Annotated[str, typer.Option(help="The RL rows: a .jsonl/.json/.parquet/.csv file or a hub dataset name.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    api_key: ApiKey = None,
    rows: Annotated[int, typer.Option(help="How many rows to check (a seeded sample when the data has more).")] = 32,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    prompt_column: Annotated[str, typer.Option(help="Column of the prompt.")] = "prompt",
    reference_column: Annotated[str, typer.Option(help="Column of the reference answer.")] = "reference",
    min_agreement: Annotated[float, typer.Option(help="Share of rows in which each ordering must hold.")] = 0.8,
    min_gap: Annotated[float, typer.Option(help="Least mean(copy) - mean(wrong) score.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the row sample and the perturbations.")] = 0,
    device: Annotated[str | None, typer.Option(help="With --model: cpu, cuda, ... (default: this rank's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Check a reward model on N rows of RL data: each reference should score above a perturbed copy of it, which
    should score above another row's reference. Prints the scores and the verdict; exits 1 when a check fails."""
    from ..data.loading import load_preference_dataset
    from ..preflight import preflight

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    if rows < 2:
        raise CLIError(f"--rows must be at least 2, got {rows}.")
    dataset = load_preference_dataset(data, split=split)
    missing = [c for c in (prompt_column, reference_column) if c not in dataset.column_names]
    if missing:
        raise CLIError(
            f"{data}: no column(s) {missing} (it has {dataset.column_names}); pass --prompt-column or "
            "--reference-column."
        )
    picked = sorted(random.Random(seed).sample(range(len(dataset)), rows)) if len(dataset) > rows else None
    sample = dataset.select(picked) if picked is not None else dataset
    if model is not None:
        from ..scorer import PolarScorer

        scorer = PolarScorer(model, device=device, dtype="auto")
    else:
        scorer = server_client(url, api_key)
    try:
        with server_errors(url):
            report = preflight(scorer, sample[prompt_column], sample[reference_column], min_agreement=min_agreement,
                               min_gap=min_gap, seed=seed)  # fmt: skip
    except ValueError as err:
        raise CLIError(f"{data}: {err}") from None
    typer.echo(json.dumps(report.to_dict()) if as_json else report.to_markdown())
    if not report.passed:
        raise typer.Exit(1)
