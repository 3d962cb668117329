"""Train a POLAR reward model: pre-training on policy-discrimination triples or fine-tuning on ranked data.

Every PolarConfig / TrainingArguments field is a flag. Single process::

    python examples/train_polar.py --model_name_or_path Qwen/Qwen3-0.6B --train_data pretrain.jsonl \\
        --output_dir polar-rm --per_device_train_batch_size 8 --learning_rate 2e-5 --num_train_epochs 1

``--recipe polar-finetune`` (or ``polar-pretrain`` with ``--params``, ``--base-tokens``, ``--rm-tokens``) starts
from the paper's hyperparameters instead of TRL's; flags override them.

Several processes (GPUs, or CPU processes with --use_cpu)::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_polar.py ...
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml examples/train_polar.py ...

Fine-tuning continues from a POLAR checkpoint (e.g. a converted POLAR-1_8B-Base) on rows whose reference is the
human rank-1 answer, chosen rank 2 and rejected rank 3; add --use_peft for LoRA.
"""

from __future__ import annotations

import sys

from trl_polar.cli.train import finish_run, parse_train_args, run_training

if __name__ == "__main__":
    trainer = run_training(*parse_train_args(sys.argv[1:]))
    finish_run(trainer.accelerator)
