"""One function that runs a POLAR training job end to end; the CLI and the example script call it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import PolarConfig
from .data.loading import load_preference_dataset

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


def train_parser():
    """The argument parser of a training run: every `TrainArguments` and `PolarConfig` field is a flag."""
    from transformers import HfArgumentParser

    return HfArgumentParser((TrainArguments, PolarConfig))


def parse_train_args(argv: Sequence[str], config_file: str | None = None) -> tuple[TrainArguments, PolarConfig]:
    """Flags over a YAML file: values in `config_file` become defaults that flags in `argv` override."""
    parser = train_parser()
    if config_file is not None:
        import yaml

        with open(config_file, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_file}: expected a mapping of field: value, got {type(values).__name__}.")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown field(s) {unknown}; `trl-polar train --help` lists every field.")
        parser.set_defaults(**values)
        # A value in the file satisfies a field that is otherwise required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    script, config = parser.parse_args_into_dataclasses(args=list(argv))
    return script, config


def run_training(script: TrainArguments, config: PolarConfig) -> Any:
    """Train with parsed arguments (the CLI and examples/train_polar.py both end here)."""
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


def lora_config(
    r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: str | list[str] = "all-linear"
) -> Any:
    """A `peft.LoraConfig` for reward models: task type SEQ_CLS, so the value head trains with the adapters."""
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)


def train_from_config(
    config: PolarConfig,
    model: str,
    train_data: str,
    eval_data: str | None = None,
    *,
    train_split: str = "train",
    eval_split: str = "train",
    peft_config: Any = None,
) -> Any:
    """Load the data, train, save the final model to ``config.output_dir`` and return the trainer.

    Args:
        config: the training configuration; ``resume_from_checkpoint`` is honoured.
        model: hub name or local path of the backbone (causal LM) or of a POLAR reward model to fine-tune.
        train_data, eval_data: see `trl_polar.data_loading.load_preference_dataset`.
        train_split, eval_split: splits to load (a single local file is the 'train' split).
        peft_config: e.g. `lora_config()`; trains adapters and the value head.

    Works unchanged under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3): every rank calls it, and saving is
    collective.
    """
    from .trainer import PolarRewardTrainer

    train_dataset = load_preference_dataset(train_data, train_split)
    eval_dataset = load_preference_dataset(eval_data, eval_split) if eval_data else None
    trainer = PolarRewardTrainer(
        model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, peft_config=peft_config
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    # Every rank must call save_model: under ZeRO-3 it gathers the sharded weights collectively.
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        logger.info("Saved the POLAR reward model to %s", config.output_dir)
    return trainer


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
