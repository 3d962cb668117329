"""The on-disk format of a synthesis run, the one place that knows it (the runner writes it, loading reads it).

A run is a directory::

    out/run.json              the settings and the prompts' fingerprint (a resumed run must match them)
    out/shard-00000.parquet   the triples of prompts [0, shard_size) (or .jsonl)
    out/shard-00000.json      that shard's counts; its presence marks the shard as complete
    out/manifest.json         all complete shards, total counts, and whether the run is complete

Every file is written atomically: a temporary ``.tmp-<name>-*`` file beside it, then a rename. A process killed
mid-write therefore leaves at most such temporary files, which the next run removes, and never a partial shard,
counts file or manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..io import DataError, atomic_write_json, write_rows

logger = logging.getLogger(__name__)

RUN_FILE, MANIFEST_FILE = "run.json", "manifest.json"
# Part of a run's settings, so that a run is never resumed by code that writes other triples. 2: a prefix prompt's
# continuation is decoded after the prompt's ids (the space at the seam is kept).
FORMAT_VERSION = 2


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}.{suffix}"


def is_run(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a synthesis run (finished or not)."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path}: no manifest; {directory} holds no build-data run, or none wrote a shard yet."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: not a readable manifest ({e}); run the same build-data command again to rewrite it."
        ) from None


def finished_shards(directory: str | os.PathLike) -> list[Path]:
    """The shard files of a finished run, in order; an error says how to finish an unfinished one."""
    manifest = read_manifest(directory)
    files = [Path(directory) / shard["file"] for shard in manifest.get("shards", [])]
    path = Path(directory) / MANIFEST_FILE
    if not files:
        raise DataError(f"{path} lists no shards: the build-data run has not written any yet.")
    if not manifest.get("complete", False):
        raise DataError(
            f"{directory} holds an unfinished build-data run ({len(files)} of {manifest.get('num_shards')} shards); "
            "run the same build-data command again to finish it."
        )
    return files


def token_sizes(totals: Mapping[str, int]) -> dict[str, float] | None:
    """The run's size in training tokens, for ``trl-polar scaling --rm-tokens/--tokens-per-sample`` and
    ``--recipe polar-pretrain --rm-tokens``; None when some shard was made without counting tokens.

    A triple trains as two sequences, ``prompt reference prompt chosen`` and ``prompt reference prompt rejected``
    (the template's special tokens and newlines, a few per sequence, are not counted).

    >>> token_sizes({"triples": 2, "token_counted_triples": 2, "tokens_prompt": 10, "tokens_reference": 20,
    ...              "tokens_chosen": 20, "tokens_rejected": 30})
    {'rm_tokens': 130, 'tokens_per_sample': 65.0}
    """
    triples = totals.get("triples", 0)
    if not triples or totals.get("token_counted_triples") != triples:
        return None
    total = 4 * totals["tokens_prompt"] + 2 * totals["tokens_reference"]
    total += totals["tokens_chosen"] + totals["tokens_rejected"]
    return {"rm_tokens": total, "tokens_per_sample": total / triples}


class RunStore:
    """Writes one run's directory: the settings, each shard with its counts, and the manifest."""

    def __init__(self, directory: str | os.PathLike, suffix: str) -> None:
        self.directory, self.suffix = Path(directory), suffix

    def remove_stray(self, names: Iterable[str]) -> None:
        """Remove the temporary files a killed run left while writing the files ``names``."""
        for name in names:
            for stray in sorted(self.directory.glob(f".tmp-{name}-*")):
                logger.warning("removing %s, a partial write of a killed run", stray)
                stray.unlink(missing_ok=True)

    def open(self, settings: Mapping[str, Any]) -> None:
        """Record the run's settings, or check that they equal those of the run being resumed."""
        path = self.directory / RUN_FILE
        if not path.exists():
            atomic_write_json(path, dict(settings))
            return
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            details = "; ".join(f"{k}: was {old.get(k)!r:.60}, now {settings.get(k)!r:.60}" for k in changed)
            raise DataError(
                f"{self.directory} holds a run with other settings ({details}). Resuming would mix two datasets: use "
                "another --out directory, or restore the original settings to resume."
            )
        logger.info("resuming the run in %s", self.directory)

    def shard_names(self, index: int) -> tuple[str, str]:
        """The data file and the counts file of shard ``index``."""
        return shard_name(index, self.suffix), shard_name(index, "json")

    def is_complete(self, index: int) -> bool:
        return (self.directory / shard_name(index, "json")).exists()

    def write_shard(self, index: int, rows: list[dict[str, Any]], counts: Mapping[str, int]) -> None:
        data, meta = self.shard_names(index)
        # Data first, then the counts file: the counts file is what marks a shard complete.
        write_rows(rows, self.directory / data)
        atomic_write_json(self.directory / meta, {"index": index, "rows": len(rows), **counts})

    def write_manifest(self, num_shards: int) -> None:
        shards, totals = [], Counter()
        for k in range(num_shards):
            meta_path = self.directory / shard_name(k, "json")
            if meta_path.exists():
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                totals.update({key: v for key, v in meta.items() if key != "index"})
                shards.append({"index": k, "file": shard_name(k, self.suffix), "rows": meta["rows"]})
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_shards": num_shards,
            "complete": len(shards) == num_shards,
            "shards": shards,
            "totals": dict(sorted(totals.items())),
            "tokens": token_sizes(totals),
        }
        atomic_write_json(self.directory / MANIFEST_FILE, manifest)
