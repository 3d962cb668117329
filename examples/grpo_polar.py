"""GRPO with a POLAR reward: the policy is rewarded for answers close to each prompt's reference answer.

The dataset needs a ``prompt`` column (text or messages) and a reference column (text, messages, or a list of
references). Every GRPOConfig field is a flag. Two GPUs (each rank keeps its own copy of the reward model)::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/grpo_polar.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model path/to/polar-rm \\
        --dataset rl_prompts.jsonl --output_dir grpo-polar --per_device_train_batch_size 8 \\
        --num_generations 8 --max_completion_length 512 --learning_rate 1e-6 --bf16 true

On CPU add ``--use_cpu`` (and launch with ``--multi_gpu --num_processes 2``, not ``--cpu``, to get 2 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoTokenizer, HfArgumentParser

from trl_polar.cli.train import finish_run
from trl_polar.data.loading import load_preference_dataset
from trl_polar.rewards import STRIP_THINK_DEFAULT, PolarReward


@dataclass
class PolarRLArguments:
    model_name_or_path: str = field(metadata={"help": "The policy: hub name or path of a causal LM."})
    reward_model: str = field(metadata={"help": "A saved POLAR reward model (trained or converted with trl-polar)."})
    dataset: str = field(metadata={"help": "Prompts with references: .jsonl/.json/.parquet/.csv, directory or hub."})
    dataset_split: str = field(default="train", metadata={"help": "Split, e.g. 'train[:5000]'."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    reference_column: str = field(default="reference", metadata={"help": "Column holding the reference answer."})
    reward_normalize: str | None = field(default=None, metadata={"help": "None, 'group' or 'batch' z-scores."})
    reward_baseline: bool = field(default=False, metadata={"help": "Subtract r(prompt, ref, ref): a copy scores 0."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip rewards to [-c, c]."})
    reward_sigmoid_scale: float | None = field(default=None, metadata={"help": "sigmoid(reward / scale)."})
    strip_think: bool = field(
        default=STRIP_THINK_DEFAULT, metadata={"help": "Drop <think>...</think> before scoring (upstream's recipe)."}
    )
    reward_max_tokens: int = field(default=16384, metadata={"help": "Token budget of one reward micro-batch."})
    reward_dtype: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU), 'bf16' or 'fp32'."})


def build(script: PolarRLArguments):
    """The policy tokenizer, the dataset with a `prompt` column, and the POLAR reward callable."""
    dataset = load_preference_dataset(script.dataset, split=script.dataset_split)
    for column in (script.prompt_column, script.reference_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"{script.dataset} has no column {column!r} (it has {dataset.column_names}); pass --prompt_column "
                "or --reference_column."
            )
    if script.prompt_column != "prompt":
        dataset = dataset.rename_column(script.prompt_column, "prompt")
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path, padding_side="left")
    reward = PolarReward(
        script.reward_model,
        reference_column=script.reference_column,
        normalize=script.reward_normalize,
        baseline=script.reward_baseline,
        clip=script.reward_clip,
        sigmoid_scale=script.reward_sigmoid_scale,
        strip_think=script.strip_think,
        max_tokens_per_batch=script.reward_max_tokens,
        dtype=script.reward_dtype,
    )
    return tokenizer, dataset, reward


def main(config_class: type | None = None, trainer_class: type | None = None) -> None:
    """Parse flags, build the POLAR reward and train; GRPO by default, RLOO from examples/rloo_polar.py."""
    from trl import GRPOConfig, GRPOTrainer

    config_class, trainer_class = config_class or GRPOConfig, trainer_class or GRPOTrainer
    script, config = HfArgumentParser((PolarRLArguments, config_class)).parse_args_into_dataclasses()
    tokenizer, dataset, reward = build(script)
    trainer = trainer_class(
        model=script.model_name_or_path,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    finish_run(trainer.accelerator)


if __name__ == "__main__":
    main()
