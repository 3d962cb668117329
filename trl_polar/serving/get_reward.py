"""OpenRLHF's remote reward wire (``/get_reward``): reading its ``(query, prompts, labels)`` into POLAR's (prompt,
reference, response) and answering ``{"rewards", "scores", "extra_logs"}``, failed rollouts included.

The server's ``/get_reward`` and the OpenRLHF reward file (`trl_polar.integrations.openrlhf`) both read and answer
with these functions, so a rollout gets the same reward, or the same fallback, either way. OpenRLHF (0.11) has no
"missing reward" state: a rollout answered without one stops its experience maker
(``reward_model_group is required when rewards are not precomputed`` or ``'NoneType' object has no attribute
'size'``), so a rollout that cannot be read or scored gets a finite reward, ``TRL_POLAR_FAILURE_REWARD``
(`DEFAULT_FAILURE_REWARD`), and ``polar_failed=1`` in ``extra_logs``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..rewards import STRIP_THINK_DEFAULT, strip_think
from ..template import Text, flatten

FAILURE_REWARD_ENV = "TRL_POLAR_FAILURE_REWARD"
# The bottom of OpenRLHF's default --reward.clip_range (-10, 10), where it clips the worst answers too: after
# clipping a failed rollout never outranks a scored one.
DEFAULT_FAILURE_REWARD = -10.0


def to_python(value: Any) -> Any:
    """Numpy arrays and scalars (how parquet columns arrive) as plain lists, dicts and numbers.

    >>> import numpy as np
    >>> to_python({"a": np.array([1, 2]), "b": (np.float32(0.5),)})
    {'a': [1, 2], 'b': [0.5]}
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_python(value.tolist())
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


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


def failure_reward(environ: Mapping[str, str] | None = None) -> float:
    """The reward a failed rollout gets: ``TRL_POLAR_FAILURE_REWARD``, or `DEFAULT_FAILURE_REWARD`.

    >>> failure_reward({})
    -10.0
    >>> failure_reward({"TRL_POLAR_FAILURE_REWARD": "0"})
    0.0
    """
    value = (os.environ if environ is None else environ).get(FAILURE_REWARD_ENV)
    if value is None or not value.strip():
        return DEFAULT_FAILURE_REWARD
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{FAILURE_REWARD_ENV} must be a finite number (a failed rollout's reward), got {value!r}.")
    return number


def answer(
    samples: Extracted, scored: dict[int, float], failures: dict[int, str], fallback: float | None = None
) -> dict[str, Any]:
    """OpenRLHF's answer for the samples: ``rewards``/``scores`` (a failed sample gets ``fallback``, by default
    `failure_reward`: OpenRLHF has no "no reward" state and stops on a missing one), ``extra_logs["polar_failed"]``
    (1 per failed sample, averaged into OpenRLHF's logs) and ``errors`` (index, field, message) for the failed ones.

    >>> answer(read_samples(["Q: hi A: yo"], ["Q: hi A:"], [""]), {}, {0: "labels[0] is empty"}, fallback=-10.0)
    {'rewards': [-10.0], 'scores': [-10.0], 'extra_logs': {'polar_failed': [1.0]}, 'errors': [...]}
    """
    fallback = failure_reward() if fallback is None else fallback
    n = len(samples.responses)
    rewards = [fallback if i in failures else scored[i] for i in range(n)]
    failed = [1.0 if i in failures else 0.0 for i in range(n)]
    errors = [
        {"index": i, "field": samples.failures.get(i, (f"query[{i}]", ""))[0], "message": failures[i]}
        for i in sorted(failures)
    ]
    return {"rewards": rewards, "scores": list(rewards), "extra_logs": {"polar_failed": failed}, "errors": errors}


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
