"""Reading records with their locations, and writing rows atomically.

Every record read here carries where it came from (``file:line`` for JSON Lines, ``file:record N`` for a JSON
array, ``file:row N`` for Parquet, ``row N`` for an in-memory dataset), so that an error can name it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

READABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
WRITABLE_SUFFIXES = (".jsonl", ".parquet")


class DataError(ValueError):
    """Bad input data: the message names the file and line (or row), the field, and the fix."""


@dataclass(frozen=True)
class Record:
    """One input record and where it came from."""

    location: str
    value: Any


def read_records(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    skip_invalid: bool = False,
    counts: Counter | None = None,
) -> Iterator[Record]:
    """Yield the records of a ``.jsonl``/``.json``/``.parquet`` file, or of an in-memory dataset or list.

    A line that is not valid JSON, or a record that is not an object, raises `DataError` naming the file and the
    line; with ``skip_invalid`` it is skipped and counted in ``counts["skipped_invalid_json"]`` or
    ``counts["skipped_not_an_object"]``.
    """
    counts = counts if counts is not None else Counter()
    if isinstance(source, (str, os.PathLike)):
        yield from _read_file(Path(source), skip_invalid, counts)
        return
    for i, value in enumerate(source):
        yield from _checked(f"row {i}", value, skip_invalid, counts)


def _checked(location: str, value: Any, skip_invalid: bool, counts: Counter) -> Iterator[Record]:
    if isinstance(value, Mapping):
        yield Record(location, value)
        return
    message = f"{location}: expected a JSON object with named fields, got {type(value).__name__}: {value!r:.80}."
    if not skip_invalid:
        raise DataError(message + " Fix the record or pass skip_invalid=True (--skip-invalid) to skip and count it.")
    counts["skipped_not_an_object"] += 1
    logger.warning("skipped: %s", message)


def _read_file(path: Path, skip_invalid: bool, counts: Counter) -> Iterator[Record]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (looked from {os.getcwd()}).")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    # Blank lines carry no record; editors often leave one at the end. Counted, not an error.
                    counts["blank_lines"] += 1
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    message = f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})."
                    if not skip_invalid:
                        raise DataError(
                            message + " Fix the line or pass skip_invalid=True (--skip-invalid) to skip and count it."
                        ) from None
                    counts["skipped_invalid_json"] += 1
                    logger.warning("skipped: %s", message)
                    continue
                yield from _checked(f"{path}:{line_number}", value, skip_invalid, counts)
    elif suffix == ".json":
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}). A .json file must hold one list of "
                "objects; use .jsonl for one object per line (a malformed line can then be skipped)."
            ) from None
        if isinstance(values, Mapping):
            values = [values]
        if not isinstance(values, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(values).__name__}.")
        for i, value in enumerate(values):
            yield from _checked(f"{path}:record {i}", value, skip_invalid, counts)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, value in enumerate(table.to_pylist()):
            yield from _checked(f"{path}:row {i}", value, skip_invalid, counts)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {READABLE_SUFFIXES}.")


def _fsync_replace(tmp: str, final: str | os.PathLike) -> None:
    os.replace(tmp, final)
    # The rename is durable only once the directory entry is; without this a power loss may lose a finished file.
    directory = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A reader (or a resumed run) therefore sees either the old file or the whole new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
