"""RLOO with a POLAR reward. Same flags and dataset as examples/grpo_polar.py, with RLOOConfig's fields::

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/rloo_polar.py \\
        --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct --reward_model path/to/polar-rm \\
        --dataset rl_prompts.jsonl --output_dir rloo-polar --num_generations 4 --bf16 true

RLOO's leave-one-out baseline is computed from the raw rewards, so POLAR's negative offset cancels out.
"""

from __future__ import annotations

from grpo_polar import main
from trl import RLOOConfig, RLOOTrainer

if __name__ == "__main__":
    main(RLOOConfig, RLOOTrainer)
