"""verl's own reward loop scoring a batch with trl_polar (run under a pinned verl by the contract tests).

stdin: {"overrides": [...], "samples": [{"prompt", "response", "ground_truth", "extra_info"}], "router": null or
"host:port"}. Without a router: verl's RewardLoopManager (its workers are the Ray stand-in's in-process actors) runs
compute_rm_score on a DataProto built as the agent loop builds it. With a router: verl's RewardLoopWorker gets the
address, as the manager hands it over once its reward-model servers are up (here a `trl-polar serve` stands behind
it, in the engine's wire shape). Prints {"rewards": per-row reward, "extra": reward_extra_info, "responses": decoded}.
"""

import json
import sys

import numpy as np
import torch
from transformers import AutoTokenizer
from verl import DataProto
from verl.experimental.reward_loop import RewardLoopManager, RewardLoopWorker

from trl_polar.integrations.verl_check import compose

payload = json.load(sys.stdin)
config = compose(payload["overrides"])
tokenizer = AutoTokenizer.from_pretrained(config.actor_rollout_ref.model.path)
samples = payload["samples"]
prompts = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] for s in samples]
responses = [
    tokenizer(s["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for s in samples
]
width_p, width_r = max(map(len, prompts)), max(map(len, responses)) + 2
pad = tokenizer.pad_token_id
prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts])
response_ids = torch.tensor([r + [pad] * (width_r - len(r)) for r in responses])
mask = torch.tensor(
    [
        [0] * (width_p - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (width_r - len(r))
        for p, r in zip(prompts, responses)
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
        "reward_model": np.array(
            [{"ground_truth": s["ground_truth"], "style": "model"} for s in samples], dtype=object
        ),
        "extra_info": np.array([dict(s["extra_info"]) for s in samples], dtype=object),
    },
)
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
print(json.dumps({"rewards": rewards, "extra": extra, "responses": decoded}))
