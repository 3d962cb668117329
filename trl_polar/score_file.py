"""`score_file`: score a file of (prompt, reference, candidate) rows and write every row back with its reward."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from .scorer import DEFAULT_MAX_TOKENS_PER_BATCH, PolarScorer, Scorer

logger = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ("output", "candidate", "completion", "response")


def _detect_column(row: dict, wanted: str | None, candidates: Sequence[str], role: str, line: int) -> str:
    if wanted is not None:
        if wanted not in row:
            raise ValueError(
                f"Line {line} has no {role} column {wanted!r} (it has {sorted(row)}). Pass the right column name."
            )
        return wanted
    for name in candidates:
        if name in row:
            return name
    raise ValueError(
        f"Line {line} has none of the {role} columns {list(candidates)} (it has {sorted(row)}). Name the column "
        "explicitly."
    )


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; blank lines are skipped, a malformed line is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({err.msg}). Fix or remove that line.") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no} must be a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


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
) -> dict[str, Any]:
    """Score a JSON-lines file of (prompt, reference, candidate) rows and write each row back with its reward.

    The candidate column defaults to the first of "output" (the official client's name), "candidate", "completion"
    and "response" that the first row has. A row may carry its own "wrapper". Returns a summary
    ``{"rows", "mean", "min", "max", "output"}``.
    """
    scorer = (
        model
        if isinstance(model, Scorer)
        else PolarScorer(
            model, max_tokens_per_batch=max_tokens_per_batch, device=device, dtype=dtype, show_progress=show_progress
        )
    )
    rows = read_jsonl(data_path)
    if not rows:
        raise ValueError(f"{data_path} has no rows. Write one JSON object per line with prompt, reference, output.")
    candidate_column = _detect_column(rows[0], candidate_column, CANDIDATE_COLUMNS, "candidate", 1)
    prompts, references, candidates, wrappers = [], [], [], []
    for line, row in enumerate(rows, start=1):
        for column in (prompt_column, reference_column, candidate_column):
            if row.get(column) is None:
                raise ValueError(
                    f"{data_path}: row {line} has no {column!r} value (it has {sorted(row)}). Every row needs "
                    f"{prompt_column!r}, {reference_column!r} and {candidate_column!r}."
                )
        prompts.append(row[prompt_column])
        references.append(row[reference_column])
        candidates.append(row[candidate_column])
        wrappers.append(row.get("wrapper", wrapper))
    # One wrapper for the whole file is what every scorer takes; per-row wrappers go through as a list.
    rewards = scorer.score(prompts, references, candidates, wrappers[0] if len(set(wrappers)) == 1 else wrappers)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        for row, reward in zip(rows, rewards, strict=True):
            f.write(json.dumps({**row, output_column: reward}, ensure_ascii=False) + "\n")
    finite = [r for r in rewards if r is not None and math.isfinite(r)]
    return {
        "rows": len(rows),
        "mean": sum(finite) / len(finite) if finite else float("nan"),
        "min": min(finite, default=float("nan")),
        "max": max(finite, default=float("nan")),
        "output": str(output_path),
    }
