"""PPE's correctness sets (lmarena-ai/PPE-{MMLU-Pro,MATH,GPQA,MBPP-Plus,IFEval}-Best-of-K): K answers per prompt,
each verified correct or not.

Every record holds ``question_id``, ``model_name``, ``prompt``, ``response_1`` ... ``response_K`` (K = 32),
``scores`` (one boolean per response: correct by the set's own checker) and ``sampled_conflict_pairs`` (index pairs
of a correct and an incorrect response). The set is told by its fields, and so is the gold answer used as reference:

- MMLU-Pro (``options``, ``answer``, ``answer_index``): "The answer is (X) <option text>";
- MATH (``problem``, ``solution``): the reference solution;
- GPQA (``correct_choice``): the correct choice's text;
- MBPP-Plus (``code``, ``test_list``): the reference program;
- IFEval (``instruction_id_list``): no gold answer (correctness is a set of checks), so a references file.

Each record becomes one row ``prompt, reference, candidates, labels`` (plus ``pairs``, the conflict pairs).
Empty responses are removed (``empty_responses_removed``) together with the pairs that use them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..io import Record
from .base import Conversion
from .references import reference_lookup

SETS = ("mmlu_pro", "math", "gpqa", "mbpp_plus", "ifeval")


def ppe_set(value: Mapping[str, Any]) -> str | None:
    """Which PPE correctness set a record comes from, by the fields only that set has."""
    if "answer_index" in value and "options" in value:
        return "mmlu_pro"
    if "correct_choice" in value:
        return "gpqa"
    if "solution" in value and "problem" in value:
        return "math"
    if "test_list" in value and "code" in value:
        return "mbpp_plus"
    if "instruction_id_list" in value:
        return "ifeval"
    return None


def gold_answer(name: str, value: Mapping[str, Any]) -> str | None:
    """The set's gold answer as reference text; None for IFEval, whose records have none."""
    if name == "mmlu_pro":
        options, index = value.get("options"), value.get("answer_index")
        if isinstance(options, list) and isinstance(index, int) and 0 <= index < len(options):
            return f"The answer is ({value.get('answer')}) {options[index]}"
        return None
    field = {"math": "solution", "gpqa": "correct_choice", "mbpp_plus": "code"}.get(name)
    gold = value.get(field) if field else None
    return gold if isinstance(gold, str) and gold.strip() else None


def _responses(value: Mapping[str, Any]) -> list[Any]:
    responses, k = [], 1
    while f"response_{k}" in value:
        responses.append(value[f"response_{k}"])
        k += 1
    return responses


def convert_ppe(records: Iterable[Record], conversion: Conversion) -> None:
    lookup = reference_lookup(conversion, "PPE")
    counts = conversion.counts
    for record in records:
        if not conversion.require(record, "prompt", "scores", "response_1"):
            continue
        value, location = record.value, record.location
        name = ppe_set(value)
        if name is None:
            conversion.invalid(
                location, f"not a record of a PPE correctness set {SETS} (it has {sorted(value)}).", "bad_field"
            )
            continue
        responses, labels = _responses(value), value["scores"]
        if (
            not isinstance(labels, list)
            or len(labels) != len(responses)
            or not all(isinstance(x, bool) for x in labels)
        ):
            conversion.invalid(
                location, f"'scores' must hold one boolean per response ({len(responses)} responses).", "bad_field"
            )
            continue
        if not all(isinstance(r, str) for r in responses):
            conversion.invalid(location, "every response_k must be a string.", "bad_field")
            continue
        if not conversion.text(location, "'prompt'", value["prompt"]):
            continue
        reference = lookup(record, value["prompt"], gold_answer(name, value))
        if reference is None:
            continue
        kept = [k for k, r in enumerate(responses) if r.strip()]
        counts["empty_responses_removed"] += len(responses) - len(kept)
        if len(kept) < 2:
            conversion.invalid(
                location, f"only {len(kept)} non-empty responses; best-of-K needs 2.", "too_few_responses"
            )
            continue
        new_index = {old: new for new, old in enumerate(kept)}
        row = {
            "prompt": value["prompt"],
            "reference": reference,
            "candidates": [responses[k] for k in kept],
            "labels": [labels[k] for k in kept],
            "category": name,
            "id": str(value.get("question_id", location)),
        }
        if "model_name" in value:
            row["model_name"] = value["model_name"]
        if isinstance(value.get("sampled_conflict_pairs"), list):
            pairs = [p for p in value["sampled_conflict_pairs"] if isinstance(p, list) and len(p) == 2]
            row["pairs"] = [[new_index[i], new_index[j]] for i, j in pairs if i in new_index and j in new_index]
            counts["conflict_pairs_removed"] += len(value["sampled_conflict_pairs"]) - len(row["pairs"])
        conversion.result.rows.append(row)
        counts["bon_rows"] += 1
        if len(set(row["labels"])) == 1:
            counts["rows_all_" + ("correct" if row["labels"][0] else "incorrect")] += 1
