"""POLAR rewards for OpenRLHF's custom reward function hook.

OpenRLHF PPO::

    --reward.remote_url $(python -c "import trl_polar.integrations.openrlhf as m; print(m.__file__)") \
    --data.label_key reference        # older releases: --remote_rm_url ... --label_key reference

with ``TRL_POLAR_MODEL=/path/to/polar-rm`` in the environment. OpenRLHF loads this file by path and calls
``reward_func(queries, prompts, labels)`` where ``queries`` are prompt + response decoded with special tokens kept,
``prompts`` the (chat-templated) prompts and ``labels`` the label column.

A label is the reference text, or a JSON object ``{"reference": ..., "prompt": ...}``: its ``prompt`` (plain text or
messages) then replaces the chat-templated prompt in the POLAR input, which is what the checkpoints were trained on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from trl_polar.integrations import get_reward, to_python
from trl_polar.template import Text, flatten

logger = logging.getLogger(__name__)

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


def response_from_query(query: str, prompt: str, stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """The response inside ``query = [BOS] prompt + response [EOS/pads]``.

    >>> response_from_query("<s>Q: hi\\nA: hello</s></s>", "Q: hi\\nA:")
    'hello'
    """
    at = query.find(prompt) if prompt else 0
    if at >= 0:
        response = query[at + len(prompt) :]
    else:
        # The prompt did not survive the decode/encode round trip verbatim: cut at the longest common prefix.
        common = os.path.commonprefix([query, prompt])
        logger.warning("Query does not contain its prompt verbatim; cutting after %d common characters.", len(common))
        response = query[len(common) :]
    changed = True
    while changed:
        changed = False
        response = response.rstrip()
        for stop in stop_strings:
            if response.endswith(stop):
                response = response[: -len(stop)]
                changed = True
    return response.strip()


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


def extract_items(
    queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]
) -> tuple[list[Text], list[Text], list[str]]:
    """(POLAR prompts, references, responses) of OpenRLHF's ``(queries, prompts, labels)``: the reward file and the
    server's ``/get_reward`` read samples here.

    The label is the reference, or ``{"reference", "prompt"}`` whose prompt replaces the chat-templated one; the
    response is the query after its prompt, end-of-turn markers removed. Raises `OpenRLHFInputError`.
    """
    if not len(queries) == len(prompts) == len(labels):
        raise OpenRLHFInputError(
            "labels",
            f"OpenRLHF passed {len(queries)} queries, {len(prompts)} prompts and {len(labels)} labels; they must "
            "match one to one.",
        )
    stops = stop_strings()
    polar_prompts, references, responses = [], [], []
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        try:
            reference, prompt_override = _label(label, i)
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                raise ValueError(
                    f"labels[{i}] is empty. POLAR needs the reference answer as the label: pass --data.label_key "
                    "(older releases: --label_key) naming the dataset column that holds it."
                )
            flatten(reference, f"labels[{i}]")
            if prompt_override is not None:
                flatten(prompt_override, f"labels[{i}].prompt")
        except ValueError as err:
            raise OpenRLHFInputError(f"labels[{i}]", str(err)) from None
        responses.append(response_from_query(query, prompt, stops))
        polar_prompts.append(prompt_override if prompt_override is not None else prompt)
        references.append(reference)
    return polar_prompts, references, responses


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs: Any) -> dict:
    """POLAR rewards in OpenRLHF's format: ``{"rewards": tensor, "scores": tensor, "extra_logs": {...}}``.

    ``rewards`` feed the advantage; ``scores`` (used by OpenRLHF's dynamic filtering) carry the same values.
    """
    queries, prompts = to_python(queries), to_python(prompts)
    labels = to_python(labels) if labels is not None else [None] * len(queries)
    polar_prompts, references, responses = extract_items(queries, prompts, labels)
    rewards, raw = get_reward().compute(polar_prompts, responses, references)
    values = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    raw_values = torch.tensor([float(r) for r in raw], dtype=torch.float32)
    return {"rewards": values, "scores": values.clone(), "extra_logs": {"polar_raw": raw_values}}
