"""What every converter shares: the options, the result, and the `Conversion` that checks and counts records."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...template import flatten
from ..io import READABLE_SUFFIXES, DataError, Record, read_records

logger = logging.getLogger(__name__)

TIES = ("error", "skip")
PAIRS = ("all", "adjacent")


@dataclass
class ConversionResult:
    """Rows produced, listwise rows (ranked formats only) and counts of everything produced and skipped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    listwise: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


@dataclass
class ConvertOptions:
    """Settings shared by the converters."""

    skip_invalid: bool = field(
        default=False, metadata={"help": "Skip (and count) malformed records instead of stopping at the first one."}
    )
    ties: str = field(
        default="error",
        metadata={
            "help": "Equal ranks or scores: 'error' stops; 'skip' skips tied pairs, and records whose best response "
            "is tied (the reference would be ambiguous), counting both."
        },
    )
    pairs: str = field(
        default="all",
        metadata={"help": "Pairs among the non-reference responses: 'all' ordered pairs, or 'adjacent' ranks only."},
    )
    score_key: str = field(
        default="fine-grained_score",
        metadata={"help": "UltraFeedback: the completion field that ranks it (e.g. 'overall_score')."},
    )
    reference_column: str = field(default="reference", metadata={"help": "TRL format: the column of references."})
    references: str | None = field(
        default=None,
        metadata={
            "help": "Benchmark formats: a file of prompt/reference rows giving each prompt its reference answer "
            "(where the benchmark has no gold answer, or to replace it)."
        },
    )
    id_field: str | None = field(
        default=None, metadata={"help": "The field holding a record id (default: the format's own, e.g. pair_uid)."}
    )

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"`ties` must be one of {TIES}, got {self.ties!r}.")
        if self.pairs not in PAIRS:
            raise ValueError(f"`pairs` must be one of {PAIRS}, got {self.pairs!r}.")


class Conversion:
    """One conversion in progress: its options, its result (rows and counts) and the record ids seen so far.

    A converter reads `records` and appends to ``result.rows``; every record it cannot use goes through `invalid`
    (an error naming the record, or with ``skip_invalid`` a count by reason) or `tie`, so nothing is dropped
    silently.
    """

    def __init__(self, options: ConvertOptions, id_field: str | None = None) -> None:
        self.options = options
        self.result = ConversionResult()
        self.counts = self.result.counts
        self.id_field = options.id_field or id_field
        self.ids: dict[str, str] = {}

    def records(self, sources: Any) -> Iterable[Record]:
        """The records of a path (a directory: its readable files, recursively, in path order), a list of paths,
        or one in-memory dataset or list of records."""
        if (
            isinstance(sources, (str, bytes))
            or hasattr(sources, "__fspath__")
            or not isinstance(sources, Sequence)
            or (sources and isinstance(sources[0], Mapping))
        ):
            sources = [sources]
        seen: dict[str, str] = {}
        for source in (path for s in sources for path in _files(s)):
            for record in read_records(source, skip_invalid=self.options.skip_invalid, counts=self.counts):
                key = json.dumps(record.value, sort_keys=True, default=str)
                if key in seen:
                    # The same record twice would weigh its pairs twice; the first is kept.
                    self.counts["duplicate_records_removed"] += 1
                    logger.info("removed %s: the same record as %s", record.location, seen[key])
                    continue
                seen[key] = record.location
                yield record

    def invalid(self, location: str, message: str, reason: str) -> None:
        """Raise for a bad record, or count and log it when skipping."""
        if not self.options.skip_invalid:
            raise DataError(
                f"{location}: {message} Fix the record, or pass skip_invalid=True (--skip-invalid) to skip and count "
                "such records."
            )
        self.counts[f"skipped_{reason}"] += 1
        logger.warning("skipped %s: %s", location, message)

    def tie(self, location: str, message: str, reason: str) -> None:
        if self.options.ties == "error":
            raise DataError(f"{location}: {message} Pass ties='skip' (--ties skip) to skip and count ties.")
        self.counts[reason] += 1

    def new_id(self, record: Record, id_field: str | None = None) -> bool:
        """False (after raising or counting) when the record repeats an id seen before. ``id_field`` names the
        field for a format whose record kinds carry different ids (default: the conversion's)."""
        id_field = id_field or self.id_field
        if not id_field or id_field not in record.value:
            return True
        value = record.value[id_field]
        key = f"{id_field}={json.dumps(value, sort_keys=True, default=str)}"
        if key in self.ids:
            self.invalid(
                record.location,
                f"duplicate id {id_field}={value!r} (first seen at {self.ids[key]}); ids must be unique.",
                "duplicate_id",
            )
            return False
        self.ids[key] = record.location
        return True

    def require(self, record: Record, *fields: str) -> bool:
        """True when the record has every field and a new id; otherwise False after raising or counting."""
        missing = [f for f in fields if record.value.get(f) is None]
        if missing:
            self.invalid(
                record.location,
                f"missing field(s) {missing} (the record has {sorted(record.value)}).",
                "missing_field",
            )
            return False
        return self.new_id(record)

    def text(self, location: str, name: str, value: Any) -> bool:
        """True when ``value`` (the field ``name``) is non-empty text or a message list with text; otherwise False
        after raising or counting (as an empty answer or a wrong-typed field)."""
        if text_ok(value):
            return True
        if isinstance(value, str):
            self.invalid(location, f"{name} is empty; every prompt and answer needs text.", "empty_text")
        else:
            self.invalid(
                location,
                f"{name} must be text or a message list, got {type(value).__name__}: {value!r:.60}.",
                "bad_field",
            )
        return False


def _files(source: Any) -> list[Any]:
    """A directory's readable files, recursively and sorted by path; any other source as it is."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return [source]
    files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)
    if not files:
        kinds = "/".join(READABLE_SUFFIXES)
        raise DataError(f"{source}: the directory holds no {kinds} files (searched recursively).")
    logger.info("%s: reading %d files", source, len(files))
    return files


def text_ok(value: Any) -> bool:
    """Whether ``value`` is non-empty text or a message list with some text."""
    if isinstance(value, str):
        return bool(value.strip())
    try:
        return bool(flatten(value).strip())
    except ValueError:
        return False


def text_key(value: Any) -> str:
    # Responses are compared by the text the reward model reads, so message lists and strings compare alike.
    return flatten(value)


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None: NaN and infinities (also as strings) would sort anywhere."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) else None
