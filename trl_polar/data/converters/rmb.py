"""RMB's pairwise and best-of-N files: the reference is each prompt's top-ranked answer, as the paper evaluates."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from ...template import flatten
from ..io import Record
from .base import Conversion, number


def _rmb_prompt(record: Record, conversion: Conversion) -> list[dict[str, str]] | None:
    messages = record.value.get("conversation_input")
    if not isinstance(messages, list) or not messages:
        conversion.invalid(record.location, "'conversation_input' must be a non-empty message list.", "bad_field")
        return None
    try:
        flatten(messages, "conversation_input")
    except ValueError as e:
        conversion.invalid(record.location, str(e), "bad_field")
        return None
    # RMB messages also carry a 'language' key; keep what the chat format defines.
    return [{"role": m.get("role", "user"), "content": m["content"]} for m in messages]


def _answer(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("answer"), str) and value["answer"].strip():
        return value["answer"]
    return None


def _top(answers: dict[str, float | None], losers: set[str], location: str, conversion: Conversion) -> str | None:
    """The top-ranked answer of one prompt: never beaten in any comparison; the highest score among such."""
    champions = [a for a in answers if a not in losers]
    if len(champions) > 1 and all(answers[a] is not None for a in champions):
        best = max(answers[a] for a in champions)
        champions = [a for a in champions if answers[a] == best]
    if len(champions) == 1:
        return champions[0]
    if not champions:
        conversion.invalid(
            location,
            "every answer of this prompt loses some comparison (the preferences form a cycle), so "
            "there is no top-ranked answer to use as reference.",
            "no_top_answer",
        )
        return None
    conversion.tie(
        location,
        f"{len(champions)} answers are never beaten and tie on score, so the reference is ambiguous.",
        "skipped_tie_at_top",
    )
    return None


def convert_rmb_pairwise(records: Iterable[Record], conversion: Conversion) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if not conversion.require(record, "conversation_input", "chosen", "reject"):
            continue
        prompt = _rmb_prompt(record, conversion)
        chosen, rejected = _answer(record.value["chosen"]), _answer(record.value["reject"])
        if prompt is None:
            continue
        if chosen is None or rejected is None:
            conversion.invalid(
                record.location, "'chosen' and 'reject' must be objects with a non-empty 'answer' string.", "bad_field"
            )
            continue
        group = groups.setdefault(
            json.dumps(prompt),
            {"prompt": prompt, "answers": {}, "losers": set(), "pairs": [], "location": record.location},
        )
        for side, text in (("chosen", chosen), ("reject", rejected)):
            score = number(record.value[side].get("score"))
            group["answers"].setdefault(text, score)
        if chosen == rejected:
            conversion.counts["pairs_identical_answers_skipped"] += 1
            continue
        group["losers"].add(rejected)
        group["pairs"].append((record, chosen, rejected))
    for group in groups.values():
        reference = _top(group["answers"], group["losers"], group["location"], conversion)
        if reference is None:
            conversion.counts["pairs_of_skipped_prompts"] += len(group["pairs"])
            continue
        made = 0
        for record, chosen, rejected in group["pairs"]:
            if reference in (chosen, rejected):
                # With the top answer as reference, a pair that contains it cannot be judged (paper: 2nd vs 3rd).
                conversion.counts["pairs_containing_reference"] += 1
                continue
            conversion.result.rows.append(
                {
                    "prompt": group["prompt"],
                    "reference": reference,
                    "chosen": chosen,
                    "rejected": rejected,
                    **_rmb_extra(record, "pair_uid"),
                }
            )
            made += 1
        conversion.counts["triples"] += made
        if not made:
            conversion.counts["prompts_without_triples"] += 1


def _rmb_extra(record: Record, id_key: str) -> dict[str, Any]:
    extra = {}
    if id_key in record.value:
        extra["id"] = str(record.value[id_key])
    if "category_path" in record.value:
        extra["category"] = record.value["category_path"]
    return extra


def convert_rmb_bon(records: Iterable[Record], conversion: Conversion) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if not conversion.require(record, "conversation_input", "bon_best", "loser_list"):
            continue
        prompt = _rmb_prompt(record, conversion)
        best, raw_losers = _answer(record.value["bon_best"]), record.value["loser_list"]
        if prompt is None:
            continue
        losers = [_answer(x) for x in raw_losers] if isinstance(raw_losers, list) else None
        if best is None or not losers or any(x is None for x in losers):
            conversion.invalid(
                record.location,
                "'bon_best' must be an object with a non-empty 'answer' string and 'loser_list' a "
                "non-empty list of such objects.",
                "bad_field",
            )
            continue
        group = groups.setdefault(
            json.dumps(prompt),
            {"prompt": prompt, "answers": {}, "losers": set(), "records": [], "location": record.location},
        )
        for text in [best, *losers]:
            group["answers"].setdefault(text, None)
        group["losers"].update(x for x in losers if x != best)
        group["records"].append((record, best, [x for x in losers if x != best]))
    for group in groups.values():
        reference = _top(group["answers"], group["losers"], group["location"], conversion)
        if reference is None:
            conversion.counts["records_of_skipped_prompts"] += len(group["records"])
            continue
        for record, best, losers in group["records"]:
            if best == reference:
                # The reference itself is this record's winner: nothing left to judge against it.
                conversion.counts["records_best_is_reference"] += 1
                continue
            # Only the first candidate's place is meaningful: it beat each of the others, which are not ordered.
            conversion.result.rows.append(
                {
                    "prompt": group["prompt"],
                    "reference": reference,
                    "candidates": [best, *losers],
                    **_rmb_extra(record, "bon_uid"),
                }
            )
            conversion.counts["bon_rows"] += 1
