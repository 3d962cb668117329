"""``trl-polar scaling``: the paper's learning rate and batch size, or a fit of your runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import CLIError


def scaling(
    params: Annotated[float | None, typer.Option(help="Model parameters, e.g. 1.8e9.")] = None,
    base_tokens: Annotated[float | None, typer.Option(help="Tokens the base model was pre-trained on.")] = None,
    rm_tokens: Annotated[
        float | None, typer.Option(help="Tokens of POLAR pre-training (the budget, one epoch).")
    ] = None,
    tokens_per_sample: Annotated[
        float | None, typer.Option(help="Mean tokens of one training sample (a pair), to print the step count.")
    ] = None,
    fit: Annotated[Path | None, typer.Option(help="A CSV of your runs with columns compute,loss to fit.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --fit: save a log-log plot here (PNG).")] = None,
) -> None:
    """The paper's pre-training recipe (learning rate, batch size, token budget) for a model size, or a loss fit."""
    from .. import scaling as laws

    if fit is not None:
        import csv

        if not fit.is_file():
            raise CLIError(f"{fit}: no such file.")
        with fit.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        missing = {"compute", "loss"} - set(rows[0] if rows else {})
        if missing:
            raise CLIError(f"{fit}: needs columns compute and loss; missing {sorted(missing)}.")
        try:
            compute, loss = [float(r["compute"]) for r in rows], [float(r["loss"]) for r in rows]
        except ValueError as e:
            raise CLIError(f"{fit}: every compute and loss must be a number ({e}).") from None
        law = laws.fit_power_law(compute, loss)
        typer.echo(f"loss = {law.coefficient:.6g} * compute^{law.exponent:.6g}   (R^2 = {law.r_squared:.4f})")
        if plot is not None:
            typer.echo(f"plot: {laws.plot_power_law(compute, loss, law, str(plot))}")
        return
    if params is None or rm_tokens is None:
        raise CLIError("Pass --params and --rm-tokens (and --base-tokens for the learning rate), or --fit runs.csv.")
    if base_tokens is None:
        typer.echo(f"batch size: {laws.polar_batch_size(params, rm_tokens)} samples per step")
        typer.echo("learning rate: pass --base-tokens (the tokens the base model was pre-trained on)")
        return
    plan = laws.pretraining_plan(params, base_tokens, rm_tokens, tokens_per_sample)
    for line in plan.lines():
        typer.echo(line)
    typer.echo(
        f"train with:      trl-polar train --recipe polar-pretrain --params {params:g} --base-tokens "
        f"{base_tokens:g} --rm-tokens {rm_tokens:g} ..."
    )
