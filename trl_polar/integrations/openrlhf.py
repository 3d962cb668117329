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

Failures (`trl_polar.failures`): OpenRLHF's executor turns an exception into "no reward" and logs it at INFO
level only, so ``TRL_POLAR_ON_ERROR`` defaults to "none" here: a failed rollout gets ``rewards=None`` (OpenRLHF's
own "no reward"), ``extra_logs["polar_failed"]=1`` (averaged into OpenRLHF's logs) and a warning with the cause.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from trl_polar.failures import describe
from trl_polar.integrations import get_reward, load_config, policy, to_python
from trl_polar.rewards import STRIP_THINK_DEFAULT, strip_think
from trl_polar.template import Text, flatten

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_coalescers: dict[tuple, Any] = {}

# End-of-turn markers that stay in a query decoded with special tokens kept; TRL_POLAR_STOP_STRINGS overrides them.
DEFAULT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>", "<eos>")


class OpenRLHFInputError(ValueError):
    """A sample that cannot be scored; ``field`` names it as OpenRLHF's request does (``labels[3]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def stop_strings() -> tuple[str, ...]:
    """The end-of-turn markers cut off a response: ``TRL_POLAR_STOP_STRINGS`` (comma-separated), or the defaults."""
    value = os.environ.get("TRL_POLAR_STOP_STRINGS")
    if value is None:
        return DEFAULT_STOP_STRINGS
    return tuple(s for s in value.split(",") if s)


def _strip_stops(response: str, stops: Sequence[str]) -> str:
    changed = True
    while changed:
        changed = False
        response = response.rstrip()
        for stop in stops:
            if response.endswith(stop):
                response = response[: -len(stop)]
                changed = True
    return response.strip()


def _kept_tail_end(query: str, prompt: str, slack: int = 8) -> int | None:
    """Where the prompt ends in a query that kept only the prompt's last tokens: the largest ``e`` such that
    ``query[s:e]`` is a suffix of the prompt for some ``s <= slack`` (a start token, or a character the cut split),
    at least ``_MIN_TAIL`` characters long (or the whole prompt). None if there is none."""
    anchor = prompt[-min(len(prompt), _MIN_TAIL) :]
    best = None
    at = query.find(anchor)
    while at >= 0:
        end = at + len(anchor)
        if any(prompt.endswith(query[s:end]) for s in range(min(slack, at) + 1)):
            best = end
        at = query.find(anchor, at + 1)
    return best


_MIN_TAIL = 16


def response_from_query(query: str, prompt: str, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """The response inside ``query = [BOS] prompt + response [EOS/pads]``.

    When OpenRLHF cut a long prompt from the front, the query holds only the prompt's tail: the response is what
    follows that tail. Raises ValueError when the query holds neither the prompt nor a tail of it.

    >>> response_from_query("<s>Q: hi\\nA: hello</s></s>", "Q: hi\\nA:")
    'hello'
    >>> response_from_query("a long question? Answer: 42</s>", "A long start, then a long question? Answer:")
    '42'
    """
    at = query.find(prompt) if prompt else 0
    if at >= 0:
        return _strip_stops(query[at + len(prompt) :], stop_strings)
    end = _kept_tail_end(query, prompt)
    if end is None:
        raise ValueError(
            f"the query does not hold its prompt, nor the prompt's last {_MIN_TAIL}+ characters (query starts "
            f"{query[:60]!r}, prompt ends {prompt[-60:]!r}): pass the prompts as OpenRLHF sends them"
        )
    return _strip_stops(query[end:], stop_strings)


def _label(label: Any, index: int) -> tuple[Any, Any]:
    """(reference, prompt override or None) from one label."""
    label = to_python(label)
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            label = json.loads(label)
        except json.JSONDecodeError:
            return label, None
    if isinstance(label, dict):
        if label.get("reference") is None:
            raise ValueError(
                f"labels[{index}] is an object without a 'reference' key ({sorted(label)}). Write the reference "
                "answer under 'reference' (and optionally the plain prompt under 'prompt')."
            )
        return label["reference"], label.get("prompt")
    return label, None


class Extracted:
    """OpenRLHF samples read for POLAR: per sample the prompt, reference and response, or why it cannot be scored
    (``failures``: index -> (field, reason))."""

    # A plain class, not a dataclass: OpenRLHF executes this file without registering it in sys.modules, where
    # dataclasses look their module up.
    def __init__(self) -> None:
        self.prompts: list[Text | None] = []
        self.references: list[Text | None] = []
        self.responses: list[str | None] = []
        self.failures: dict[int, tuple[str, str]] = {}

    @property
    def ok(self) -> list[int]:
        return [i for i in range(len(self.responses)) if i not in self.failures]


def read_samples(
    queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], strip: bool = STRIP_THINK_DEFAULT
) -> Extracted:
    """(POLAR prompt, reference, response) of each of OpenRLHF's ``(queries, prompts, labels)``: the one reading of
    the reward file and the server's ``/get_reward``.

    The label is the reference, or ``{"reference", "prompt"}`` whose prompt replaces the chat-templated one; the
    response is the query after its prompt (or after the prompt's kept tail, when the prompt was cut from the
    front), end-of-turn markers removed, ``<think>`` blocks removed when ``strip`` (the library's default). A sample
    that cannot be read is recorded in ``failures``; mismatched list lengths raise `OpenRLHFInputError`.
    """
    if not len(queries) == len(prompts) == len(labels):
        raise OpenRLHFInputError(
            "labels",
            f"OpenRLHF passed {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; they must "
            "match one to one.",
        )
    stops = stop_strings()
    out = Extracted()
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        polar_prompt = reference = response = None
        try:
            where = f"labels[{i}]"
            reference, prompt_override = _label(label, i)
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                raise ValueError(
                    f"labels[{i}] is empty. POLAR needs the reference answer as the label: pass --data.label_key "
                    "(older releases: --label_key) naming the dataset column that holds it."
                )
            flatten(reference, f"labels[{i}]")
            if prompt_override is not None:
                flatten(prompt_override, f"labels[{i}].prompt")
            where = f"query[{i}]"
            response = response_from_query(query, prompt, stops)
            if strip:
                response = strip_think(response)
            polar_prompt = prompt_override if prompt_override is not None else prompt
        except ValueError as err:
            reason = str(err) if str(err).startswith(where) else f"{where}: {err}"
            out.failures[i] = (where, reason)
            polar_prompt = reference = response = None
        out.prompts.append(polar_prompt)
        out.references.append(reference)
        out.responses.append(response)
    return out


def extract_items(
    queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], strip: bool = STRIP_THINK_DEFAULT
) -> tuple[list[Text], list[Text], list[str]]:
    """`read_samples` for callers that stop at the first bad sample: raises `OpenRLHFInputError` naming it."""
    samples = read_samples(queries, prompts, labels, strip)
    if samples.failures:
        first = min(samples.failures)
        raise OpenRLHFInputError(*samples.failures[first])
    return samples.prompts, samples.references, samples.responses


def answer(samples: Extracted, scored: dict[int, float], failures: dict[int, str]) -> dict[str, Any]:
    """OpenRLHF's answer for the samples: ``rewards``/``scores`` (None where a sample failed; None as a whole when
    every sample failed, OpenRLHF's own "no reward" for its one-rollout calls), ``extra_logs["polar_failed"]`` (1 per
    failed sample) and ``errors`` (index, field, message) for the failed ones."""
    n = len(samples.responses)
    rewards = [scored.get(i) for i in range(n)]
    failed = [1.0 if i in failures else 0.0 for i in range(n)]
    errors = [
        {"index": i, "field": samples.failures.get(i, (f"query[{i}]", ""))[0], "message": failures[i]}
        for i in sorted(failures)
    ]
    values = None if n and all(r is None for r in rewards) else rewards
    return {"rewards": values, "scores": values, "extra_logs": {"polar_failed": failed}, "errors": errors}


def score_samples(samples: Extracted, score: Any) -> tuple[dict[int, float], dict[int, str]]:
    """Score the readable samples with ``score(prompts, references, responses)`` -> per-item float or None (with the
    reason); returns ({index: reward}, {index: reason of failure})."""
    failures = {i: reason for i, (_, reason) in samples.failures.items()}
    ok = samples.ok
    values = score(
        [samples.prompts[i] for i in ok], [samples.references[i] for i in ok], [samples.responses[i] for i in ok]
    )
    scored = {}
    for i, (value, reason) in zip(ok, values, strict=True):
        if value is None:
            failures[i] = reason or "no score"
        else:
            scored[i] = float(value)
    return scored, failures


def _coalescer(config: dict[str, Any]) -> Any:
    from trl_polar.integrations.coalesce import Coalescer

    key = tuple(sorted((k, str(v)) for k, v in config.items()))
    with _lock:
        if key not in _coalescers:
            reward = get_reward(config={**config, "strip_think": False}, on_error="none")
            _coalescers[key] = Coalescer(reward, config["batch_window_ms"] / 1000)
        return _coalescers[key]


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """POLAR rewards in OpenRLHF's format: ``{"rewards": tensor, "scores": tensor, "extra_logs": {...}}``.

    ``rewards`` feed the advantage; ``scores`` (used by OpenRLHF's dynamic filtering) carry the same values;
    ``extra_logs["polar_failed"]`` counts the samples without a reward (see the module docs for failures).
    """
    config = load_config()
    rule = policy(config, default_on_error="none")
    queries, prompts = to_python(queries), to_python(prompts)
    labels = to_python(labels) if labels is not None else [None] * len(queries)
    # Think blocks are stripped here, in the shared reading, so the reward model sees what /get_reward scores.
    samples = read_samples(queries, prompts, labels, strip=config["strip_think"])
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
        logger.warning("POLAR reward failed for %d rollout(s): %s", len(failures), failures[min(failures)])
    rule.settle(failures, len(queries), "rollouts", "query", {i: f for i, (f, _) in samples.failures.items()})
    result = answer(samples, scored, failures)
    del result["errors"]  # the messages are in the warning just logged
    if result["rewards"] is not None and not failures:
        result["rewards"] = torch.tensor(result["rewards"], dtype=torch.float32)
        result["scores"] = result["rewards"].clone()
    result["extra_logs"] = {"polar_failed": torch.tensor(result["extra_logs"]["polar_failed"], dtype=torch.float32)}
    return result
