"""RLOO with a POLAR reward. Same flags and dataset as examples/grpo_polar.py, with RLOOConfig's fields::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/rloo_polar.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model path/to/polar-rm \\
        --dataset rl_prompts.jsonl --output_dir rloo-polar --num_generations 4 --bf16

RLOO's leave-one-out baseline is computed from the raw rewards, so POLAR's negative offset cancels out.
"""

from __future__ import annotations

from grpo_polar import PolarRLArguments, build
from transformers import HfArgumentParser


def main() -> None:
    from trl import RLOOConfig, RLOOTrainer

    script, config = HfArgumentParser((PolarRLArguments, RLOOConfig)).parse_args_into_dataclasses()
    tokenizer, dataset, reward = build(script)
    trainer = RLOOTrainer(
        model=script.model_name_or_path,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(config.output_dir)


if __name__ == "__main__":
    main()
