"""POLAR rewards for verl: `compute_score` (and `compute_score_async`) per sample for verl's reward loop, and
`compute_score_batch` for the legacy batch reward manager.

verl 0.9 (and 0.7.1-0.8; reward settings under ``reward.*``, manager ``naive``)::

    reward.custom_reward_function.path=pkg://trl_polar.integrations.verl \
    reward.custom_reward_function.name=compute_score_async      # or compute_score

verl 0.7-0.8 also take the top-level ``custom_reward_function.*`` keys (0.9 ignores them and scores with its
default scorer: ``trl-polar check-verl -- <overrides>`` says which function verl will call). verl 0.5-0.6::

    reward_model.reward_manager=batch \
    custom_reward_function.path=$(python -c "import trl_polar.integrations.verl as m; print(m.__file__)") \
    custom_reward_function.name=compute_score_batch

with ``TRL_POLAR_URL`` (a ``trl-polar serve``; verl's reward-loop workers hold no GPU) or
``TRL_POLAR_MODEL=/path/to/polar-rm`` in the workers' environment. verl may load this file by path, so it uses
absolute imports only. Each parquet row carries the prompt in ``extra_info["prompt"]`` (a string or a message
list; another key with ``custom_reward_function.reward_kwargs.prompt_key=...``) and the reference in
``reward_model.ground_truth``, as upstream POLAR's data builders write them.

verl's reward loop calls the per-sample function once per response, from many threads (a plain function runs in
its event loop's executor) or coroutines (an ``async def`` is awaited): the calls that arrive within
``TRL_POLAR_BATCH_WINDOW_MS`` are scored together, so responses to one prompt still share its prefix. With
``TRL_POLAR_URL`` each such batch is one request to ``trl-polar serve``, which batches across requests too.

Failures (`trl_polar.failures`): with ``TRL_POLAR_ON_ERROR=raise`` (default) the step stops with the cause.
verl's rewards tensor has no "missing" value, so with ``none`` a failed sample scores 0.0 *and* carries
``polar_failed=1`` in its ``reward_extra_info`` (verl reports it per data source in validation metrics and in
rollout dumps) and is logged as a warning with the running count.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from trl_polar.failures import ItemFailure, describe
from trl_polar.integrations import AdapterSettings, get_reward, policy, settings, to_python
from trl_polar.integrations.coalesce import Coalescer

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_coalescers: dict[AdapterSettings, Coalescer] = {}
_failed = [0]
_router_noted = [False]


def _prompt_of(extra_info: Any, prompt_key: str, data_source: Any, row: int | None = None) -> Any:
    info = to_python(extra_info)
    if not isinstance(info, Mapping) or info.get(prompt_key) is None:
        where = f"Row {row} (data_source={data_source!r})" if row is not None else f"A sample of {data_source!r}"
        raise ValueError(
            f"{where} has no extra_info[{prompt_key!r}]. POLAR scores the response against the reference for its "
            f"prompt: write the prompt (text or messages) into extra_info[{prompt_key!r}] when building the parquet "
            "files, as upstream POLAR's data scripts do, or set custom_reward_function.reward_kwargs.prompt_key."
        )
    return info[prompt_key]


def _check_truth(truth: Any, where: str) -> Any:
    truth = to_python(truth)
    if truth is None or (isinstance(truth, str) and not truth.strip()):
        raise ValueError(
            f"{where} has no reward_model.ground_truth. POLAR uses it as the reference answer: fill it in the parquet "
            "files or drop the row."
        )
    return truth


def _settings(kwargs: dict[str, Any]) -> AdapterSettings:
    config = settings()
    update: dict[str, Any] = {}
    if kwargs.get("prompt_key"):
        update["prompt_key"] = kwargs["prompt_key"]
    router = kwargs.get("reward_router_address")
    if router and not config.url:
        if (config.backend or "trl-polar") != "trl-polar" and config.model:
            # verl serves reward.reward_model.model_path with its own engine (rollout.name) behind this router:
            # score there, in that engine's wire shape, with the template from TRL_POLAR_MODEL.
            update["url"] = f"http://{router}"
        elif not _router_noted[0]:
            _router_noted[0] = True
            logger.warning(
                "verl passed reward_router_address=%s but TRL_POLAR_BACKEND is not 'vllm' or 'sglang': scoring with "
                "%s instead. To score on verl's own reward-model servers, set TRL_POLAR_BACKEND to its "
                "reward.reward_model.rollout.name and TRL_POLAR_MODEL to the POLAR model (for the template).",
                router,
                "TRL_POLAR_URL" if config.url else "the in-process model",
            )
    return config.model_copy(update=update) if update else config


def _coalescer(config: AdapterSettings) -> Coalescer:
    with _lock:
        if config not in _coalescers:
            # Samples are scored with on_error="none" so that one bad sample spares the others of its batch; the
            # caller's policy then applies to its own sample.
            _coalescers[config] = Coalescer(get_reward(config, on_error="none"), config.batch_window_ms / 1000)
        return _coalescers[config]


def _result(scored: Any, config: AdapterSettings, data_source: Any) -> dict[str, float]:
    if scored.failure is None:
        return {"score": float(scored.reward), "polar_failed": 0.0}
    return _fail(scored.failure, config, data_source)


def _fail(reason: str, config: AdapterSettings, data_source: Any) -> dict[str, float]:
    rule = policy(config)
    with _lock:
        _failed[0] += 1
        count = _failed[0]
    if rule.on_error == "raise":
        raise ItemFailure(
            f"A sample of data_source={data_source!r} got no POLAR reward: {reason}. Fix the input, or set "
            "TRL_POLAR_ON_ERROR=none to score such samples 0.0 with polar_failed=1.",
            {0: reason},
            "solution_str",
        )
    logger.warning(
        "A sample of data_source=%r got no POLAR reward (%s); it scores 0.0 with polar_failed=1 (%d so far).",
        data_source,
        reason,
        count,
    )
    return {"score": 0.0, "polar_failed": 1.0}


def _steps(data_source, solution_str, ground_truth, extra_info, kwargs):
    """The one body of `compute_score` and `compute_score_async`: yields (policy, future of the sample's `Scored`)
    once, is sent the `Scored` (or thrown the error of waiting for it), and returns verl's result."""
    config = _settings(kwargs)
    rule = policy(config)
    try:
        prompt = _prompt_of(extra_info, config.prompt_key, data_source)
        truth = _check_truth(ground_truth, f"A sample of data_source={data_source!r}")
        scored = yield rule, _coalescer(config).submit(prompt, to_python(solution_str), truth)
    except ItemFailure:
        raise
    except Exception as err:
        if rule.on_error == "raise":
            raise
        return _fail(describe(err), config, data_source)
    return _result(scored, config, data_source)


def _resume(steps, outcome: Any) -> dict[str, float]:
    try:
        if isinstance(outcome, Exception):
            steps.throw(outcome)
        else:
            steps.send(outcome)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the scoring steps yielded twice")  # pragma: no cover - _steps yields once


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None, **kwargs: Any
) -> dict[str, float]:
    """One POLAR reward for one response, as verl's reward loop (and legacy naive manager) calls it.

    Returns ``{"score": reward, "polar_failed": 0.0 or 1.0}``: verl takes ``score`` as the reward and the other
    keys as ``reward_extra_info``. Keyword arguments: ``prompt_key`` (from ``custom_reward_function.reward_kwargs``),
    ``reward_router_address`` (see the module docs); ``reward_model_tokenizer`` and others are accepted and unused.
    """
    steps = _steps(data_source, solution_str, ground_truth, extra_info, kwargs)
    try:
        rule, future = next(steps)
    except StopIteration as done:
        return done.value
    try:
        outcome = rule.wait(future)
    except Exception as err:
        outcome = err
    return _resume(steps, outcome)


async def compute_score_async(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None, **kwargs: Any
) -> dict[str, float]:
    """`compute_score` as a coroutine: verl awaits it on its reward loop (it checks
    ``inspect.iscoroutinefunction``), so hundreds of samples wait together without a thread each."""
    steps = _steps(data_source, solution_str, ground_truth, extra_info, kwargs)
    try:
        rule, future = next(steps)
    except StopIteration as done:
        return done.value
    try:
        outcome = await rule.await_(asyncio.wrap_future(future))
    except Exception as err:
        outcome = err
    return _resume(steps, outcome)


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None] | None,
    **kwargs: Any,
) -> list[float]:
    """One POLAR reward per response for verl's batch manager: r(extra_info[prompt_key], ground_truth, response
    without <think>).

    verl writes each returned float at the response's last valid token. ``prompt_key`` (default "prompt") comes
    from ``custom_reward_function.reward_kwargs``; other keyword arguments are accepted and unused. With
    ``TRL_POLAR_ON_ERROR=none`` the entries are ``{"score", "polar_failed"}`` dicts, as `compute_score` returns.
    """
    config = _settings(kwargs)
    solutions = to_python(solution_strs)
    n = len(solutions)
    truths = to_python(ground_truths)
    infos = to_python(extra_infos) if extra_infos is not None else [None] * n
    sources = to_python(data_sources) if data_sources is not None else ["?"] * n
    if len(truths) != n or len(infos) != n:
        raise ValueError(
            f"verl passed {n} solution_strs, {len(truths)} ground_truths and {len(infos)} extra_infos; they must "
            "have one entry per response."
        )
    prompts = [_prompt_of(info, config.prompt_key, sources[i], i) for i, info in enumerate(infos)]
    truths = [_check_truth(truth, f"Row {i}") for i, truth in enumerate(truths)]
    rule = policy(config)
    outcome = get_reward(config, on_error=rule.on_error).evaluate(prompts, solutions, truths)
    if rule.on_error == "raise":
        return [float(r) for r in outcome.rewards]
    return [
        _fail(outcome.failures[i], config, sources[i]) if i in outcome.failures else {"score": r, "polar_failed": 0.0}
        for i, r in enumerate(outcome.rewards)
    ]
