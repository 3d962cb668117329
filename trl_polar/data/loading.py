"""Loading preference data for training from local files, build-data runs or the Hugging Face Hub."""

from __future__ import annotations

import collections
import os

from .io import DataError, iter_json_records, looks_like_path
from .synthesis import store

# File suffix -> `datasets` builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_dataset(path_or_name: str, split: str = "train"):
    """Load POLAR training rows (prompt, reference, chosen, rejected) as a `datasets.Dataset`.

    Args:
        path_or_name: a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, the directory of a ``trl-polar
            build-data`` run, another local directory that `datasets` can read, or a hub dataset name
            (``"org/name"``; ``"org/name:config"`` selects a configuration).
        split: the split to load, e.g. ``"train"`` or ``"train[:1000]"``. A single local file is the ``train`` split,
            so slices such as ``"train[:10%]"`` apply to it too.

    CSV cannot hold message lists; use JSON Lines or Parquet for conversational data. A JSON file that cannot be
    read (bad UTF-8, a broken line, no records) is a one-line `DataError` naming the file and line.
    """
    from datasets import load_dataset

    if not isinstance(path_or_name, str) or not path_or_name:
        raise ValueError(f"`path_or_name` must be a file path or a dataset name, got {path_or_name!r}.")
    suffix = os.path.splitext(path_or_name)[1].lower()
    if suffix in _BUILDERS:
        if not os.path.isfile(path_or_name):
            raise FileNotFoundError(f"Dataset file {path_or_name!r} does not exist (looked from {os.getcwd()}).")
        if not split.startswith("train"):
            raise ValueError(
                f"A single file is loaded as the 'train' split; got split={split!r}. Use 'train' or a slice such as "
                "'train[:1000]'."
            )
        return _load_files(_BUILDERS[suffix], [path_or_name], split)
    if os.path.isdir(path_or_name):
        if store.is_run(path_or_name):
            files = [str(f) for f in store.finished_shards(path_or_name)]
            return _load_files(_BUILDERS[os.path.splitext(files[0])[1].lower()], files, split)
        return load_dataset(path_or_name, split=split)
    if os.path.exists(path_or_name):
        raise DataError(
            f"{path_or_name}: a local file of a kind not read (suffix {suffix or 'none'!r}). Training and evaluation "
            f"data is one of {sorted(_BUILDERS)}: write it as JSON Lines (one object per line) or rename it."
        )
    if looks_like_path(path_or_name):
        raise FileNotFoundError(
            f"{path_or_name}: no such file or directory (looked from {os.getcwd()}). Check the path; data is read "
            f"from {sorted(_BUILDERS)} files, build-data run directories or hub dataset names (org/name)."
        )
    name, _, config = path_or_name.partition(":")
    return load_dataset(name, config or None, split=split)


def _load_files(builder: str, files: list[str], split: str):
    from datasets import load_dataset

    try:
        dataset = load_dataset(builder, data_files=files, split=split)
    except Exception:
        # `datasets` reports a bad JSON file as a long traceback without the line; find the place and name it.
        _check_json(builder, files)
        raise
    if len(dataset) == 0:
        _check_json(builder, files)
        raise DataError(f"{', '.join(files)}: no training rows (split {split!r}). Add rows or widen the split.")
    return dataset


def _check_json(builder: str, files: list[str]) -> None:
    """Raise the reader's one-line error (file:line and the fix) for the first unreadable JSON file, if any."""
    if builder == "json":
        for file in files:
            # Read to the end: the reader raises at the first bad line, naming it.
            collections.deque(iter_json_records(file), maxlen=0)
