"""Loading preference data for training from local files or the Hugging Face Hub."""

from __future__ import annotations

import os

from datasets import Dataset, load_dataset

# File suffix -> `datasets` builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_preference_dataset(path_or_name: str, split: str = "train") -> Dataset:
    """Load POLAR training rows (prompt, reference, chosen, rejected) as a `datasets.Dataset`.

    Args:
        path_or_name: a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, a local directory that `datasets`
            can read, or a hub dataset name (``"org/name"``; ``"org/name:config"`` selects a configuration).
        split: the split to load, e.g. ``"train"`` or ``"train[:1000]"``. A single local file is the ``train`` split,
            so slices such as ``"train[:10%]"`` apply to it too.

    CSV cannot hold message lists; use JSON Lines or Parquet for conversational data.
    """
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
        return load_dataset(_BUILDERS[suffix], data_files=path_or_name, split=split)
    if os.path.isdir(path_or_name):
        manifest = os.path.join(path_or_name, "manifest.json")
        if os.path.isfile(manifest):
            return _load_synthesis_output(path_or_name, manifest, split)
        return load_dataset(path_or_name, split=split)
    if path_or_name.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{path_or_name!r} looks like a local path but is neither a directory nor a file with a known suffix "
            f"({sorted(_BUILDERS)})."
        )
    name, _, config = path_or_name.partition(":")
    return load_dataset(name, config or None, split=split)


def _load_synthesis_output(directory: str, manifest_path: str, split: str) -> Dataset:
    """The shards of a `trl-polar build-data` run, as listed in its manifest (the other JSON files are metadata)."""
    import json

    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    files = [os.path.join(directory, shard["file"]) for shard in manifest.get("shards", [])]
    if not files:
        raise ValueError(f"{manifest_path} lists no shards: the build-data run has not written any yet.")
    if not manifest.get("complete", False):
        raise ValueError(
            f"{directory} holds an unfinished build-data run ({len(files)} of {manifest.get('num_shards')} shards); "
            "run the same build-data command again to finish it."
        )
    builder = _BUILDERS[os.path.splitext(files[0])[1].lower()]
    return load_dataset(builder, data_files=files, split=split)
