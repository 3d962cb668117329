"""``trl-polar train`` and examples/train_polar.py: a training run's arguments, flags over a YAML file, and the
run's first and last calls. Every PolarConfig / TrainingArguments field is a flag.

The training itself is `trl_polar.trainer.train_from_config`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from .errors import CLIError

if TYPE_CHECKING:
    from ..config import PolarConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainArguments:
    """What a training run needs besides `PolarConfig`: the model, the data and the optional LoRA set-up."""

    model_name_or_path: str = field(metadata={"help": "Backbone (causal LM) or POLAR reward model, hub name or path."})
    train_data: str = field(
        metadata={"help": "Training rows: .jsonl/.json/.parquet/.csv file, directory or hub name."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation rows, same formats."})
    train_split: str = field(default="train", metadata={"help": "Split of train_data, e.g. 'train[:1000]'."})
    eval_split: str = field(default="train", metadata={"help": "Split of eval_data."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (and the value head) only."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Start from POLAR's hyperparameters: 'polar-finetune' (lr 1e-5 / 2e-5 by model size, global "
            "batch 320) or 'polar-pretrain' (lr and global batch from the scaling laws: needs --params, "
            "--base-tokens, --rm-tokens). Both: 1 epoch, AdamW betas (0.9, 0.95), 3% warmup, cosine decay to "
            "0.1 x lr. Values in --config and flags override the recipe's (docs/training.md has the table).",
            "choices": ["polar-pretrain", "polar-finetune"],
        },
    )
    params: float | None = field(
        default=None, metadata={"help": "With --recipe: model parameters (e.g. 1.8e9), for the recipe's lr."}
    )
    base_tokens: float | None = field(
        default=None, metadata={"help": "With --recipe polar-pretrain: tokens the base model was pre-trained on."}
    )
    rm_tokens: float | None = field(
        default=None, metadata={"help": "With --recipe polar-pretrain: tokens of POLAR pre-training (the data)."}
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "With --recipe: samples per optimizer step instead of the recipe's; gradient accumulation is set "
            "so that per-device batch x accumulation x processes equals it."
        },
    )


def train_parser():
    """The argument parser of a training run: every `TrainArguments` and `PolarConfig` field is a flag."""
    from transformers import HfArgumentParser

    from ..config import PolarConfig

    parser = HfArgumentParser((TrainArguments, PolarConfig))
    # argparse reads help strings as %-format strings: a plain "3% warmup" would break --help.
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%(?![(%])", "%%", action.help)
    return parser


def train_flags_markdown() -> str:
    """Every flag of a training run, as a markdown list (the generated docs/cli.md shows it under `train`)."""
    lines = ["**Training flags** (each is also a key of the `--config` YAML file, without the dashes):", ""]
    for action in train_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        lines.append(f"* `{action.option_strings[0]}{_metavar(action)}`: {' '.join((action.help or '').split())}")
        if action.default not in (None, "") and not action.required:
            lines[-1] += f" [default: {action.default}]"
        lines[-1] = lines[-1].replace("%%", "%")
    return "\n".join(lines)


def _metavar(action: Any) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " {" + ",".join(map(str, action.choices)) + "}"
    name = getattr(action.type, "__name__", "str")
    return " BOOL" if name == "string_to_bool" else f" {name.upper()}"


class TrainCommand(TyperCommand):
    """The `train` command: its epilog lists the training flags, built only when asked for (by the docs)."""

    @property
    def epilog(self) -> str:
        return train_flags_markdown()

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        """click assigns the epilog at construction; the flag list above always wins, so the value is ignored."""


def parse_train_args(argv: Sequence[str], config_file: str | None = None) -> tuple[TrainArguments, PolarConfig]:
    """Flags over a YAML file over a recipe: values in `config_file` become defaults that flags in `argv` override,
    and a ``recipe`` (flag or file) supplies the defaults of the fields neither sets."""
    parser = train_parser()
    values = {}
    if config_file is not None:
        values = read_config_file(config_file, {action.dest: action for action in parser._actions})
    script, config = _parse(parser, argv, values)
    if script.recipe is None:
        return script, config
    from ..recipes import recipe_values

    explicit = _explicit_fields(parser, argv, values)
    recipe = recipe_values(
        script.recipe,
        num_params=script.params,
        base_tokens=script.base_tokens,
        rm_tokens=script.rm_tokens,
        global_batch_size=script.global_batch_size,
        learning_rate=config.learning_rate if "learning_rate" in explicit else None,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=(
            config.gradient_accumulation_steps if "gradient_accumulation_steps" in explicit else None
        ),
    )
    logger.info("recipe %s: %s", script.recipe, {k: v for k, v in recipe.items() if k not in explicit})
    parser = train_parser()
    parser.set_defaults(**recipe)
    return _parse(parser, argv, values)


def _parse(parser: Any, argv: Sequence[str], values: dict[str, Any]) -> tuple[TrainArguments, PolarConfig]:
    parser.set_defaults(**values)
    # A value in the file satisfies a field that is otherwise required on the command line.
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    script, config = parser.parse_args_into_dataclasses(args=list(argv))
    return script, config


def _explicit_fields(parser: Any, argv: Sequence[str], values: dict[str, Any]) -> set[str]:
    """The fields the user set, in the file or as flags (``--name value``, ``--name=value``, ``--no_name``)."""
    options = parser._option_string_actions
    flags = {options[arg.split("=", 1)[0]].dest for arg in argv if arg.split("=", 1)[0] in options}
    return flags | set(values)


def read_config_file(path: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The ``field: value`` mapping of a YAML config file, checked against the parser's `fields` (dest -> action).

    Every error is one line naming the file and the line (1-based) and saying what to change.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(
            f"{where}: not valid YAML ({problem}). Write one `field: value` per line, unindented, and quote values "
            "that contain ': ' or ' #'."
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}:1: expected a mapping of field: value, got {type(values).__name__}.")
    lines = {key.value: key.start_mark.line + 1 for key, _ in (node.value if node is not None else ())}
    unknown = sorted(set(values) - set(fields), key=lambda name: lines.get(name, 0))
    if unknown:
        raise ValueError(
            f"{path}:{lines.get(unknown[0], 1)}: unknown field(s) {unknown}; `trl-polar train --help` lists every "
            "field."
        )
    for name, value in values.items():
        _check_value(fields[name], value, f"{path}:{lines.get(name, 1)}")
    return values


def _check_value(action: Any, value: Any, where: str) -> None:
    # argparse converts a string default only when it parses the command line, and then blames a flag the user did
    # not type: check the file's values here, where the line is known.
    items = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
    for item in items:
        if isinstance(item, str) and callable(action.type):
            try:
                item = action.type(item)
            except (TypeError, ValueError):
                kind = getattr(action.type, "__name__", "value")
                raise ValueError(f"{where}: `{action.dest}: {value}` is not a valid {kind}; fix the value.") from None
        if action.choices is not None and item is not None and item not in action.choices:
            choices = ", ".join(str(c) for c in action.choices)
            hint = " (quote words YAML reads as booleans: 'no', 'off')" if isinstance(item, bool) else ""
            raise ValueError(f"{where}: `{action.dest}: {value}` is not one of {choices}; use one of them{hint}.")


def run_training(script: TrainArguments, config: PolarConfig) -> Any:
    """Train with parsed arguments (the CLI and examples/train_polar.py both end here)."""
    from ..trainer import lora_config, train_from_config

    peft = lora_config(script.lora_r, script.lora_alpha, script.lora_dropout) if script.use_peft else None
    return train_from_config(
        config,
        script.model_name_or_path,
        script.train_data,
        script.eval_data,
        train_split=script.train_split,
        eval_split=script.eval_split,
        peft_config=peft,
    )


def finish_run(accelerator: Any) -> None:
    """The last call of a training script: finish trackers, tear the process group down, and leave.

    A multi-process CPU run (gloo) then exits at once, without interpreter finalization: gloo's worker threads outlive
    `destroy_process_group` and can abort a rank during finalization ("terminate called without an active
    exception", SIGABRT) after all its work has succeeded, so that a successful run reports failure. Everything is
    saved and flushed by then; single-process and GPU (NCCL) runs return normally.
    """
    import os
    import sys

    import torch.distributed as dist

    gloo = dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if gloo:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="A YAML file of field: value; flags override it.")] = None,
) -> None:
    """Train a POLAR reward model. Every PolarConfig / TrainingArguments field is a flag (see --help).

    --recipe polar-finetune | polar-pretrain starts from the paper's hyperparameters; flags override them.

    Multi-process: accelerate launch --config_file CFG -m trl_polar.cli train --config train.yaml
    """
    if any(arg in ("-h", "--help") for arg in ctx.args):
        typer.echo("Usage: trl-polar train [--config train.yaml] [--FIELD VALUE ...]\n")
        typer.echo(train_parser().format_help())
        return
    if config is not None and not config.is_file():
        raise CLIError(f"{config}: no such file.")
    trainer = run_training(*parse_train_args(ctx.args, str(config) if config else None))
    finish_run(trainer.accelerator)
