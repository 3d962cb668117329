"""``trl-polar convert``: an official InternLM2 POLAR checkpoint to a standard Llama reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import CLIError


def convert(
    src: Annotated[str, typer.Argument(help="An official POLAR checkpoint (hub name or directory).")],
    out: Annotated[Path, typer.Argument(help="Directory to write the standard transformers checkpoint to.")],
    tokenizer: Annotated[str | None, typer.Option(help="Take the tokenizer from here instead of SRC.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: as stored).")] = None,
) -> None:
    """Convert an official InternLM2 POLAR checkpoint to a Llama reward model that needs no remote code."""
    import os

    from ..checkpoints import convert_checkpoint
    from ..data.io import looks_like_path
    from ..hub import has_tokenizer_files, resolve_dtype

    # A local path that is not a checkpoint directory gets a local answer, not a hub repository-name error.
    if looks_like_path(src) and not Path(src).is_dir():
        found = "is a file" if Path(src).exists() else "does not exist"
        raise CLIError(
            f"{src} {found}: SRC must be a checkpoint directory (config.json and weights) or a hub name (org/name)."
        )
    if tokenizer is None and os.path.isdir(src) and not has_tokenizer_files(src):
        raise CLIError(
            f"{src} has no tokenizer files: pass --tokenizer with the checkpoint's tokenizer (a directory or hub "
            "name, e.g. internlm/POLAR-7B)."
        )
    # Conversion runs on the CPU, so "auto" is float32 here.
    torch_dtype = resolve_dtype(dtype, "cpu", name="--dtype")
    path = convert_checkpoint(src, out, tokenizer=tokenizer, dtype=torch_dtype)
    typer.echo(f"Wrote {path}: load it with AutoModelForSequenceClassification.from_pretrained({str(path)!r}).")
