"""``trl-polar quickstart``: the whole pipeline on tiny models, offline, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def quickstart(
    out_dir: Annotated[Path, typer.Option(help="Where data, models and the report go.")] = Path("polar-quickstart"),
    num_prompts: Annotated[int, typer.Option(help="Prompts answered by the tiny policy pool.")] = 320,
    grpo_steps: Annotated[int, typer.Option(help="GRPO steps at the end (0 skips RL).")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = 0,
) -> None:
    """The whole pipeline on tiny models, offline, on CPU: policies -> data -> reward model -> evaluation -> GRPO."""
    import os

    # Everything runs on CPU by design; DeepSpeed, when installed, would otherwise warn that it found no accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(out_dir=str(out_dir), num_prompts=num_prompts, grpo_steps=grpo_steps, seed=seed))
