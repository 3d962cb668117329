"""``trl-polar version`` and ``trl-polar format``: what is installed, and the exact text a row becomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import CLIError


def version() -> None:
    """Print the versions of trl_polar and the libraries it builds on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from .. import __version__

    typer.echo(f"trl-polar {__version__}")
    for name in ("trl", "transformers", "torch", "accelerate", "peft", "datasets"):
        try:
            typer.echo(f"{name} {package_version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name} (not installed)")


def read_row(path: Path, row: int) -> dict[str, Any]:
    """Row `row` (0-based) of a .json (a list of objects) or .jsonl file."""
    from ..data.io import read_row as read_file_row

    return read_file_row(path, row)


def _template(model: str | None, tokenizer: str | None, overrides: dict[str, Any]):
    from ..hub import load_tokenizer
    from ..template import PolarTemplate

    overrides = {k: v for k, v in overrides.items() if v is not None}
    loaded = load_tokenizer(tokenizer) if tokenizer else None
    if model:
        # The model's recorded template, read with --tokenizer when given (e.g. a checkpoint saved without one).
        return PolarTemplate.from_pretrained(model, tokenizer=loaded, **overrides)
    if loaded is not None:
        return PolarTemplate(loaded, **overrides)
    raise CLIError("Pass --model (a POLAR reward model) or --tokenizer (a tokenizer with the POLAR tokens).")


def format_command(
    prompt: Annotated[str | None, typer.Option(help="The prompt text.")] = None,
    reference: Annotated[str | None, typer.Option(help="The reference answer.")] = None,
    candidate: Annotated[str | None, typer.Option(help="The candidate answer to score.")] = None,
    data: Annotated[Path | None, typer.Option(help="A .json or .jsonl file to read one row from instead.")] = None,
    row: Annotated[int, typer.Option(help="Which row of --data (0-based).")] = 0,
    candidate_column: Annotated[
        str, typer.Option(help="Column of --data holding the candidate (e.g. chosen, rejected, completion).")
    ] = "candidate",
    model: Annotated[
        str | None, typer.Option(help="A POLAR reward model: its tokenizer and recorded template.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="A tokenizer that has the POLAR tokens; with --model, used instead of its own.")
    ] = None,
    wrapper: Annotated[str, typer.Option(help="'sft' (default) or 'pretrain'.")] = "sft",
    max_length: Annotated[int | None, typer.Option(help="Override the total token budget.")] = None,
    max_response_length: Annotated[int | None, typer.Option(help="Override the per-response budget.")] = None,
    response_cut_side: Annotated[str | None, typer.Option(help="'right' keeps a long response's start.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Show exactly what the reward model sees for one input: the text, the token count and what was truncated."""
    if data is not None:
        record = read_row(data, row)
        missing = [c for c in ("prompt", "reference", candidate_column) if c not in record]
        if missing:
            raise CLIError(
                f"{data}: row {row} lacks column(s) {missing} (it has {sorted(record)}); "
                "use --candidate-column to name the candidate's column."
            )
        prompt, reference, candidate = record["prompt"], record["reference"], record[candidate_column]
    if prompt is None or reference is None or candidate is None:
        raise CLIError("Pass --prompt, --reference and --candidate, or --data FILE [--row N].")
    template = _template(
        model,
        tokenizer,
        {"max_length": max_length, "max_response_length": max_response_length, "response_cut_side": response_cut_side},
    )
    text = template.format(prompt, reference, candidate, wrapper=wrapper)
    encoding = template.build(prompt, reference, candidate, wrapper=wrapper)
    report = {
        "text": text,
        "num_tokens": len(encoding.input_ids),
        "max_length": template.max_length,
        "truncated": encoding.truncation_report(),
    }
    if as_json:
        typer.echo(json.dumps(report, ensure_ascii=False))
        return
    typer.echo(text)
    typer.echo("-" * 40, err=True)
    typer.echo(f"tokens: {report['num_tokens']} (max_length {template.max_length})", err=True)
    if report["truncated"]:
        for part, n in report["truncated"].items():
            typer.echo(f"truncated {part}: kept {n['kept']} of {n['original']} tokens", err=True)
    else:
        typer.echo("truncated: nothing", err=True)
