"""GRPO with a POLAR reward: the policy is rewarded for answers close to each prompt's reference answer.

The dataset needs a ``prompt`` column (text or messages) and a reference column (text, messages, or a list of
references). Every GRPOConfig field is a flag. Two GPUs (each rank keeps its own copy of the reward model)::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/grpo_polar.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model path/to/polar-rm \\
        --dataset rl_prompts.jsonl --output_dir grpo-polar --per_device_train_batch_size 8 \\
        --num_generations 8 --max_completion_length 512 --learning_rate 1e-6 --bf16 true

On CPU add ``--use_cpu`` (and launch with ``--multi_gpu --num_processes 2``, not ``--cpu``, to get 2 ranks).

A reward model that does not fit beside the policy is served instead (``trl-polar serve``, docs/serving.md), and
the ranks score through it::

    trl-polar serve --model path/to/polar-rm --host 0.0.0.0 --port 8000 --api-key $TRL_POLAR_API_KEY   # GPU node
    accelerate launch ... examples/grpo_polar.py --reward_url http://10.0.0.5:8000 ...   # key from TRL_POLAR_API_KEY

``--reward_urls`` takes several replicas; ``--reward_backend`` names another engine serving the model (lmdeploy,
vllm, sglang).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import AutoTokenizer, HfArgumentParser

from trl_polar.cli.train import finish_run
from trl_polar.data.loading import load_preference_dataset
from trl_polar.rewards import STRIP_THINK_DEFAULT, PolarReward


@dataclass
class PolarRLArguments:
    model_name_or_path: str = field(metadata={"help": "The policy: hub name or path of a causal LM."})
    dataset: str = field(metadata={"help": "Prompts with references: .jsonl/.json/.parquet/.csv, directory or hub."})
    reward_model: str | None = field(
        default=None, metadata={"help": "A saved POLAR reward model (trained or converted with trl-polar), loaded on "
                                "every rank. Or serve it and pass --reward_url."}
    )  # fmt: skip
    reward_url: str | None = field(
        default=None, metadata={"help": "A served POLAR reward model (trl-polar serve, or --reward_backend's engine)."}
    )
    reward_urls: list[str] | None = field(
        default=None, metadata={"help": "Several replicas of the served model, space-separated (load-balanced)."}
    )
    reward_api_key: str | None = field(
        default=None, metadata={"help": "The server's key (default: the TRL_POLAR_API_KEY environment variable)."}
    )
    reward_backend: str = field(
        default="trl-polar", metadata={"help": "The server: 'trl-polar', 'lmdeploy', 'vllm' or 'sglang'."}
    )
    reward_wrapper: str = field(default="sft", metadata={"help": "The template wrapper: 'sft' or 'pretrain'."})
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
    reward_max_tokens: int = field(
        default=16384, metadata={"help": "With --reward_model: token budget of one reward micro-batch."}
    )
    reward_dtype: str = field(
        default="auto", metadata={"help": "With --reward_model: 'auto' (bf16 on GPU), 'bf16' or 'fp32'."}
    )


def reward_source(script: PolarRLArguments) -> dict:
    """The reward model's keyword arguments of `PolarReward`: a local path, or a server and its key."""
    served = script.reward_url is not None or script.reward_urls is not None
    if script.reward_model is not None and "://" in script.reward_model:
        raise ValueError(
            f"--reward_model {script.reward_model} is a URL: pass a served model as "
            f"--reward_url {script.reward_model} "
            "(or several as --reward_urls URL URL)."
        )
    if served == (script.reward_model is not None):
        raise ValueError("Pass either --reward_model (a saved POLAR model) or --reward_url/--reward_urls (a server).")
    if not served:
        # The budget and precision of a served model are the server's own.
        return {
            "model_or_scorer": script.reward_model,
            "max_tokens_per_batch": script.reward_max_tokens,
            "dtype": script.reward_dtype,
        }
    return {
        "url": script.reward_url,
        "urls": script.reward_urls,
        "api_key": script.reward_api_key or os.environ.get("TRL_POLAR_API_KEY") or None,
        "backend": script.reward_backend,
    }


def build(script: PolarRLArguments):
    """The policy tokenizer, the dataset with a `prompt` column, and the POLAR reward callable."""
    source = reward_source(script)
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
        **source,
        wrapper=script.reward_wrapper,
        reference_column=script.reference_column,
        normalize=script.reward_normalize,
        baseline=script.reward_baseline,
        clip=script.reward_clip,
        sigmoid_scale=script.reward_sigmoid_scale,
        strip_think=script.strip_think,
    )
    return tokenizer, dataset, reward


def main(config_class: type | None = None, trainer_class: type | None = None) -> None:
    """Parse flags, build the POLAR reward and train; GRPO by default, RLOO from examples/rloo_polar.py."""
    from trl import GRPOConfig, GRPOTrainer

    config_class, trainer_class = config_class or GRPOConfig, trainer_class or GRPOTrainer
    parser = HfArgumentParser((PolarRLArguments, config_class))
    script, config = parser.parse_args_into_dataclasses()
    try:
        tokenizer, dataset, reward = build(script)
    except ValueError as err:
        # One line: the usage of every GRPOConfig field would bury it.
        parser.exit(2, f"{parser.prog}: error: {err}\n")
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
