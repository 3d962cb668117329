"""`score_file`: score a file of (prompt, reference, candidate) rows and write every row back with its reward.

Rows are scored in chunks; each scored chunk is appended to ``OUTPUT.partial`` beside the output, and the output
appears, whole, only once every row is scored. An interrupted run (Ctrl-C, a crash) keeps the rows scored so far
there, and the same command resumes after them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write, check_destination
from .data.io import iter_json_records
from .scorer import DEFAULT_MAX_TOKENS_PER_BATCH, EncodeError, PolarScorer, Scorer
from .template import rename_parts

logger = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ("output", "candidate", "completion", "response")


def _detect_column(row: dict, wanted: str | None, path: str | os.PathLike, line: int) -> str:
    if wanted is not None:
        if wanted not in row:
            raise ValueError(
                f"{path}:{line} has no candidate column {wanted!r} (it has {sorted(row)}). Pass the right column name."
            )
        return wanted
    for name in CANDIDATE_COLUMNS:
        if name in row:
            return name
    raise ValueError(
        f"{path}:{line} has none of the candidate columns {list(CANDIDATE_COLUMNS)} (it has {sorted(row)}). Name the "
        "column with --candidate-column."
    )


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C during `score_file`; the rows scored so far are kept in ``partial`` and a rerun resumes after them."""

    def __init__(self, done: int, total: int, partial: Path) -> None:
        super().__init__(
            f"Interrupted after {done} of {total} rows; their scores are kept in {partial}. Run the same command "
            "again to resume after them."
        )
        self.done, self.total, self.partial = done, total, partial


def score_file(
    model: str | os.PathLike | Scorer,
    data_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    prompt_column: str = "prompt",
    reference_column: str = "reference",
    candidate_column: str | None = None,
    output_column: str = "reward",
    wrapper: str = "sft",
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    device: str | None = None,
    dtype: str | None = None,
    show_progress: bool = True,
    chunk_rows: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score a JSON-lines file of (prompt, reference, candidate) rows and write each row back with its reward.

    The candidate column defaults to the first of "output" (the official client's name), "candidate", "completion"
    and "response" that the first row has. A row may carry its own "wrapper". The output is checked before any
    work and written atomically; Ctrl-C raises `ScoringInterrupted` and keeps the scored rows for a rerun (see the
    module docstring). Rows that already hold ``output_column`` (a file scored before) are refused, naming the first
    such line, unless ``overwrite`` (then their old values are replaced, counted in the log). Returns a summary
    ``{"rows", "mean", "min", "max", "output", "resumed"}``.
    """
    check_destination(output_path, inputs=[data_path])
    rows, columns = _read_rows(data_path, (prompt_column, reference_column, candidate_column))
    _check_output_column(rows, output_column, overwrite, data_path)
    scorer = (
        model
        if isinstance(model, Scorer)
        else PolarScorer(model, max_tokens_per_batch=max_tokens_per_batch, device=device, dtype=dtype)
    )
    partial = Path(f"{output_path}.partial")
    done = _resume(partial, [row for _, row in rows], output_column)
    bar = _progress(len(rows), done, show_progress)
    with open(partial, "a" if done else "w", encoding="utf-8") as sink:
        for start in range(done, len(rows), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            try:
                rewards = _score_chunk(scorer, chunk, columns, wrapper, data_path)
            except KeyboardInterrupt:
                bar.close()
                raise ScoringInterrupted(start, len(rows), partial) from None
            except Exception:
                bar.close()  # so that the error starts a line of its own, not the bar's
                raise
            sink.writelines(json.dumps({**row, output_column: r}, ensure_ascii=False) + "\n" for (_, row), r in
                            zip(chunk, rewards, strict=True))  # fmt: skip
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(chunk))
    bar.close()
    os.replace(partial, output_path)
    with open(output_path, encoding="utf-8") as f:
        rewards = [json.loads(line)[output_column] for line in f]
    finite = [r for r in rewards if r is not None and math.isfinite(r)]
    return {
        "rows": len(rows),
        "mean": sum(finite) / len(finite) if finite else float("nan"),
        "min": min(finite, default=float("nan")),
        "max": max(finite, default=float("nan")),
        "output": str(output_path),
        "resumed": done,
    }


def _read_rows(data_path, columns: tuple[str, str, str | None]) -> tuple[list[tuple[int, dict]], tuple[str, str, str]]:
    """The rows with their line numbers, and the (prompt, reference, candidate) columns every row has."""
    rows = list(iter_json_records(data_path))  # an empty file is an error there, naming it
    prompt_column, reference_column, candidate_column = columns
    found = (prompt_column, reference_column, _detect_column(rows[0][1], candidate_column, data_path, rows[0][0]))
    for line, row in rows:
        missing = [column for column in found if row.get(column) is None]
        if missing:
            raise ValueError(
                f"{data_path}:{line} has no {missing[0]!r} value (it has {sorted(row)}). Every row needs "
                f"{', '.join(map(repr, found))}."
            )
    return rows, found


def _check_output_column(rows: list[tuple[int, dict]], column: str, overwrite: bool, data_path) -> None:
    scored = [line for line, row in rows if column in row]
    if not scored:
        return
    if not overwrite:
        raise ValueError(
            f"{data_path}:{scored[0]} already has a {column!r} value ({len(scored)} of {len(rows)} rows do). Pass "
            "--output-column NAME (output_column=) to keep them beside the new scores, or --overwrite "
            "(overwrite=True) to replace them."
        )
    logger.warning("Replacing the %r values of %d of %d rows of %s.", column, len(scored), len(rows), data_path)


def _score_chunk(scorer: Scorer, chunk, columns: tuple[str, str, str], wrapper: str, data_path) -> list[float]:
    prompts, references, candidates = ([row[c] for _, row in chunk] for c in columns)
    wrappers = [row.get("wrapper", wrapper) for _, row in chunk]
    try:
        # One wrapper for the whole chunk is what every scorer takes; per-row wrappers go through as a list.
        return scorer.score(prompts, references, candidates, wrappers[0] if len(set(wrappers)) == 1 else wrappers)
    except EncodeError as err:
        reason = rename_parts(err.reason, dict(zip(("prompt", "reference", "candidate"), columns, strict=True)))
        raise ValueError(f"{data_path}:{chunk[err.index][0]}: {reason}") from None


def _resume(partial: Path, rows: list[dict], output_column: str) -> int:
    """How many leading rows ``partial`` already holds, scored; 0 (and it is started over) if it is not ours."""
    if not partial.exists():
        return 0
    done = 0
    with open(partial, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by the interruption: everything before it stands
            if done >= len(rows) or _without(row, output_column) != _without(rows[done], output_column):
                logger.warning("%s does not hold scores of this input; scoring from the start.", partial)
                return 0
            done += 1
    if done:
        # Drop a cut last line so that appending continues on a clean line.
        with open(partial, encoding="utf-8") as f:
            kept = [next(f) for _ in range(done)]
        with atomic_write(partial) as f:
            f.writelines(kept)
        logger.warning("Resuming after %d of %d rows already scored in %s.", done, len(rows), partial)
    return done


def _without(row: dict, column: str) -> dict:
    return {k: v for k, v in row.items() if k != column}


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="POLAR scoring", unit="row", disable=not enabled)
