"""JudgeBench (ScalerLab/JudgeBench): response pairs with an objective label, "A>B" or "B>A".

A record holds ``pair_id``, ``original_id``, ``source`` (e.g. "mmlu-pro-law", "livebench-reasoning",
"livebench-math", "livecodebench"), ``question``, ``response_model``, ``response_A``, ``response_B`` and ``label``.
Each record becomes one pairwise row (the correct response is chosen). The files hold no gold answers, so the
reference comes from a references file.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..io import Record
from .base import Conversion
from .references import reference_lookup

LABELS = {"A>B": ("response_A", "response_B"), "B>A": ("response_B", "response_A")}


def convert_judgebench(records: Iterable[Record], conversion: Conversion) -> None:
    lookup = reference_lookup(conversion, "JudgeBench")
    for record in records:
        if not conversion.require(record, "question", "response_A", "response_B", "label"):
            continue
        value, location = record.value, record.location
        label = value["label"]
        if label not in LABELS:
            conversion.invalid(location, f"label must be one of {sorted(LABELS)}, got {label!r}.", "bad_label")
            continue
        winner, loser = (value[k] for k in LABELS[label])
        texts = [("'question'", value["question"]), ("'response_A'", winner), ("'response_B'", loser)]
        if not all(conversion.text(location, name, text) for name, text in texts):
            continue
        reference = lookup(record, value["question"])
        if reference is None:
            continue
        conversion.result.rows.append(
            {
                "prompt": value["question"],
                "reference": reference,
                "chosen": winner,
                "rejected": loser,
                "category": str(value.get("source", "unknown")),
                "id": str(value.get("pair_id", location)),
            }
        )
        conversion.counts["triples"] += 1
