"""HelpSteer3-Preference (nvidia/HelpSteer3, the "preference" configuration): two responses and a preference.

A record holds ``domain`` (general, stem, code, multilingual), ``language``, ``context`` (the conversation so far,
a message list ending with a user turn), ``response1``, ``response2`` and ``overall_preference``, an integer from
-3 (response 1 is much better) to 3 (response 2 is much better); 0 means they are about the same. Each record with a
preference becomes one pairwise row, with ``margin`` = |overall_preference|; records at 0 are skipped and counted
(``ties_skipped``). There are no gold answers, so the reference comes from a references file.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..io import Record
from .base import Conversion
from .references import reference_lookup


def convert_helpsteer3(records: Iterable[Record], conversion: Conversion) -> None:
    lookup = reference_lookup(conversion, "HelpSteer3")
    for record in records:
        if not conversion.require(record, "context", "response1", "response2", "overall_preference"):
            continue
        value, location = record.value, record.location
        preference = value["overall_preference"]
        if isinstance(preference, bool) or preference not in range(-3, 4):
            conversion.invalid(
                location, f"overall_preference must be an integer from -3 to 3, got {preference!r}.", "bad_field"
            )
            continue
        texts = [
            ("'context'", value["context"]),
            ("'response1'", value["response1"]),
            ("'response2'", value["response2"]),
        ]
        if not all(conversion.text(location, name, text) for name, text in texts):
            continue
        if preference == 0:
            conversion.counts["ties_skipped"] += 1
            continue
        reference = lookup(record, value["context"])
        if reference is None:
            continue
        chosen, rejected = (value["response1"], value["response2"])[:: 1 if preference < 0 else -1]
        conversion.result.rows.append(
            {
                "prompt": value["context"],
                "reference": reference,
                "chosen": chosen,
                "rejected": rejected,
                "margin": abs(int(preference)),
                "category": str(value.get("domain", "unknown")),
                "language": value.get("language"),
            }
        )
        conversion.counts["triples"] += 1
