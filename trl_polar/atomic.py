"""Files are written whole or not at all: a temporary file beside the destination, renamed over it when complete.

An interrupted write (Ctrl-C, a crash, a full disk) leaves the destination as it was. Destinations are checked
before any work starts, so that a bad ``--output`` fails in a second rather than after an hour of scoring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

# Temporary files are ``.tmp-<name>-<random>`` beside their destination: a resumed run removes the ones a kill left.
TEMP_PREFIX = ".tmp-"


def check_destination(
    path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), directory: bool = False
) -> bool:
    """Fail now, with the fix, if ``path`` cannot take the output; return whether something is there to replace.

    ``inputs`` are files the command reads: writing over one of them would destroy it.

    >>> check_destination("/proc/definitely/not/here.jsonl")
    Traceback (most recent call last):
    ...
    ValueError: /proc/definitely/not/here.jsonl: cannot create the folder /proc/definitely/not ...
    """
    target = Path(path)
    for source in inputs:
        if target.exists() and Path(source).exists() and os.path.samefile(target, source):
            raise ValueError(f"{target} is also the input; writing it would destroy the input. Pick another output.")
    if directory and target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; the output needs a folder. Pass a folder path or remove the file.")
    if not directory and target.is_dir():
        raise ValueError(f"{target} is a folder; the output is a file. Pass a file path, e.g. {target / 'out.jsonl'}.")
    folder = target if directory else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{target}: cannot create the folder {folder} ({err.strerror}). Pick a writable path."
        ) from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{target}: the folder {folder} is not writable. Pick a writable path.")
    exists = target.exists() and (not directory or any(target.iterdir()))
    if exists:
        logger.warning("%s exists and will be replaced when the new output is complete.", target)
    return exists


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is flushed to disk and renamed over ``path``.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(out) as f:
    ...     _ = f.write("whole")
    >>> out.read_text()
    'whole'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent)
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_directory(folder: Path) -> None:
    # The rename is durable only once the directory entry is; without this a power loss may lose a finished file.
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`Path.write_text`, atomically."""
    with atomic_write(path) as f:
        f.write(text)
