"""``trl-polar score``: a JSON-lines file scored in resumable chunks, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import CLIError
from .remote import ApiKey, server_client, server_errors


def score(
    data: Annotated[
        Path, typer.Option(help="A .jsonl or .json file: prompt, reference and the answer (output, candidate, ...).")
    ],
    output: Annotated[Path, typer.Option(help="Output JSON lines: each input row plus 'reward'.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    api_key: ApiKey = None,
    candidate_column: Annotated[str | None, typer.Option(help="Column of the answer (default: detected).")] = None,
    prompt_column: Annotated[str, typer.Option(help="Column of the prompt.")] = "prompt",
    reference_column: Annotated[str, typer.Option(help="Column of the reference answer.")] = "reference",
    max_tokens_per_batch: Annotated[int, typer.Option(help="Token budget of one scoring micro-batch.")] = 16384,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on a capable GPU), bf16 or fp32.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: this rank's).")] = None,
    output_column: Annotated[str, typer.Option(help="Column the score is written to.")] = "reward",
    overwrite: Annotated[
        bool, typer.Option(help="Replace the values of rows that already hold the output column (else: an error).")
    ] = False,
) -> None:
    """Score a JSON-lines (or JSON array) file with a POLAR reward model, with a progress bar."""
    from ..score_file import ScoringInterrupted, score_file

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    scorer: Any = server_client(url, api_key) if url is not None else model
    try:
        with server_errors(url):
            summary = score_file(
                scorer,
                data,
                output,
                prompt_column=prompt_column,
                reference_column=reference_column,
                candidate_column=candidate_column,
                output_column=output_column,
                overwrite=overwrite,
                max_tokens_per_batch=max_tokens_per_batch,
                device=device,
                dtype=dtype,
                show_progress=True,
            )
    except ScoringInterrupted as interrupted:
        typer.echo(f"Error: {interrupted}", err=True)
        raise typer.Exit(130) from None
    typer.echo(json.dumps(summary))
