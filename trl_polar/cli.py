"""The `trl-polar` command line. Thin: every command calls the library and holds no logic of its own.

Multi-process commands run under accelerate as ``accelerate launch -m trl_polar.cli <command> ...``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="trl-polar",
    help="POLAR reward models for TRL: format inputs, train, score, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CLIError(Exception):
    """An error meant for the user: printed as one line, exit code 1."""


@app.command()
def version() -> None:
    """Print the versions of trl_polar and the libraries it builds on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from . import __version__

    typer.echo(f"trl-polar {__version__}")
    for name in ("trl", "transformers", "torch", "accelerate", "peft", "datasets"):
        try:
            typer.echo(f"{name} {package_version(name)}")
        except PackageNotFoundError:
            typer.echo(f"{name} (not installed)")


def read_row(path: Path, row: int) -> dict[str, Any]:
    """Row `row` (0-based) of a .json (a list of objects) or .jsonl file."""
    from .data.io import read_row as read_file_row

    return read_file_row(path, row)


def _template(model: str | None, tokenizer: str | None, overrides: dict[str, Any]):
    from .template import PolarTemplate

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if model:
        return PolarTemplate.from_pretrained(model, **overrides)
    if tokenizer:
        from transformers import AutoTokenizer

        return PolarTemplate(AutoTokenizer.from_pretrained(tokenizer), **overrides)
    raise CLIError("Pass --model (a POLAR reward model) or --tokenizer (a tokenizer with the POLAR tokens).")


@app.command("format")
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
    tokenizer: Annotated[str | None, typer.Option(help="A tokenizer that has the POLAR tokens.")] = None,
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


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="An official POLAR checkpoint (hub name or directory).")],
    out: Annotated[Path, typer.Argument(help="Directory to write the standard transformers checkpoint to.")],
    tokenizer: Annotated[str | None, typer.Option(help="Take the tokenizer from here instead of SRC.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: as stored).")] = None,
) -> None:
    """Convert an official InternLM2 POLAR checkpoint to a Llama reward model that needs no remote code."""
    import torch

    from .convert import convert_checkpoint

    torch_dtype = None
    if dtype is not None:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CLIError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}.")
        torch_dtype = getattr(torch, dtype)
    path = convert_checkpoint(src, out, tokenizer=tokenizer, dtype=torch_dtype)
    typer.echo(f"Wrote {path}: load it with AutoModelForSequenceClassification.from_pretrained({str(path)!r}).")


@app.command()
def scaling(
    params: Annotated[float | None, typer.Option(help="Model parameters, e.g. 1.8e9.")] = None,
    base_tokens: Annotated[float | None, typer.Option(help="Tokens the base model was pre-trained on.")] = None,
    rm_tokens: Annotated[float | None, typer.Option(help="Tokens of POLAR pre-training.")] = None,
    fit: Annotated[Path | None, typer.Option(help="A CSV of your runs with columns compute,loss to fit.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --fit: save a log-log plot here (PNG).")] = None,
) -> None:
    """The paper's learning rate and batch size for POLAR pre-training, or a loss-vs-compute fit of your runs."""
    from . import scaling as laws

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
    if base_tokens is not None:
        typer.echo(f"learning rate: {laws.polar_learning_rate(params, base_tokens, rm_tokens):.3g}")
    typer.echo(f"batch size: {laws.polar_batch_size(params, rm_tokens)} samples per step")


@app.command()
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
) -> None:
    """Accuracy of a POLAR reward model on pairwise, best-of-N or RMB-style data, with a report and plots."""
    from .data.loading import load_preference_dataset
    from .evaluation import evaluate as run_evaluation
    from .evaluation import write_report

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    if model is not None:
        from .scoring import PolarScorer

        scorer = PolarScorer(model, max_tokens_per_batch=max_tokens_per_batch, dtype="auto", show_progress=True)
    else:
        from .client import PolarClient

        scorer = PolarClient(url=url)
    rows = load_preference_dataset(data, split=split)
    report = run_evaluation(scorer, rows, protocol=protocol, category_column=category_column)
    paths = write_report(report, out, plots=plots)
    typer.echo(report.to_markdown())
    typer.echo("Wrote " + ", ".join(paths.values()))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="A YAML file of field: value; flags override it.")] = None,
) -> None:
    """Train a POLAR reward model. Every PolarConfig / TrainingArguments field is a flag (see --help).

    Multi-process: accelerate launch --config_file CFG -m trl_polar.cli train --config train.yaml
    """
    from .training import finish_run, parse_train_args, run_training, train_parser

    if any(arg in ("-h", "--help") for arg in ctx.args):
        typer.echo("Usage: trl-polar train [--config train.yaml] [--FIELD VALUE ...]\n")
        typer.echo(train_parser().format_help())
        return
    if config is not None and not config.is_file():
        raise CLIError(f"{config}: no such file.")
    trainer = run_training(*parse_train_args(ctx.args, str(config) if config else None))
    finish_run(trainer.accelerator)


@app.command()
def score(
    data: Annotated[Path, typer.Option(help="JSON lines: prompt, reference and the answer (output, candidate, ...).")],
    output: Annotated[Path, typer.Option(help="Output JSON lines: each input row plus 'reward'.")],
    model: Annotated[str | None, typer.Option(help="A POLAR reward model to score with locally.")] = None,
    url: Annotated[str | None, typer.Option(help="Or a trl-polar server to score with.")] = None,
    candidate_column: Annotated[str | None, typer.Option(help="Column of the answer (default: detected).")] = None,
    prompt_column: Annotated[str, typer.Option(help="Column of the prompt.")] = "prompt",
    reference_column: Annotated[str, typer.Option(help="Column of the reference answer.")] = "reference",
    max_tokens_per_batch: Annotated[int, typer.Option(help="Token budget of one scoring micro-batch.")] = 16384,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on a capable GPU), bf16 or fp32.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: this rank's).")] = None,
) -> None:
    """Score a JSON-lines file with a POLAR reward model, with a progress bar."""
    from .scoring import score_file

    if (model is None) == (url is None):
        raise CLIError("Pass exactly one of --model (score locally) or --url (score with a server).")
    if url is not None:
        from .client import PolarClient

        scorer: Any = PolarClient(url=url)
    else:
        scorer = model
    summary = score_file(
        scorer,
        data,
        output,
        prompt_column=prompt_column,
        reference_column=reference_column,
        candidate_column=candidate_column,
        max_tokens_per_batch=max_tokens_per_batch,
        device=device,
        dtype=dtype,
        show_progress=True,
    )
    typer.echo(json.dumps(summary))


@app.command()
def quickstart(
    out_dir: Annotated[Path, typer.Option(help="Where data, models and the report go.")] = Path("polar-quickstart"),
    num_prompts: Annotated[int, typer.Option(help="Prompts answered by the tiny policy pool.")] = 160,
    grpo_steps: Annotated[int, typer.Option(help="GRPO steps at the end (0 skips RL).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = 0,
) -> None:
    """The whole pipeline on tiny models, offline, on CPU: policies -> data -> reward model -> evaluation -> GRPO."""
    from .quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(out_dir=str(out_dir), num_prompts=num_prompts, grpo_steps=grpo_steps, seed=seed))


def _register_commands() -> None:
    # These commands live next to the code they drive; importing them loads neither torch nor FastAPI.
    from .data.cli import build_data_command, convert_data_command
    from .server import serve_command

    app.command("build-data")(build_data_command)
    app.command("convert-data")(convert_data_command)
    app.command("serve")(serve_command)


_register_commands()


def main() -> None:
    """Entry point of the `trl-polar` console script: user errors are one line, not a traceback."""
    try:
        app()
    except (CLIError, ValueError, OSError) as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
