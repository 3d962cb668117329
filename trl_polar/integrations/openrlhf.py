"""POLAR rewards for OpenRLHF: the reward file (`reward_func`) and the one reading of OpenRLHF's samples
(`read_samples`) that the file and the server's ``/get_reward`` share, so both give the same reward.

OpenRLHF PPO (0.11)::

    --reward.remote_url $(python -c "import trl_polar.integrations.openrlhf as m; print(m.__file__)") \
    --data.label_key reference        # older releases: --remote_rm_url ... --label_key reference

with ``TRL_POLAR_MODEL=/path/to/polar-rm`` in the environment. OpenRLHF loads this file by path and calls
``reward_func([query], [prompt], [label])`` once per rollout, from threads, where the query is the prompt's token
ids (its last ones, if the prompt was longer than its budget) + the response, decoded with special tokens kept,
the prompt is the full (chat-templated) prompt and the label the label column. The calls of concurrent rollouts
are scored together (`trl_polar.integrations.coalesce`).

A label is the reference text, or a JSON object ``{"reference": ..., "prompt": ...}``: its ``prompt`` (plain text or
messages) then replaces the chat-templated prompt in the POLAR input, which is what the checkpoints were trained on.

Failures (`trl_polar.failures`): OpenRLHF has no "missing reward" state (a rollout without one stops its
experience maker), so ``TRL_POLAR_ON_ERROR`` defaults to "none" here: a rollout that cannot be read or scored gets
the finite ``TRL_POLAR_FAILURE_REWARD`` (default -10.0), ``extra_logs["polar_failed"]=1`` (averaged into
OpenRLHF's logs) and a warning with the cause, exactly as the server's ``/get_reward`` answers it
(`trl_polar.serving.get_reward`). ``TRL_POLAR_ON_ERROR=raise`` stops the run instead: the file logs what failed
and how to fix it, and raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from trl_polar.failures import describe
from trl_polar.integrations import AdapterSettings, get_reward, policy, settings, to_python
from trl_polar.serving.get_reward import (  # noqa: F401  (the wire's names, importable from here as before)
    DEFAULT_STOP_STRINGS,
    Extracted,
    OpenRLHFInputError,
    answer,
    extract_items,
    read_samples,
    response_from_query,
    score_samples,
)

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_coalescers: dict[AdapterSettings, Any] = {}


def _coalescer(config: AdapterSettings) -> Any:
    from trl_polar.integrations.coalesce import Coalescer

    with _lock:
        if config not in _coalescers:
            reward = get_reward(config.model_copy(update={"strip_think": False}), on_error="none")
            _coalescers[config] = Coalescer(reward, config.batch_window_ms / 1000)
        return _coalescers[config]


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """POLAR rewards in OpenRLHF's format: ``{"rewards": tensor, "scores": tensor, "extra_logs": {...}}``.

    ``rewards`` feed the advantage; ``scores`` (used by OpenRLHF's dynamic filtering) carry the same values;
    ``extra_logs["polar_failed"]`` marks the rollouts that got ``TRL_POLAR_FAILURE_REWARD`` (see the module docs).
    """
    config = settings()
    rule = policy(config, default_on_error="none")
    queries, prompts = to_python(queries), to_python(prompts)
    labels = to_python(labels) if labels is not None else [None] * len(queries)
    # Think blocks are stripped here, in the shared reading, so the reward model sees what /get_reward scores.
    samples = read_samples(queries, prompts, labels, strip=config.strip_think)
    coalescer = _coalescer(config)

    def score(polar_prompts, references, responses):
        futures = [coalescer.submit(*item) for item in zip(polar_prompts, responses, references, strict=True)]
        out = []
        for future in futures:
            try:
                scored = rule.wait(future)
            except Exception as err:
                out.append((None, describe(err)))
                continue
            out.append((scored.reward, scored.failure))
        return out

    scored, failures = score_samples(samples, score)
    if failures and rule.on_error == "raise":
        # OpenRLHF logs the exception at INFO level only: say it where users look.
        logger.warning(
            "POLAR reward failed for %d rollout(s), stopping as TRL_POLAR_ON_ERROR=raise asks: %s. Fix the rollout's "
            "input, or set TRL_POLAR_ON_ERROR=none to give such rollouts TRL_POLAR_FAILURE_REWARD with "
            "polar_failed=1.",
            len(failures),
            failures[min(failures)],
        )
    rule.settle(failures, len(queries), "rollouts", "query", {i: f for i, (f, _) in samples.failures.items()})
    result = answer(samples, scored, failures, fallback=config.failure_reward)
    del result["errors"]  # the messages are in the warning settle logged
    return {
        "rewards": torch.tensor(result["rewards"], dtype=torch.float32),
        "scores": torch.tensor(result["scores"], dtype=torch.float32),
        "extra_logs": {"polar_failed": torch.tensor(result["extra_logs"]["polar_failed"], dtype=torch.float32)},
    }
