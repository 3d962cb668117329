"""OpenRLHF's own rollout path scoring with trl_polar (run under a pinned OpenRLHF by the contract tests).

stdin: {"commands": [[flag, ...], ...], "rollouts": [{"prompt", "response", "label"}], "tokenizer": dir}. Each
command's flags are parsed by
OpenRLHF's own ``train_ppo_ray`` argument code (its ``__main__`` block, run with ``train`` replaced by a capture).
Each rollout then goes through OpenRLHF's ``SingleTurnAgentExecutor.execute`` (the reward by HTTP or by the reward
file, as ``--reward.remote_url`` says), with vLLM's generation stood in by an engine that returns the given response's
token ids; the outputs become Experiences by ``SamplesGenerator._process_response_into_experience`` and are merged
into micro-batches of ``--rollout.micro_batch_size`` by ``Experience.concat_experiences``, as
``split_rollout_samples`` does. Prints, per command, the parsed reward settings, each micro-batch's rewards, scores
and polar_failed, and whether ``make_experience`` would find precomputed rewards (``samples_list[0].rewards``).
"""

import argparse
import asyncio
import datetime
import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.utils.agent import SingleTurnAgentExecutor
from transformers import AutoTokenizer
from vllm import SamplingParams


def parse(flags):
    source = Path(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin).read_text(encoding="utf-8")
    main = textwrap.dedent(source.split('if __name__ == "__main__":', 1)[1])
    parsed = []
    sys.argv = ["train_ppo_ray", *flags]
    exec(main, {"argparse": argparse, "datetime": datetime.datetime, "os": __import__("os"), "train": parsed.append})
    return parsed[0]


class Engine:
    """vLLM generation stood in: the rollout's response ids (and EOS), as vLLM's request output holds them."""

    def __init__(self, ids):
        self.ids = ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = SimpleNamespace(token_ids=self.ids, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def setting(args, dotted, flat):
    """One setting, as 0.11 (``reward.remote_url``) or earlier releases (``remote_rm_url``) name it."""
    node = args
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node if node is not None or not flat else getattr(args, flat, None)


def run(flags, rollouts, tokenizer):
    """One documented command's rollouts through OpenRLHF's executor, sample processing and micro-batch merge."""
    args = parse(flags)
    remote_url = setting(args, "reward.remote_url", "remote_rm_url")
    max_len = setting(args, "data.max_len", "max_len")
    size = setting(args, "rollout.micro_batch_size", "micro_rollout_batch_size")
    executor = SingleTurnAgentExecutor(remote_rm_url=remote_url)
    params = SamplingParams(max_tokens=setting(args, "rollout.max_new_tokens", "max_new_tokens"), logprobs=None)

    async def roll(rollout):
        ids = tokenizer(rollout["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return await executor.execute(rollout["prompt"], rollout["label"], params, max_len, tokenizer, Engine(ids))

    outputs = [asyncio.run(roll(r)) for r in rollouts]
    samples = [SamplesGenerator._process_response_into_experience(None, o, max_len=max_len) for o in outputs]
    batches = [
        Experience.concat_experiences(samples[i : i + size], tokenizer.pad_token_id)
        for i in range(0, len(samples), size)
    ]
    return {
        "remote_url": remote_url,
        "label_key": setting(args, "data.label_key", "label_key"),
        "clip_range": list(setting(args, "reward.clip_range", "reward_clip_range")),
        "rewards_precomputed": batches[0].rewards is not None,
        "batches": [
            {
                "rewards": b.rewards.flatten().tolist(),
                "scores": b.scores.flatten().tolist(),
                "polar_failed": b.info["polar_failed"].flatten().tolist(),
            }
            for b in batches
        ],
    }


payload = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(payload["tokenizer"])
print(json.dumps({"results": [run(flags, payload["rollouts"], tokenizer) for flags in payload["commands"]]}))
