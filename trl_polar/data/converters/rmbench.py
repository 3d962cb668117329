"""RM-Bench (THU-KEG/RM-Bench): three chosen and three rejected answers per prompt, in three styles each.

A record holds ``id``, ``prompt``, ``chosen`` and ``rejected`` (three answers each, in the order concise, detailed
plain text, detailed markdown) and ``domain`` (chat, code, math, safety-refuse, safety-response; the per-domain
files ``<domain>_filtered.json`` have no ``domain`` field, so it is read from the file name). Every record becomes
one row whose ``candidates`` are the three chosen answers then the three rejected ones (``num_correct`` = 3): its
six answers are scored once, and the 3 x 3 style matrix compares chosen style i with rejected style j ("hard" when
i < j: the correct answer is plainer than the wrong one; "normal" when i = j; "easy" when i > j). RM-Bench has no
reference answers (its chosen answers are the labels), so the reference comes from a references file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..io import Record
from .base import Conversion
from .references import reference_lookup

STYLES = ("concise", "detailed_plain", "detailed_markdown")
DOMAINS = ("chat", "code", "math", "safety-refuse", "safety-response")
_FILE_DOMAIN = re.compile(r"(?:^|[/\\])(" + "|".join(DOMAINS) + r")_filtered\.json(?::\d+)?$")


def convert_rmbench(records: Iterable[Record], conversion: Conversion) -> None:
    lookup = reference_lookup(conversion, "RM-Bench")
    seen: dict[tuple[str, str], str] = {}
    for record in records:
        if not conversion.require(record, "prompt", "chosen", "rejected"):
            continue
        value, location = record.value, record.location
        answers = [value["chosen"], value["rejected"]]
        if not all(
            isinstance(a, list) and len(a) == len(STYLES) and all(isinstance(t, str) for t in a) for a in answers
        ):
            conversion.invalid(
                location,
                f"'chosen' and 'rejected' must each list {len(STYLES)} answers ({', '.join(STYLES)}).",
                "bad_field",
            )
            continue
        match = _FILE_DOMAIN.search(location)
        domain = value.get("domain") or (match.group(1) if match else None)
        if domain not in DOMAINS:
            conversion.invalid(
                location,
                f"no RM-Bench domain: the record's 'domain' is {value.get('domain')!r} and the file name is not "
                f"<domain>_filtered.json; the domain must be one of {DOMAINS}.",
                "bad_field",
            )
            continue
        key = (domain, str(value.get("id", location)))
        if key in seen:
            # Ids repeat across domains (chat 8 and code 8), not within one: a repeat is the same sample twice,
            # e.g. total_dataset.json and a per-domain file passed together.
            conversion.invalid(location, f"{domain} id {key[1]} already came at {seen[key]}.", "duplicate_id")
            continue
        seen[key] = location
        if not conversion.text(location, "'prompt'", value["prompt"]):
            continue
        reference = lookup(record, value["prompt"])
        if reference is None:
            continue
        conversion.result.rows.append(
            {
                "prompt": value["prompt"],
                "reference": reference,
                "candidates": list(value["chosen"]) + list(value["rejected"]),
                "num_correct": len(STYLES),
                "category": domain,
                "id": key[1],
            }
        )
        conversion.counts["rows"] += 1
