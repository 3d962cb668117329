"""GRPO and RLOO with PolarReward on 2 CPU processes (accelerate launch), checked against PolarScorer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trl_polar.scorer import PolarScorer

pytestmark = pytest.mark.multiprocess

N_PROMPTS = 8

SCRIPT = textwrap.dedent(
    """
    import json, os, sys

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from trl_polar.rewards import PolarReward
    from trl_polar.cli.train import finish_run

    kind, policy_dir, rm_dir, out_dir = sys.argv[1:5]


    class RecordingReward(PolarReward):
        # Writes what this rank was asked to score and what it returned, for the test to check.
        def __call__(self, prompts, completions, **kwargs):
            rewards = super().__call__(prompts, completions, **kwargs)
            rank = int(os.environ["RANK"])
            with open(os.path.join(out_dir, f"rewards_rank{rank}.jsonl"), "a", encoding="utf-8") as f:
                for p, c, ref, r in zip(prompts, completions, kwargs["reference"], rewards, strict=True):
                    f.write(json.dumps({"prompt": p, "completion": c, "reference": ref, "reward": r,
                                        "world": int(os.environ["WORLD_SIZE"])}) + "\\n")
            return rewards


    dataset = Dataset.from_dict({
        "prompt": [f"Question {i}: what is {i} plus {i}?" for i in range(@N@)],
        "reference": [f"The answer is {2 * i}." for i in range(@N@)],
    })
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    common = dict(output_dir=os.path.join(out_dir, "run"), use_cpu=True, bf16=False, report_to="none", max_steps=2,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
                  save_strategy="no", seed=0)
    reward = RecordingReward(rm_dir, max_tokens_per_batch=2048)
    if kind == "grpo":
        trainer = GRPOTrainer(model=policy_dir, reward_funcs=[reward], args=GRPOConfig(**common),
                              train_dataset=dataset, processing_class=tokenizer)
    else:
        trainer = RLOOTrainer(model=policy_dir, reward_funcs=[reward], args=RLOOConfig(**common),
                              train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out_dir, "log_history.json"), "w", encoding="utf-8") as f:
            json.dump(trainer.state.log_history, f)
    finish_run(trainer.accelerator)
    """
).replace("@N@", str(N_PROMPTS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind, policy_dir, rm_dir, out_dir: Path, config_file: Path | None = None):
    script = out_dir / "rl_run.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    distributed = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *distributed, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(script), kind, policy_dir, rm_dir, str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# docs/rl.md's 7B recipe config, run at 2 CPU ranks (the launch overrides its 8 processes and bf16).
ZERO3 = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs" / "grpo_7b_zero3.yaml"
_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize(
    "kind,config_file",
    [("grpo", None), ("rloo", None), pytest.param("grpo", ZERO3, id="grpo-zero3", marks=_DEEPSPEED)],
)
def test_two_process_rl_rewards_match_scorer(kind, config_file, tmp_path, tiny_qwen2_lm_dir, tiny_qwen2_rm_dir):
    # Under ZeRO-3 the policy is partitioned across the ranks; the reward model must not be: each rank scores with
    # a whole copy, so its rewards equal a single-process PolarScorer's.
    _launch(kind, tiny_qwen2_lm_dir, tiny_qwen2_rm_dir, tmp_path, config_file)
    records = {}
    for rank in (0, 1):
        path = tmp_path / f"rewards_rank{rank}.jsonl"
        assert path.exists(), f"rank {rank} never called the reward"
        records[rank] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = records[0] + records[1]
    assert {r["world"] for r in rows} == {2}
    # Each rank scored its own slice: 2 steps x 4 completions per rank.
    assert len(records[0]) == len(records[1]) == 8
    for r in rows:
        assert r["reward"] is not None and math.isfinite(r["reward"])
        i = int(r["prompt"].split()[1].rstrip(":"))
        assert r["reference"] == f"The answer is {2 * i}.", "the reference must be the one of its own prompt"
    scorer = PolarScorer(tiny_qwen2_rm_dir, device="cpu")
    expected = scorer.score(
        [r["prompt"] for r in rows], [r["reference"] for r in rows], [r["completion"] for r in rows]
    )
    assert [r["reward"] for r in rows] == pytest.approx(expected, abs=1e-5)
    history = json.loads((tmp_path / "log_history.json").read_text(encoding="utf-8"))
    logged = [h for h in history if "polar_reward/raw_mean" in h]
    assert logged, "raw reward statistics must reach TRL's logs"
    assert any("rewards/polar_reward/mean" in h for h in history)


def test_the_7b_grpo_config_is_an_eight_gpu_zero3_config():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(ZERO3))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"]
    assert config.deepspeed_config["zero3_save_16bit_model"]  # a loadable policy checkpoint at the end
    assert (config.num_processes, config.num_machines, config.mixed_precision) == (8, 1, "bf16")
    assert not config.use_cpu
