"""ms-swift's GRPO reward step with the POLAR plugin (run under ms-swift 4.6.0 by the contract tests).

The documented ``swift rlhf`` arguments (``argv``) are parsed by ms-swift's own argument parser for
``RLHFArguments`` (built as its ``parse_args`` builds it; the dataclass itself is not built, since that resolves the
model on the hub). The plugin files it names are loaded by ms-swift's ``--external_plugins`` loader
(``import_external_file``); the reward is
built as its GRPO trainer builds it (``orms[name](args=...)``) and called through ms-swift's
``compute_rewards_per_func`` beside its built-in ``format`` reward. stdin: {"cases": [{"env": {...}, "rows":
[{"messages": [...], "extra": {...}}]}], "argv": [...]}; prints {"parsed": {...}, "results": [{"rewards": [[polar,
format], ...]} or {"error"}]}.
"""

import json
import os
import sys

import torch
from swift.arguments import RLHFArguments
from swift.rewards import orms
from swift.rl_core.data import GRPOSample
from swift.rl_core.grpo_algorithm import compute_rewards_per_func
from swift.utils.utils import _patch_get_type_hints, import_external_file
from transformers import HfArgumentParser

payload = json.load(sys.stdin)
rlhf, *argv = payload["argv"]
with _patch_get_type_hints():
    parser = HfArgumentParser([RLHFArguments])
parsed, remaining = parser.parse_known_args(argv)
for path in parsed.external_plugins:
    import_external_file(path)
funcs = [orms[name](args=None) for name in parsed.reward_funcs] + [orms["format"](args=None)]
results = []
for case in payload["cases"]:
    os.environ.update(case["env"])
    samples = [
        GRPOSample(messages=row["messages"], extra=row["extra"], prompt_id=f"p{i // 2}", request_id=str(i))
        for i, row in enumerate(case["rows"])
    ]
    try:
        rewards = compute_rewards_per_func(samples, funcs, None, torch.device("cpu"))
        results.append({"rewards": [[None if v != v else v for v in row] for row in rewards.tolist()]})
    except Exception as err:  # the message ms-swift's user would read
        results.append({"error": f"{type(err).__name__}: {err}"})
    for key in case["env"]:
        del os.environ[key]
summary = {"command": rlhf, "rlhf_type": parsed.rlhf_type, "reward_funcs": parsed.reward_funcs, "remaining": remaining}
print(json.dumps({"parsed": {**summary, "external_plugins": parsed.external_plugins}, "results": results}))
