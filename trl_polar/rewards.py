"""PolarReward: POLAR as a reward function for TRL's GRPOTrainer and RLOOTrainer.

TRL calls a reward function with keyword arguments only: ``prompts``, ``completions``, ``completion_ids``,
``trainer_state``, ``log_extra``, ``log_metric`` and every dataset column (already repeated once per completion), and
expects one float or None per completion. `PolarReward` reads the reference from a dataset column, scores each
(prompt, reference, completion) triple with a `PolarScorer` and returns the rewards.

It is deliberately a plain class and not an ``nn.Module``: TRL treats any module in ``reward_funcs`` as a reward
*model* and would tokenize prompt + completion for it, without the reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .failures import FailurePolicy, describe
from .scorer import EncodeError, Scorer
from .template import Text, check_text, check_texts, flatten, rename_parts

logger = logging.getLogger(__name__)

AGGREGATES = ("mean", "max", "min")
NORMALIZATIONS = (None, "group", "batch")
ON_MISSING = ("none", "error")
MODEL_ENV = "TRL_POLAR_MODEL"
# Upstream POLAR's RL recipe scores the answer without its reasoning; every reward path of this library does too.
STRIP_THINK_DEFAULT = True
_warned_cpu = False

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*", re.DOTALL)


def strip_think(text: str) -> str:
    """Remove reasoning: ``<think>…</think>`` blocks, anything before a lone ``</think>`` (chat templates that
    open the block in the prompt) and an unclosed ``<think>`` to the end (a truncated answer has no answer).

    >>> strip_think("<think>2+2 is 4</think>The answer is 4.")
    'The answer is 4.'
    >>> strip_think("reasoning only</think> 4")
    '4'
    >>> strip_think(" 4 ")  # no reasoning: the answer as written, as upstream's recipe leaves it
    ' 4 '
    """
    if "<think>" not in text and "</think>" not in text:
        return text
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return _THINK_OPEN.sub("", text).strip()


def completion_text(completion: Text | None, index: int = 0) -> str:
    """The text of a completion as TRL passes it: a string, or a list of messages (with tools, several; messages
    without string content, such as bare tool calls, carry no text to score)."""
    if isinstance(completion, str):
        return check_text(completion, f"completions[{index}]")
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, Mapping)):
        for j, message in enumerate(completion):
            if isinstance(message, Mapping) and "content" not in message and not message.get("tool_calls"):
                raise ValueError(
                    f"`completions[{index}][{j}]` is a message without 'content' ({message!r:.80}). Give it its "
                    "text, e.g. {'role': 'assistant', 'content': '...'} (a tool call carries 'tool_calls')."
                )
        # Bare tool calls (content None) carry no text to score; text parts of content lists are read by flatten.
        kept = [m for m in completion if isinstance(m, Mapping) and m.get("content") is not None]
        return flatten(kept, f"completions[{index}]")
    raise ValueError(
        f"`completions[{index}]` must be a string or a list of messages, got {type(completion).__name__}: "
        f"{completion!r:.80}."
    )


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, Sequence) and len(value) == 0


def _as_reference_list(value: Any) -> tuple[list[Text], list[int]]:
    """A row's references (one string, one message list, or a list of several of those) and the positions of the
    empty items of such a list (``""``, None, NaN), which are not references.

    >>> _as_reference_list(["4", "", None, "four"])
    (['4', 'four'], [1, 2])
    """
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy / pandas arrays from parquet
        value = value.tolist()
    if isinstance(value, str):
        return [value], []
    if isinstance(value, Sequence) and value and all(isinstance(v, Mapping) for v in value):
        return [value], []  # one conversational reference
    if isinstance(value, Sequence):
        empty = [j for j, v in enumerate(value) if _is_missing(v)]
        return [v for v in value if not _is_missing(v)], empty
    return [value], []


@dataclass
class RewardOutcome:
    """What one reward call produced: per row the reward, the raw POLAR score, and why a row failed (if it did)."""

    rewards: list[float | None]
    raw: list[float | None]
    failures: dict[int, str] = field(default_factory=dict)


@dataclass
class _Plan:
    """What one reward call scores: the triples (plus baselines) and which row each belongs to."""

    prompts: Sequence[Text]
    references: Sequence[Any]
    num_rows: int
    reference_column: str = "reference"
    batch: list[tuple[Text, Text, str]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    base_index: list[int] = field(default_factory=list)
    num_triples: int = 0
    # Why a row (by row index) or a scored triple (by batch index) got no score.
    failures: dict[int, str] = field(default_factory=dict)
    triple_failures: dict[int, str] = field(default_factory=dict)

    def columns(self) -> tuple[list[Text], list[Text], list[str]]:
        return [t[0] for t in self.batch], [t[1] for t in self.batch], [t[2] for t in self.batch]

    def place(self, j: int, reason: str) -> str:
        """A scorer's message about triple ``j`` of the batch, put in the caller's terms (row index, field)."""
        t = j if j < self.num_triples else self.base_index.index(j)  # a baseline: the first triple it serves
        i = self.owners[t]
        reference = f"{self.reference_column}[{i}]"
        candidate = f"completions[{i}]" if j < self.num_triples else reference
        fields = {"prompt": f"prompts[{i}]", "reference": reference, "candidate": candidate}
        return f"Index {i}: {rename_parts(reason, fields)}"


class _Attempts:
    """Scoring a plan's triples under the failure policy: with on_error="none" a triple the scorer refuses (its
    index named by an `EncodeError`) is set aside and the others are scored again; any other failure fails every
    triple still pending. With "raise" the error propagates."""

    def __init__(self, plan: _Plan, on_error: str) -> None:
        self.plan = plan
        self.on_error = on_error
        self.pending = list(range(len(plan.batch)))
        self.values: list[float | None] = [None] * len(plan.batch)
        self._columns = plan.columns()

    def columns(self) -> list[list[Any]]:
        return [[column[j] for j in self.pending] for column in self._columns]

    def done(self, scores: Sequence[float | None]) -> None:
        for j, value in zip(self.pending, scores, strict=True):
            self.values[j] = value
        self.pending = []

    def failed(self, err: Exception) -> None:
        if isinstance(err, EncodeError) and 0 <= err.index < len(self.pending):
            # The scorer counts items of its own call; the user knows rows by their index in this call.
            reason = self.plan.place(self.pending[err.index], err.reason)
            if self.on_error == "raise":
                raise ValueError(reason) from err
            self.plan.triple_failures[self.pending.pop(err.index)] = reason
            return
        if self.on_error == "raise":
            raise err
        for j in self.pending:
            self.plan.triple_failures[j] = describe(err)
        self.pending = []


@contextlib.contextmanager
def _outside_zero3() -> Iterator[None]:
    """Load a model whole on this rank even while a ZeRO-3 run is set up.

    Under ZeRO-3, transformers builds every model inside DeepSpeed's ``zero.Init`` (it asks the global DeepSpeed
    config that TrainingArguments registers), which partitions its weights across the ranks. The policy wants that;
    the reward model, which no DeepSpeed engine wraps, would be left with empty shards on every rank. The config is
    unregistered while the reward model loads, and restored after.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


class PolarReward:
    """POLAR reward for TRL's GRPO/RLOO: ``r(prompt, reference, completion)``, reference from a dataset column.

    Args:
        model_or_scorer: a saved POLAR model path (loaded lazily, on first use, on this rank's device), a loaded
            reward model, a `PolarScorer`, or any object with ``.score(prompts, references, candidates)`` (a remote
            client). None reads the model path from the ``TRL_POLAR_MODEL`` environment variable.
        reference_column: the dataset column holding the reference (gold) answer. A row may hold a list of
            references; their rewards are combined with ``aggregate``.
        aggregate: "mean", "max" or "min" over a row's references.
        on_missing_reference: "none" returns None for a row without a reference (TRL then ignores the row for this
            reward), "error" raises, naming the row.
        strip_think: remove ``<think>…</think>`` from completions before scoring (default True, as upstream's RL
            recipe does; every reward path of this library shares this default).
        wrapper: "sft" (default) or "pretrain", the template wrapper.
        baseline: subtract r(prompt, reference, reference), so a copy of the reference scores exactly 0.
        normalize: None (default), "group" (z-score among the completions of one prompt in this call) or "batch"
            (z-score over the call).
        clip: ``(low, high)`` or a single ``c`` for ``(-c, c)``, applied after normalisation.
        sigmoid_scale: map the reward through ``sigmoid(reward / sigmoid_scale)``, last.
        on_error: "raise" (default) or "none": what a completion that cannot be scored gets (an unreadable completion,
            a scorer or server failure, a timeout); "none" gives it None (TRL skips it) and counts it in
            ``<name>/failed_frac`` (`trl_polar.failures`).
        score_timeout: seconds a call may wait for its scores (None: no limit); past it, ``on_error`` applies.
        name: the metric name TRL logs this reward under (``rewards/<name>/mean``).
        log_stats: log raw-reward statistics through TRL's ``log_metric``.
        url, urls: score remotely instead: one server or several replicas (`trl_polar.serving.client.PolarClient`): a
            ``trl-polar serve`` server, or vLLM / SGLang / lmdeploy serving a POLAR model (``backend``).
        backend: "trl-polar" (default), "vllm", "sglang" or "lmdeploy".
        api_key: the server's API key, if it has one.
        client_kwargs: more `PolarClient` settings (``timeout``, ``max_retries``, ``template`` for the engines, ...).
        scorer_kwargs: passed to `PolarScorer` when a path or model is given (``max_tokens_per_batch``, ``dtype``,
            ``device``, ...).

    Raw POLAR rewards are about 0 for a copy of the reference and -7 to -11 for wrong answers; GRPO's group
    normalisation makes the offset irrelevant, so normalisation is off by default, as in the paper.
    """

    __name__ = "polar_reward"

    def __init__(
        self,
        model_or_scorer: Any = None,
        *,
        reference_column: str = "reference",
        aggregate: Literal["mean", "max", "min"] = "mean",
        on_missing_reference: Literal["none", "error"] = "none",
        strip_think: bool = STRIP_THINK_DEFAULT,
        wrapper: str = "sft",
        baseline: bool = False,
        normalize: Literal["group", "batch"] | None = None,
        clip: float | tuple[float, float] | None = None,
        sigmoid_scale: float | None = None,
        eps: float = 1e-6,
        on_error: Literal["raise", "none"] = "raise",
        score_timeout: float | None = None,
        name: str = "polar_reward",
        log_stats: bool = True,
        url: str | None = None,
        urls: Sequence[str] | None = None,
        backend: str = "trl-polar",
        api_key: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        **scorer_kwargs: Any,
    ) -> None:
        _check_options(aggregate, normalize, on_missing_reference, reference_column, sigmoid_scale)
        self.clip = _clip_range(clip)
        self.policy = FailurePolicy(on_error, score_timeout)
        if url is not None or urls is not None:
            if model_or_scorer is not None:
                raise ValueError("Pass either a model (or scorer) or url/urls, not both.")
            from .serving.client import PolarClient

            model_or_scorer = PolarClient(
                url=url, urls=urls, backend=backend, api_key=api_key, wrapper=wrapper, **(client_kwargs or {})
            )
        if model_or_scorer is None:
            model_or_scorer = os.environ.get(MODEL_ENV)
            if not model_or_scorer:
                raise ValueError(
                    "PolarReward needs a reward model: pass a saved POLAR model path, a PolarScorer, or an object "
                    f"with .score(prompts, references, candidates), or set the {MODEL_ENV} environment variable."
                )
        self._source = model_or_scorer
        self._scorer_kwargs = scorer_kwargs
        self._scorer = model_or_scorer if isinstance(model_or_scorer, Scorer) else None
        self.reference_column = reference_column
        self.aggregate = aggregate
        self.on_missing_reference = on_missing_reference
        self.strip_think = strip_think
        self.wrapper = wrapper
        self.baseline = baseline
        self.normalize = normalize
        self.sigmoid_scale = sigmoid_scale
        self.eps = eps
        self.__name__ = name
        self.log_stats = log_stats
        self.empty_reference_items = 0  # empty items ("", None) inside lists of references, left out

    # ------------------------------------------------------------------------------------------------ scorer
    @property
    def scorer(self) -> Any:
        """The scoring engine, built on first use so that each rank loads its copy on its own device."""
        if self._scorer is None:
            from .scorer import PolarScorer

            if isinstance(self._source, (str, os.PathLike)) and "device" not in self._scorer_kwargs:
                _warn_if_no_accelerator(self._source)
            with _outside_zero3():
                self._scorer = PolarScorer(self._source, **self._scorer_kwargs)
        return self._scorer

    def __getstate__(self) -> dict[str, Any]:
        # A model given by path travels as its path (TRL's async trainer pickles reward functions to a new process).
        state = self.__dict__.copy()
        if not isinstance(self._source, Scorer):
            state["_scorer"] = None
        return state

    # ------------------------------------------------------------------------------------------------ protocol
    def __call__(
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
        log_metric: Any = None,
        **columns: Any,
    ) -> list[float | None]:
        started = time.perf_counter()
        references = self._check_call(prompts, completions, columns)
        outcome = self.evaluate(prompts, completions, references)
        self._report(log_metric, outcome, started)
        return outcome.rewards

    def _report(self, log_metric: Any, outcome: RewardOutcome, started: float) -> None:
        if log_metric is not None and self.log_stats:
            n = len(outcome.rewards)
            failed = len(outcome.failures) / n if n else 0.0
            missing = (sum(r is None for r in outcome.rewards) / n if n else 0.0) - failed
            self._log(log_metric, outcome.raw, missing, failed, time.perf_counter() - started)

    def _check_call(self, prompts: Sequence[Text], completions: Sequence[Text], columns: dict[str, Any]) -> Any:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"Got {len(prompts)} prompts and {n} completions; TRL passes one prompt per completion.")
        if self.reference_column not in columns:
            available = sorted(k for k in columns if k not in ("log_extra", "environments"))
            raise ValueError(
                f"PolarReward needs the dataset column {self.reference_column!r} with each prompt's reference answer, "
                f"but the dataset has only {available}. Add that column, or pass reference_column=<your column>."
            )
        references = columns[self.reference_column]
        if len(references) != n:
            raise ValueError(
                f"Column {self.reference_column!r} has {len(references)} values for {n} completions; keep "
                "remove_unused_columns=False so TRL passes every column."
            )
        return references

    def compute(
        self, prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Any]
    ) -> tuple[list[float | None], list[float | None]]:
        """Rewards for each completion and its raw POLAR score (aggregated over its references, before baseline,
        normalisation, clipping and sigmoid); both None where the row has no reference (or failed, with
        ``on_error="none"``)."""
        outcome = self.evaluate(prompts, completions, references)
        return outcome.rewards, outcome.raw

    def evaluate(
        self, prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Any]
    ) -> RewardOutcome:
        """`compute` with the reasons of the failed rows, under the failure policy (``on_error``,
        ``score_timeout``): the adapters count them in their framework's logs."""
        plan = self._plan(prompts, completions, references)
        values: list[float | None] = []
        if plan.batch:
            values = self._score_plan(plan, lambda *cols: self.policy.call(self._score, *cols))
        return self._finish(plan, values)

    async def aevaluate(
        self, prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Any]
    ) -> RewardOutcome:
        """`evaluate` without blocking the event loop: a remote client is awaited, a local scorer runs in a thread."""
        import asyncio

        plan = self._plan(prompts, completions, references)
        values: list[float | None] = []
        if plan.batch:
            if hasattr(self.scorer, "ascore"):

                async def score(*cols):
                    scores = await self.policy.await_(self.scorer.ascore(*cols, **self._wrapper()))
                    return self._check_values(scores, len(cols[0]))
            else:

                async def score(*cols):
                    return await self.policy.await_(asyncio.to_thread(self._score, *cols))

            values = await self._ascore_plan(plan, score)
        return self._finish(plan, values)

    async def acompute(
        self, prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Any]
    ) -> tuple[list[float | None], list[float | None]]:
        """`compute` without blocking the event loop."""
        outcome = await self.aevaluate(prompts, completions, references)
        return outcome.rewards, outcome.raw

    def _score_plan(self, plan: _Plan, score: Any) -> list[float | None]:
        """Scores of the plan's triples (see `_Attempts`)."""
        attempts = _Attempts(plan, self.policy.on_error)
        while attempts.pending:
            try:
                attempts.done(score(*attempts.columns()))
            except Exception as err:
                attempts.failed(err)
        return attempts.values

    async def _ascore_plan(self, plan: _Plan, score: Any) -> list[float | None]:
        attempts = _Attempts(plan, self.policy.on_error)
        while attempts.pending:
            try:
                attempts.done(await score(*attempts.columns()))
            except Exception as err:
                attempts.failed(err)
        return attempts.values

    def _plan(self, prompts: Sequence[Text], completions: Sequence[Text], references: Sequence[Any]) -> _Plan:
        plan = _Plan(prompts, references, len(completions), self.reference_column)
        texts: list[str | None] = []
        for i, completion in enumerate(completions):
            try:
                text = completion_text(completion, i)
                flatten(prompts[i], f"prompts[{i}]")  # read once here, so a bad prompt fails its own row
                check_texts(references[i], f"{self.reference_column}[{i}]")
            except ValueError as err:
                if self.policy.on_error == "raise":
                    raise
                plan.failures[i] = str(err)
                text = None
            texts.append(strip_think(text) if self.strip_think and text is not None else text)
        for i, value in enumerate(references):
            if texts[i] is None:
                continue
            refs, empty = ([], []) if _is_missing(value) else _as_reference_list(value)
            if not refs or empty:
                self._missing_reference(i, empty, flatten(prompts[i], f"prompts[{i}]"))
            if not refs:
                continue
            for ref in refs:
                plan.batch.append((prompts[i], ref, texts[i]))
                plan.owners.append(i)
        plan.num_triples = len(plan.batch)
        if self.baseline:
            # r(p, ref, ref), the reference scored against itself, is the best this prompt can get: the reward
            # becomes a gap. It shares the prefix of its candidates, so it rides in the same scoring call.
            seen: dict[tuple[str, str], int] = {}
            for (prompt, ref, _), i in zip(plan.batch[: plan.num_triples], plan.owners, strict=True):
                key = (flatten(prompt, f"prompts[{i}]"), flatten(ref, f"{self.reference_column}[{i}]"))
                if key not in seen:
                    seen[key] = len(plan.batch)
                    plan.batch.append((prompt, ref, key[1]))
                plan.base_index.append(seen[key])
        return plan

    def _finish(self, plan: _Plan, values: list[float | None]) -> RewardOutcome:
        # A row fails with any of its triples (or its baseline): a partial mean would be a different reward.
        for t in range(plan.num_triples):
            failed = [j for j in (t, plan.base_index[t] if self.baseline else t) if values[j] is None]
            if failed and plan.owners[t] not in plan.failures:
                reason = plan.triple_failures.get(failed[0], "the scorer returned no score")
                plan.failures[plan.owners[t]] = reason
        self.policy.settle(plan.failures, plan.num_rows, "completions", "completions")
        keep = [t for t in range(plan.num_triples) if plan.owners[t] not in plan.failures]
        owners = [plan.owners[t] for t in keep]
        scores = [float(values[t]) for t in keep]
        combine = {"mean": statistics.fmean, "max": max, "min": min}[self.aggregate]
        raw = self._per_row(owners, scores, combine, plan.num_rows)
        if self.baseline:
            scores = [s - float(values[plan.base_index[t]]) for s, t in zip(scores, keep, strict=True)]
        rewards = self._normalise(plan.prompts, plan.references, self._per_row(owners, scores, combine, plan.num_rows))
        return RewardOutcome([None if r is None else self._squash(r) for r in rewards], raw, dict(plan.failures))

    @staticmethod
    def _per_row(owners: list[int], scores: list[float], combine: Any, n: int) -> list[float | None]:
        per_row: dict[int, list[float]] = {}
        for owner, score in zip(owners, scores, strict=True):
            per_row.setdefault(owner, []).append(score)
        return [combine(per_row[i]) if i in per_row else None for i in range(n)]

    def _missing_reference(self, i: int, empty: list[int], prompt: str) -> None:
        """A row without a reference, or with empty items in its list of references: an error with
        on_missing_reference="error"; otherwise the row gets no reward, or the empty items are left out (counted
        in ``empty_reference_items`` and logged)."""
        column = self.reference_column
        where = f"`{column}[{i}][{empty[0]}]`" if empty else f"`{column}[{i}]`"
        if self.on_missing_reference == "error":
            raise ValueError(
                f"{where} is empty: the row at index {i} (prompt: {prompt!r:.60}) lacks a reference. Fill it, drop "
                "it, or pass on_missing_reference='none' to leave it out."
            )
        if empty:
            self.empty_reference_items += len(empty)
            count = self.empty_reference_items
            if count & (count - 1) == 0 or count == len(empty):  # 1, 2, 4, ...: counted always, logged sparingly
                logger.warning("%d empty item(s) in lists of references so far (latest: %s); they are left out and "
                               "the row scored against the others.", count, where)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ steps
    def _score(self, prompts: list[Text], references: list[Text], candidates: list[str]) -> list[float]:
        return self._check_values(
            self.scorer.score(prompts, references, candidates, **self._wrapper()), len(candidates)
        )

    def _wrapper(self) -> dict[str, str]:
        # A Scorer's `wrapper` is optional: an object whose score() takes three lists scores the default "sft".
        return {} if self.wrapper == "sft" else {"wrapper": self.wrapper}

    @staticmethod
    def _check_values(values: Any, expected: int) -> list[float | None]:
        if values is None or len(values) != expected:
            got = "None" if values is None else f"{len(values)} values"
            raise RuntimeError(f"The scorer returned {got} for {expected} items; it must return one per item.")
        # None: an item the scorer itself gave up on (a client with on_error="none"); the row then fails.
        return [None if v is None else float(v) for v in values]

    def _normalise(self, prompts: Sequence[Text], references: Sequence[Any], rewards: list[float | None]):
        if self.normalize is None:
            return rewards
        if self.normalize == "batch":
            groups = {None: [i for i, r in enumerate(rewards) if r is not None]}
        else:
            groups = {}
            for i, r in enumerate(rewards):
                if r is not None:
                    groups.setdefault((flatten(prompts[i], "prompt"), repr(references[i])), []).append(i)
        out = list(rewards)
        for members in groups.values():
            values = [rewards[i] for i in members]
            mean = statistics.fmean(values)
            std = statistics.pstdev(values) if len(values) > 1 else 0.0
            for i in members:
                out[i] = (rewards[i] - mean) / (std + self.eps)
        return out

    def _squash(self, reward: float) -> float:
        if self.clip is not None:
            reward = min(max(reward, self.clip[0]), self.clip[1])
        if self.sigmoid_scale is not None:
            reward = 1.0 / (1.0 + math.exp(-reward / self.sigmoid_scale))
        return reward

    def _log(
        self, log_metric: Any, raw_rows: list[float | None], missing: float, failed: float, seconds: float
    ) -> None:
        # TRL gathers the union of metric names over ranks, so a rank without scores may skip the statistics.
        prefix = self.__name__
        raw = [r for r in raw_rows if r is not None]
        log_metric(f"{prefix}/missing_reference_frac", missing)
        log_metric(f"{prefix}/failed_frac", failed)
        if raw:
            log_metric(f"{prefix}/raw_mean", statistics.fmean(raw))
            log_metric(f"{prefix}/raw_std", statistics.pstdev(raw))
            log_metric(f"{prefix}/raw_min", min(raw))
            log_metric(f"{prefix}/raw_max", max(raw))
        log_metric(f"{prefix}/seconds", seconds)

    def __repr__(self) -> str:
        source = self._source if isinstance(self._source, (str, os.PathLike)) else type(self._source).__name__
        return (
            f"PolarReward({source!r}, reference_column={self.reference_column!r}, normalize={self.normalize!r}, "
            f"baseline={self.baseline}, clip={self.clip}, sigmoid_scale={self.sigmoid_scale})"
        )


def _warn_if_no_accelerator(source: Any) -> None:
    """Warn once per process when a model given by path would be scored on CPU: TRL's async GRPO runs reward
    functions in rollout workers that often have no accelerator, where scoring is silently slow."""
    global _warned_cpu
    import torch

    if _warned_cpu:
        return
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if torch.cuda.is_available() or torch.backends.mps.is_available() or has_xpu:
        return
    _warned_cpu = True
    warnings.warn(
        f"PolarReward({str(source)!r}) will score on CPU: this process has no accelerator (TRL's async GRPO runs "
        "reward functions in such workers). Serve the model on a GPU machine with `trl-polar serve --model "
        f"{source}` and pass PolarReward(url='http://HOST:8000'), or pass device='cpu' to silence this.",
        UserWarning,
        stacklevel=3,
    )


def _check_options(aggregate: str, normalize: Any, on_missing: str, reference_column: Any, sigmoid_scale: Any) -> None:
    if aggregate not in AGGREGATES:
        raise ValueError(f"`aggregate` must be one of {AGGREGATES}, got {aggregate!r}.")
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"`normalize` must be one of {NORMALIZATIONS}, got {normalize!r}: 'group' z-scores the completions "
            "of one prompt, 'batch' z-scores the whole call, None keeps raw POLAR scores."
        )
    if on_missing not in ON_MISSING:
        raise ValueError(f"`on_missing_reference` must be one of {ON_MISSING}, got {on_missing!r}.")
    if not isinstance(reference_column, str) or not reference_column:
        raise ValueError(f"`reference_column` must be a column name, got {reference_column!r}.")
    if sigmoid_scale is not None and not sigmoid_scale > 0:
        raise ValueError(f"`sigmoid_scale` must be positive, got {sigmoid_scale!r}.")


def _clip_range(clip: Any) -> tuple[float, float] | None:
    if clip is None:
        return None
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if clip <= 0:
            raise ValueError(f"`clip` as one number must be positive (it means (-clip, clip)), got {clip!r}.")
        return (-float(clip), float(clip))
    if isinstance(clip, Sequence) and len(clip) == 2 and clip[0] < clip[1]:
        return (float(clip[0]), float(clip[1]))
    raise ValueError(f"`clip` must be a positive number or a (low, high) pair with low < high, got {clip!r}.")


class AsyncPolarReward(PolarReward):
    """`PolarReward` with an ``async def __call__``: TRL 1.16 runs async reward functions concurrently with the
    others and with its own work, which is what a remote reward server (``url=``/``urls=``) needs to pay off."""

    async def __call__(  # type: ignore[override]
        self,
        prompts: Sequence[Text],
        completions: Sequence[Text],
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
        log_metric: Any = None,
        **columns: Any,
    ) -> list[float | None]:
        started = time.perf_counter()
        references = self._check_call(prompts, completions, columns)
        outcome = await self.aevaluate(prompts, completions, references)
        self._report(log_metric, outcome, started)
        return outcome.rewards
