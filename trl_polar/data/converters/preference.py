"""Preference pairs with a reference: HH-RLHF transcripts (RL prompts) and TRL preference rows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from ..io import DataError, Record
from .base import Conversion, text_key, text_ok

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as a message list.

    >>> parse_hh_dialogue("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {parts[0]!r:.60}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def convert_hh(records: Iterable[Record], conversion: Conversion) -> None:
    seen: set[tuple[str, str]] = set()
    for record in records:
        if not conversion.require(record, "chosen"):
            continue
        chosen = record.value["chosen"]
        if not isinstance(chosen, str):
            conversion.invalid(
                record.location, f"'chosen' must be an HH transcript string, got {type(chosen).__name__}.", "bad_field"
            )
            continue
        try:
            messages = parse_hh_dialogue(chosen)
        except ValueError as e:
            conversion.invalid(record.location, f"'chosen' is not an HH transcript ({e}).", "bad_field")
            continue
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            conversion.invalid(
                record.location, "'chosen' must end with a Human turn followed by an Assistant turn.", "bad_field"
            )
            continue
        reference = messages[-1]["content"].strip()
        if not reference:
            conversion.invalid(
                record.location,
                "the last Assistant turn of 'chosen' is empty: no reference to use.",
                "empty_reference",
            )
            continue
        prompt = messages[:-1]
        key = (json.dumps(prompt), reference)
        if key in seen:
            conversion.counts["duplicate_rows_removed"] += 1
            continue
        seen.add(key)
        conversion.result.rows.append({"prompt": prompt, "reference": reference})
        conversion.counts["rl_rows"] += 1


def _split_implicit(chosen: list, rejected: list) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def convert_trl(records: Iterable[Record], conversion: Conversion) -> None:
    column = conversion.options.reference_column
    checked_columns = False
    for record in records:
        value = record.value
        if not checked_columns:
            checked_columns = True
            if column not in value:
                # The whole dataset lacks the column: one clear error, not one per row.
                raise DataError(
                    f"{record.location}: no reference column {column!r} (the record has {sorted(value)}). POLAR "
                    "scores a candidate against a reference answer: add one (e.g. a strong model's answer) and name "
                    "it with reference_column= (--reference-column). Using 'chosen' as the reference would leak the "
                    "label."
                )
        if not conversion.require(record, "chosen", "rejected", column):
            continue
        chosen, rejected, reference = value["chosen"], value["rejected"], value[column]
        if not text_ok(reference):
            conversion.invalid(
                record.location, f"column {column!r} must be a non-empty string or message list.", "empty_reference"
            )
            continue
        if "prompt" in value and value["prompt"] is not None:
            prompt = value["prompt"]
            if not conversion.text(record.location, "'prompt'", prompt):
                continue
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
            if not prompt:
                conversion.invalid(
                    record.location, "implicit-prompt rows must share their first messages (the prompt).", "bad_field"
                )
                continue
        else:
            conversion.invalid(
                record.location,
                "rows without a 'prompt' column must be conversational (message lists) so "
                "the prompt can be split off; add an explicit 'prompt' column.",
                "missing_field",
            )
            continue
        if not text_ok(chosen) or not text_ok(rejected):
            conversion.invalid(record.location, "'chosen' and 'rejected' must be non-empty.", "empty_response")
            continue
        if text_key(chosen) == text_key(rejected):
            conversion.counts["pairs_identical_answers_skipped"] += 1
            continue
        row = {"prompt": prompt, "reference": reference, "chosen": chosen, "rejected": rejected}
        for name in ("margin", "id", "prompt_id"):
            if name in value:
                row[name] = value[name]
        conversion.result.rows.append(row)
        conversion.counts["triples"] += 1
