"""Reference answers for benchmarks that hold none: a file of ``prompt, reference`` rows, matched by prompt text.

A reference-aware reward model scores a candidate against a reference answer. Where a benchmark carries a gold
answer (PPE's MMLU-Pro, MATH, GPQA and MBPP-Plus sets) the converter uses it. Elsewhere the reference must come from
outside the benchmark's labelled answers: a chosen answer as the reference would give the label away (a copy of the
reference scores highest), and so would a chosen answer of the same prompt that is not itself judged (another pair's
winner, RM-Bench's chosen answer in another style), which states the fact the rejected answers get wrong. A fair
source is an answer the user's own policy (or any model that did not see the labels) wrote for each prompt, given
here as a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ...template import flatten
from ..io import DataError, Record, read_records
from .base import Conversion, text_ok

NO_REFERENCE_HINT = (
    'Pass references= (--references FILE): a .jsonl/.json/.parquet file of {"prompt": ..., "reference": ...} '
    "rows, one per prompt of the benchmark, e.g. your policy's answer to each prompt (`trl_polar.benchmark_sets."
    "benchmark_prompts` lists them). Using a labelled answer of the benchmark as the reference would leak the label."
)


def prompt_key(prompt: Any) -> str:
    # Prompts are matched by the text the reward model reads, so a string and a one-message list match alike.
    return flatten(prompt).strip()


class References:
    """The references of one file, keyed by prompt text; a prompt listed twice with different answers is an error."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.by_prompt: dict[str, Any] = {}
        where: dict[str, str] = {}
        for record in read_records(path):
            missing = [name for name in ("prompt", "reference") if record.value.get(name) is None]
            if missing:
                raise DataError(
                    f"{record.location}: a references file row needs 'prompt' and 'reference'; it lacks {missing} "
                    f"(it has {sorted(record.value)})."
                )
            prompt, reference = record.value["prompt"], record.value["reference"]
            if not text_ok(prompt) or not text_ok(reference):
                raise DataError(f"{record.location}: 'prompt' and 'reference' must be non-empty text or messages.")
            key = prompt_key(prompt)
            if key in self.by_prompt and flatten(self.by_prompt[key]) != flatten(reference):
                raise DataError(
                    f"{record.location}: this prompt already has a different reference at {where[key]}; keep one "
                    "reference per prompt."
                )
            self.by_prompt.setdefault(key, reference)
            where.setdefault(key, record.location)

    def get(self, prompt: Any) -> Any | None:
        return self.by_prompt.get(prompt_key(prompt))


def reference_lookup(conversion: Conversion, benchmark: str) -> Callable[[Record, Any, Any], Any | None]:
    """A function ``(record, prompt, gold) -> reference or None`` for one conversion.

    The references file (``options.references``) wins where it lists the prompt, then the benchmark's own gold
    answer; the source of every reference is counted (``references_from_file`` / ``references_gold``). A record
    with neither is an error naming it (or, with ``skip_invalid``, skipped and counted as ``skipped_no_reference``);
    when no file was given and the benchmark has no gold answer, the first record stops the conversion with the fix.
    """
    path = conversion.options.references
    references = References(path) if path else None
    counts = conversion.counts

    def lookup(record: Record, prompt: Any, gold: Any = None) -> Any | None:
        found = references.get(prompt) if references is not None else None
        if found is not None:
            counts["references_from_file"] += 1
            return found
        if gold is not None and text_ok(gold):
            counts["references_gold"] += 1
            return gold
        if references is None:
            raise DataError(
                f"{record.location}: {benchmark} gives this prompt no gold answer to use as the "
                f"reference. {NO_REFERENCE_HINT}"
            )
        shown = json.dumps(prompt_key(prompt)[:60], ensure_ascii=False)
        conversion.invalid(
            record.location, f"{references.path} has no reference for the prompt {shown}.", "no_reference"
        )
        return None

    return lookup
