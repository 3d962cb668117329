"""The one reader of JSON and JSON Lines files, reading records with their locations, and atomic writes.

Every record read here carries where it came from (``file:line``, 1-based, for ``.jsonl`` and ``.json`` files,
``file:row N`` for Parquet, ``row N`` for an in-memory dataset), so that an error can name it. Every problem with a
file (bad UTF-8, broken JSON, a record that is not an object, no records at all) is one `DataError` line naming the
file and line and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

READABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
WRITABLE_SUFFIXES = (".jsonl", ".parquet")
_SKIP_HINT = " or pass skip_invalid=True (--skip-invalid) to skip and count it"
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """Bad input data: the message names the file and line (or row), the field, and the fix."""


@dataclass(frozen=True)
class Record:
    """One input record and where it came from."""

    location: str
    value: Any


class _Problems:
    """Raises a bad line's error, or (when skipping) counts it by reason and logs it."""

    def __init__(self, skip_invalid: bool | None, counts: Counter) -> None:
        self.skip_invalid, self.counts = skip_invalid, counts

    def __call__(self, location: str, problem: str, fix: str, reason: str) -> None:
        if not self.skip_invalid:
            hint = _SKIP_HINT if self.skip_invalid is False else ""
            raise DataError(f"{location}: {problem}. {fix}{hint}.")
        self.counts[f"skipped_{reason}"] += 1
        logger.warning("skipped %s: %s", location, problem)

    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("skipped_"))


# Suffixes of files people keep data or weights in: a name ending so is a local path, never a hub repository.
_FILE_SUFFIXES = frozenset(
    {".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".tsv", ".txt", ".xlsx", ".xls", ".arrow", ".gz", ".zip"}
    | {".tar", ".yaml", ".yml", ".md", ".pkl", ".pt", ".bin", ".safetensors", ".gguf"}
)


def looks_like_path(value: str | os.PathLike) -> bool:
    """Whether `value` names a local file or directory rather than a hub repository: it exists, starts like a path
    (``./``, ``../``, ``/``, ``~``) or ends with a file suffix. Such a value gets a local answer (no such file, or
    which formats are read), never a hub error.

    >>> [looks_like_path(v) for v in ("./nope", "rows.txt", "org/name", "org/model-v1.5")]
    [True, True, False, False]
    """
    text = os.fspath(value)
    if os.path.exists(text) or text.startswith((".", "/", "~", "\\")):
        return True
    return os.path.splitext(text)[1].lower() in _FILE_SUFFIXES


def _not_an_object(value: Any) -> str:
    return f"expected a JSON object with named fields, got {type(value).__name__}: {value!r:.80}"


def iter_json_records(
    path: str | os.PathLike, skip_invalid: bool | None = None, counts: Counter | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line, record)`` for every object of a ``.jsonl`` or ``.json`` file; ``line`` counts from 1.

    A ``.jsonl`` file holds one object per line (blank lines are counted in ``counts["blank_lines"]``); a ``.json``
    file holds a JSON array of objects, one object, or one object per line. Bad UTF-8, a line that is not valid JSON
    and a record that is not an object raise `DataError` naming ``file:line``; with ``skip_invalid=True`` a bad line
    of JSON Lines is skipped instead and counted as ``counts["skipped_<reason>"]``. ``skip_invalid=None`` is for
    callers that offer no skipping (the error then does not suggest it). A file without records is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (looked from {os.getcwd()}).")
    counts = counts if counts is not None else Counter()
    problems = _Problems(skip_invalid, counts)
    if path.suffix.lower() == ".json":
        records = _json_file_records(path, _decode(path, path.read_bytes()), problems)
    else:
        with path.open("rb") as f:
            yield from _checked_lines(path, _line_records(path, f, problems), problems)
            return
    yield from _checked_lines(path, records, problems)


def _checked_lines(path: Path, records: Iterable[tuple[int, Any]], problems: _Problems) -> Iterator[tuple[int, dict]]:
    skipped_before = problems.skipped()
    found = 0
    for line, value in records:
        if isinstance(value, Mapping):
            found += 1
            yield line, value
        else:
            problems(f"{path}:{line}", _not_an_object(value), "Make each record a JSON object", "not_an_object")
    if not found and problems.skipped() == skipped_before:
        raise DataError(
            f"{path}: the file holds no records. Write one JSON object per line (.jsonl) or a JSON array of objects."
        )


def _bad_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})"


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: {_bad_utf8(data, e)}. Save the file as UTF-8.") from None


def _line_records(path: Path, lines: Iterable[bytes], problems: _Problems) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems(f"{path}:{number}", _bad_utf8(raw, e), "Save the file as UTF-8", "not_utf8")
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not line.strip():
            # Blank lines carry no record; editors often leave one at the end. Counted, not an error.
            problems.counts["blank_lines"] += 1
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
            problems(f"{path}:{number}", problem, "Fix the line", "invalid_json")


def _json_file_records(path: Path, text: str, problems: _Problems) -> Iterator[tuple[int, Any]]:
    text = text.removeprefix("\ufeff")
    start = _WHITESPACE.match(text).end()
    if text.startswith("[", start):
        return _array_records(path, text, start)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            _broken_json(path, e)
        # More than one value: one object per line, as in JSON Lines.
        return _line_records(path, text.encode("utf-8").splitlines(keepends=True), problems)
    return iter([(text.count("\n", 0, start) + 1, value)] if start < len(text) else [])


def _array_records(path: Path, text: str, start: int) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array with the line each starts on (``json.loads`` would forget the lines)."""
    decoder = json.JSONDecoder()
    position, line, counted = _WHITESPACE.match(text, start + 1).end(), 1, 0
    closed = text.startswith("]", position)
    try:
        while not closed:
            line += text.count("\n", counted, position)
            counted = position
            value, end = decoder.raw_decode(text, position)
            yield line, value
            position = _WHITESPACE.match(text, end).end()
            if text.startswith(",", position):
                position = _WHITESPACE.match(text, position + 1).end()
            elif text.startswith("]", position):
                closed = True
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        end = _WHITESPACE.match(text, position + 1).end()
        if end < len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as e:
        _broken_json(path, e)


def _broken_json(path: Path, error: json.JSONDecodeError) -> None:
    raise DataError(
        f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}). Fix it; a .json file holds "
        "one array of objects, so a broken record cannot be skipped: use .jsonl (one object per line) for that."
    ) from None


def read_row(path: str | os.PathLike, row: int) -> dict[str, Any]:
    """Record ``row`` (counted from 0) of a ``.jsonl`` or ``.json`` file."""
    count = 0
    for count, (_, record) in enumerate(iter_json_records(path), start=1):
        if count - 1 == row:
            return record
    raise DataError(f"{path}: has no row at index {row} (it has {count} rows, at indices 0 to {count - 1}).")


def read_records(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    skip_invalid: bool = False,
    counts: Counter | None = None,
) -> Iterator[Record]:
    """Yield the records of a ``.jsonl``/``.json``/``.parquet`` file, or of an in-memory dataset or list.

    JSON files are read by `iter_json_records` (its errors, and what ``skip_invalid`` skips, apply); a row of a
    Parquet file or a dataset that is not an object raises `DataError`, or with ``skip_invalid`` is skipped and
    counted in ``counts["skipped_not_an_object"]``.
    """
    counts = counts if counts is not None else Counter()
    problems = _Problems(skip_invalid, counts)
    if not isinstance(source, (str, os.PathLike)):
        for i, value in enumerate(source):
            yield from _checked(f"index {i}", value, problems)
        return
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line, value in iter_json_records(path, skip_invalid, counts):
            yield Record(f"{path}:{line}", value)
    elif suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (looked from {os.getcwd()}).")
        import pyarrow.parquet as pq

        for i, value in enumerate(pq.read_table(path).to_pylist()):
            yield from _checked(f"{path}, index {i}", value, problems)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {READABLE_SUFFIXES}.")


def _checked(location: str, value: Any, problems: _Problems) -> Iterator[Record]:
    if isinstance(value, Mapping):
        yield Record(location, value)
    else:
        problems(location, _not_an_object(value), "Fix the record", "not_an_object")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole or not at all (`trl_polar.atomic.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode())


def write_rows(rows: list[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write rows to ``.jsonl`` or ``.parquet`` atomically (temporary file + rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        atomic_write_bytes(path, data)
    elif suffix == ".parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(list(rows))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise DataError(
                f"{path}: the rows cannot be stored as Parquet ({e}); a column mixes strings and message lists. "
                "Write .jsonl instead, which holds any mix."
            ) from None
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        raise DataError(f"{path}: cannot write {suffix!r} files; use one of {WRITABLE_SUFFIXES}.")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a ``.jsonl`` or ``.parquet`` file this module wrote."""
    return [dict(record.value) for record in read_records(path)]
