"""``trl-polar check-engine``: the rows of a file scored by a served engine and in process, the largest difference,
and its likely cause (`trl_polar.serving.parity.check_engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..serving.server import API_KEY_ENV
from .errors import CLIError

BACKENDS = ("vllm", "sglang", "lmdeploy", "trl-polar")


def check_engine_command(
    url: Annotated[str, typer.Option(help="The engine serving the model, e.g. http://10.0.0.5:8000.")],
    model: Annotated[str, typer.Option(help="The checkpoint the engine serves (its path or hub name here).")],
    data: Annotated[
        Path, typer.Option(help="JSON lines: prompt, reference and the answer (output, candidate, ...), wrapper.")
    ],
    backend: Annotated[
        str, typer.Option(help="How to talk to it: vllm, sglang, lmdeploy or trl-polar.")
    ] = "trl-polar",
    n: Annotated[int, typer.Option(help="Score the first N rows.")] = 64,
    candidate_column: Annotated[str | None, typer.Option(help="Column of the answer (default: detected).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar=API_KEY_ENV, help="Sent as Authorization: Bearer KEY.")] = None,
    model_name: Annotated[str | None, typer.Option(help="The served model's name (SGLang's `model`).")] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Largest difference taken as equal (default 1e-3 x the largest |score|).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Where to score in process: cpu, cuda, ...")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="In-process dtype: auto, bf16, fp16, fp32 (default: as stored).")
    ] = None,
) -> None:
    """Score rows through a served engine and in process; print the largest difference and, when they differ, its
    likely cause (template text, tokenizer or special tokens, head or activation, precision, another model). Exits 1
    when they differ."""
    from ..score_file import _read_rows
    from ..serving.client import PolarClientError
    from ..serving.parity import check_engine

    if backend not in BACKENDS:
        raise CLIError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if n < 1:
        raise CLIError(f"--n must be at least 1, got {n}.")
    rows, (prompt, reference, candidate) = _read_rows(data, ("prompt", "reference", candidate_column))
    rows = [row for _, row in rows[:n]]
    try:
        check = check_engine(
            url,
            backend,
            model,
            [row[prompt] for row in rows],
            [row[reference] for row in rows],
            [row[candidate] for row in rows],
            [row.get("wrapper", "sft") for row in rows],
            api_key=api_key,
            model_name=model_name,
            tolerance=tolerance,
            device=device,
            dtype=dtype,
        )
    except PolarClientError as err:  # the engine could not be reached or refused: one line, not a traceback
        raise CLIError(f"{err}") from None
    typer.echo(check.report())
    if not check.agrees:
        raise typer.Exit(1)
