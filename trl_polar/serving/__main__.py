"""``python -m trl_polar.serving --model PATH``: the same as ``trl-polar serve``."""

import typer

from .command import serve_command

typer.run(serve_command)
