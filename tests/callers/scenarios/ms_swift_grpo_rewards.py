"""ms-swift's GRPO reward step with the POLAR plugin (run under ms-swift 4.6.0 by the contract tests).

The plugin file is loaded by ms-swift's own ``--external_plugins`` loader (``import_external_file``); the reward is
built as its GRPO trainer builds it (``orms[name](args=...)``) and called through ms-swift's
``compute_rewards_per_func`` beside its built-in ``format`` reward. stdin: {"cases": [{"env": {...}, "rows":
[{"messages": [...], "extra": {...}}]}]}; prints {"results": [{"rewards": [[polar, format], ...]} or {"error"}]}.
"""

import json
import os
import sys

import torch
from swift.rewards import orms
from swift.rl_core.data import GRPOSample
from swift.rl_core.grpo_algorithm import compute_rewards_per_func
from swift.utils.utils import import_external_file

import trl_polar.integrations.ms_swift as plugin

import_external_file(plugin.PLUGIN)
funcs = [orms["polar"](args=None), orms["format"](args=None)]
results = []
for case in json.load(sys.stdin)["cases"]:
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
print(json.dumps({"results": results}))
