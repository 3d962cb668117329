"""POLAR rewards for verl's batch reward manager.

verl configuration (PPO with GAE, as POLAR's official recipe)::

    reward_model.enable=False reward_model.reward_manager=batch \
    custom_reward_function.path=$(python -c "import trl_polar.integrations.verl as m; print(m.__file__)") \
    custom_reward_function.name=compute_score_batch

with ``TRL_POLAR_MODEL=/path/to/polar-rm`` in the workers' environment. verl loads this file by path, so it uses
absolute imports only. Each parquet row carries the prompt in ``extra_info["prompt"]`` (a string or a message list)
and the reference in ``reward_model.ground_truth``, as upstream POLAR's data builders write them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trl_polar.integrations import get_reward, to_python


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None] | None,
    **kwargs: Any,
) -> list[float]:
    """One POLAR reward per response: r(extra_info["prompt"], ground_truth, response without <think>).

    verl writes each returned float at the response's last valid token. Other keyword arguments verl passes
    (``reward_router_address``, ``reward_model_tokenizer``, configured ``reward_kwargs``) are accepted and unused.
    """
    solutions = to_python(solution_strs)
    n = len(solutions)
    truths = to_python(ground_truths)
    infos = to_python(extra_infos) if extra_infos is not None else [None] * n
    if len(truths) != n or len(infos) != n:
        raise ValueError(
            f"verl passed {n} solution_strs, {len(truths)} ground_truths and {len(infos)} extra_infos; they must "
            "have one entry per response."
        )
    prompts = []
    for i, info in enumerate(infos):
        if not isinstance(info, Mapping) or info.get("prompt") is None:
            source = to_python(data_sources)[i] if data_sources is not None else "?"
            raise ValueError(
                f"Row {i} (data_source={source!r}) has no extra_info['prompt']. POLAR scores the response against "
                "the reference for its prompt: write the prompt (text or messages) into extra_info['prompt'] when "
                "building the parquet files, as upstream POLAR's data scripts do."
            )
        prompts.append(info["prompt"])
    for i, truth in enumerate(truths):
        if truth is None or (isinstance(truth, str) and not truth.strip()):
            raise ValueError(
                f"Row {i} has no reward_model.ground_truth. POLAR uses it as the reference answer: fill it in the "
                "parquet files or drop the row."
            )
    reward = get_reward()
    rewards, _ = reward.compute(prompts, solutions, truths)
    return [float(r) for r in rewards]
