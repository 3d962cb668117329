"""RewardBench 2 (allenai/reward-bench-2): best-of-4 rows, and the Ties subset's rows with several correct answers.

A record holds ``id``, ``prompt`` (text), ``chosen`` and ``rejected`` (lists of answers), ``num_correct`` (how many
answers are correct: the length of ``chosen``) and ``subset`` (Factuality, Precise IF, Math, Safety, Focus, Ties).
Each record becomes one best-of-N row whose candidates are the chosen answers, then the rejected ones. RewardBench 2
has no reference answers, so the reference comes from a references file (see `references`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..io import Record
from .base import Conversion
from .references import reference_lookup


def _answers(value: object) -> list[str] | None:
    if isinstance(value, list) and value and all(isinstance(a, str) and a.strip() for a in value):
        return list(value)
    return None


def convert_rewardbench2(records: Iterable[Record], conversion: Conversion) -> None:
    lookup = reference_lookup(conversion, "RewardBench 2")
    counts = conversion.counts
    for record in records:
        if not conversion.require(record, "prompt", "chosen", "rejected", "subset"):
            continue
        value, location = record.value, record.location
        chosen, rejected = _answers(value["chosen"]), _answers(value["rejected"])
        if chosen is None or rejected is None:
            conversion.invalid(
                location, "'chosen' and 'rejected' must be non-empty lists of non-empty answers.", "bad_field"
            )
            continue
        if value.get("num_correct", len(chosen)) != len(chosen):
            conversion.invalid(
                location,
                f"num_correct={value['num_correct']!r} but 'chosen' holds {len(chosen)} answers; they must agree.",
                "bad_field",
            )
            continue
        subset = str(value["subset"])
        if subset.lower() == "ties" and len(str(value.get("id", "")).split(":")) != 2:
            # The Ties rule pairs each prompt's "ref" record with its "tied" record through the id.
            conversion.invalid(
                location, f"a Ties record needs an id 'ref:N' or 'tied:N', got {value.get('id')!r}.", "bad_field"
            )
            continue
        if not conversion.text(location, "'prompt'", value["prompt"]):
            continue
        reference = lookup(record, value["prompt"])
        if reference is None:
            continue
        conversion.result.rows.append(
            {
                "prompt": value["prompt"],
                "reference": reference,
                "candidates": chosen + rejected,
                "num_correct": len(chosen),
                "category": subset,
                "id": str(value.get("id", location)),
            }
        )
        counts["bon_rows"] += 1
