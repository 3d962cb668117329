"""verl's own reward loop scoring a batch with trl_polar (run under a pinned verl by the contract tests).

stdin: {"runs": [{"env": {...}, "overrides": [...], "samples": [{"prompt", "response", "ground_truth",
"extra_info"}], "router": null or "host:port"}]}. Without a router: verl's RewardLoopManager (its workers are the Ray
stand-in's in-process actors) runs compute_rm_score on a DataProto built as the agent loop builds it. With a router:
verl's RewardLoopWorker gets the address, as the manager hands it over once its reward-model servers are up (here a
`trl-polar serve` stands behind it, in the engine's wire shape). Prints {"results": [{"rewards": per-row reward,
"extra": reward_extra_info, "responses": decoded}]}.
"""

import json
import os
import sys

import numpy as np
import torch
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.reward_loop import RewardLoopManager, RewardLoopWorker

from trl_polar.integrations.verl_check import compose


def run(payload):
    config = compose(payload["overrides"])
    tokenizer = AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path)
    data, responses = batch(tokenizer, payload["samples"])
    if payload.get("router"):
        worker = RewardLoopWorker(config, reward_router_address=payload["router"])
        outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))  # the loop verl bound it to
        rewards = [o["reward_score"] for o in outputs]
        extra = {k: [o["reward_extra_info"][k] for o in outputs] for k in outputs[0]["reward_extra_info"]}
    else:
        out = RewardLoopManager(config).compute_rm_score(data)
        rewards = out.batch["rm_scores"].sum(dim=1).tolist()
        extra = {k: out.non_tensor_batch[k].tolist() for k in out.meta_info["reward_extra_keys"]}
    decoded = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    return {"rewards": rewards, "extra": extra, "responses": decoded}


def batch(tokenizer, samples):
    """A DataProto as verl's agent loop hands it over: left-padded prompts, right-padded responses."""
    prompts = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] for s in samples]
    eos = [tokenizer.eos_token_id]
    responses = [tokenizer(s["response"], add_special_tokens=False)["input_ids"] + eos for s in samples]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses)) + 2
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (width_r - len(r)) for r in responses])
    mask = torch.tensor(
        [
            [0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
    )
    data = DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": mask,
        },
        non_tensors={
            "data_source": np.array(["hh_rlhf"] * len(samples), dtype=object),
            "reward_model": np.array([{"ground_truth": s["ground_truth"], "style": "model"} for s in samples]),
            "extra_info": np.array([dict(s["extra_info"]) for s in samples], dtype=object),
        },
    )
    return data, responses


results = []
for one in json.load(sys.stdin)["runs"]:
    os.environ.update(one["env"])
    results.append(run(one))
    for key in one["env"]:
        del os.environ[key]
print(json.dumps({"results": results}))
