"""The `trl-polar` command line: one module per command group, each a thin call into the library.

Multi-process commands run under accelerate as ``accelerate launch -m trl_polar.cli <command> ...``. Importing the
command modules loads neither torch nor FastAPI; each command imports what it drives when it runs.
"""

from __future__ import annotations

import sys

import typer

from . import checkpoints, evaluate, info, quickstart, scaling, score, train
from .check_engine import check_engine_command
from .check_verl import check_verl_command
from .data import build_data_command, convert_data_command
from .errors import CLIError
from .preflight import preflight_command
from .serve import serve_command

app = typer.Typer(
    name="trl-polar",
    help="POLAR reward models for TRL: format inputs, train, score, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help text is shown as written: rich markup would read "data[i].data" as an italic tag.
    rich_markup_mode=None,
)
app.command()(info.version)
app.command("format")(info.format_command)
app.command()(checkpoints.convert)
app.command()(scaling.scaling)
app.command()(evaluate.evaluate)
# Every PolarConfig field is a flag: the arguments go to transformers' parser untouched, --help included.
app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
    cls=train.TrainCommand,
)(train.train)
app.command()(score.score)
app.command()(quickstart.quickstart)
app.command("build-data")(build_data_command)
app.command("convert-data")(convert_data_command)
app.command("serve")(serve_command)
app.command("check-engine")(check_engine_command)
app.command("check-verl")(check_verl_command)
app.command("preflight")(preflight_command)

__all__ = ["CLIError", "app", "main"]


def main() -> None:
    """Entry point of the `trl-polar` console script: user errors are one line, not a traceback."""
    try:
        app()
    except (CLIError, ValueError, OSError) as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(1)
