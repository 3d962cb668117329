"""k-way rankings (the "ranked" and "ultrafeedback" formats): the best response is the reference.

As in POLAR's fine-tuning (rank 1 = reference, rank 2 = chosen, rank 3 = rejected), every ordered pair of the
responses below the best becomes a triple, and a ranking without ties below the best also gives a listwise row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..io import Record
from .base import Conversion, number, text_key


def add_ranking(
    conversion: Conversion,
    prompt: Any,
    responses: Sequence[tuple[Any, float]],
    location: str,
    higher_is_better: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Turn one ranked list of (response, score) into triples and a listwise row of ``conversion.result``."""
    texts = [("prompt", prompt)] + [(f"responses[{i}]", response) for i, (response, _) in enumerate(responses)]
    if not all(conversion.text(location, name, value) for name, value in texts):
        return
    ordered = _ranks(conversion, responses, location, higher_is_better)
    if ordered is None:
        return
    extra, counts = dict(extra or {}), conversion.counts
    reference, rest = ordered[0][0], ordered[1:]
    tied = [g for g in rest if len(g) > 1]
    if tied:
        shown = "; ".join(" = ".join(repr(text_key(r)[:30]) for r in g) for g in tied)
        conversion.tie(
            location,
            f"responses below the best share a rank or score ({shown}), so they form no pair.",
            "records_with_ties_below_top",
        )
    triples = []
    for gi, better in enumerate(rest):
        worse_groups = rest[gi + 1 : gi + 2] if conversion.options.pairs == "adjacent" else rest[gi + 1 :]
        triples += [
            {"prompt": prompt, "reference": reference, "chosen": chosen, "rejected": rejected, **extra}
            for chosen in better
            for worse in worse_groups
            for rejected in worse
        ]
        if len(better) > 1:
            counts["tied_pairs_skipped"] += len(better) * (len(better) - 1) // 2
    if not triples:
        counts["records_without_triples"] += 1
    conversion.result.rows.extend(triples)
    counts["triples"] += len(triples)
    if not tied:
        conversion.result.listwise.append(
            {"prompt": prompt, "reference": reference, "candidates": [g[0] for g in rest], **extra}
        )
        counts["listwise_rows"] += 1
    else:
        counts["listwise_skipped_ties"] += 1


def _ranks(
    conversion: Conversion, responses: Sequence[tuple[Any, float]], location: str, higher_is_better: bool
) -> list[list[Any]] | None:
    """The distinct responses grouped by score, best group first; None (after raising or counting) if unusable."""
    if not responses:
        conversion.invalid(location, "empty ranking: there are no responses to rank.", "empty_ranking")
        return None
    unique: dict[str, tuple[Any, float]] = {}
    for response, score in responses:
        key = text_key(response)
        if key in unique:
            # The same text twice: only its first occurrence is kept (a text cannot be better than itself).
            conversion.counts["duplicate_responses"] += 1
            continue
        unique[key] = (response, score)
    sign = 1 if higher_is_better else -1
    groups: dict[float, list[Any]] = {}
    for response, score in unique.values():
        groups.setdefault(sign * score, []).append(response)
    ordered = [groups[s] for s in sorted(groups, reverse=True)]
    if len(unique) < 3:
        conversion.invalid(
            location,
            f"a POLAR triple needs at least 3 distinct ranked responses (reference, chosen, "
            f"rejected), got {len(unique)}.",
            "too_few_responses",
        )
        return None
    if len(ordered[0]) > 1:
        conversion.tie(
            location,
            f"{len(ordered[0])} responses tie for the best rank, so the reference is ambiguous.",
            "skipped_tie_at_top",
        )
        return None
    return ordered


_TEXT_KEYS = ("text", "response", "content", "answer")


def _scored_responses(conversion: Conversion, record: Record) -> tuple[list[tuple[Any, float]], bool] | None:
    """A "ranked" record's responses as (text, score) and whether higher is better; None if unusable."""
    responses = record.value["responses"]
    if not isinstance(responses, list):
        conversion.invalid(
            record.location, f"'responses' must be a list, got {type(responses).__name__}.", "bad_field"
        )
        return None
    keys = {k for item in responses if isinstance(item, Mapping) for k in ("rank", "score") if k in item}
    if len(keys) > 1:
        conversion.invalid(
            record.location, "responses mix 'rank' (1 = best) and 'score' (higher = better); use one.", "bad_field"
        )
        return None
    scored, higher = [], "rank" not in keys
    for i, item in enumerate(responses):
        if isinstance(item, str) or (isinstance(item, list) and item and isinstance(item[0], Mapping)):
            scored.append((item, float(-i)))  # plain list: best first
            continue
        if not isinstance(item, Mapping):
            conversion.invalid(
                record.location, f"responses[{i}] must be a string or an object, got {item!r:.60}.", "bad_field"
            )
            return None
        text = next((item[k] for k in _TEXT_KEYS if k in item), None)
        rank = number(item["rank"]) if "rank" in item else number(item["score"]) if "score" in item else float(-i)
        if text is None or rank is None:
            conversion.invalid(
                record.location,
                f"responses[{i}] needs a text field (one of {_TEXT_KEYS}) and a numeric 'rank' (1 = best) or "
                f"'score' (higher = better) that is finite, or none of them for a best-first list; got {item!r:.80}.",
                "bad_field",
            )
            return None
        scored.append((text, rank))
    return scored, higher


def convert_ranked(records: Iterable[Record], conversion: Conversion) -> None:
    for record in records:
        if not conversion.require(record, "prompt", "responses"):
            continue
        scored = _scored_responses(conversion, record)
        if scored is not None:
            extra = {"id": record.value["id"]} if "id" in record.value else {}
            add_ranking(conversion, record.value["prompt"], scored[0], record.location, scored[1], extra)


def convert_ultrafeedback(records: Iterable[Record], conversion: Conversion) -> None:
    key = conversion.options.score_key
    for record in records:
        if not conversion.require(record, "instruction", "completions"):
            continue
        completions = record.value["completions"]
        if not isinstance(completions, list):
            conversion.invalid(record.location, "'completions' must be a list.", "bad_field")
            continue
        scored = []
        for i, completion in enumerate(completions):
            score = number(completion.get(key)) if isinstance(completion, Mapping) else None
            text = completion.get("response") if isinstance(completion, Mapping) else None
            if not isinstance(text, str) or score is None:
                got = completion.get(key) if isinstance(completion, Mapping) else completion
                conversion.invalid(
                    record.location,
                    f"completions[{i}] needs a 'response' string and a numeric {key!r} that is finite "
                    f"(got {got!r:.40}); choose another score with score_key= (--score-key), e.g. 'overall_score'.",
                    "bad_field",
                )
                break
            scored.append((text, score))
        else:
            extra = {"source": record.value["source"]} if "source" in record.value else {}
            add_ranking(conversion, record.value["instruction"], scored, record.location, extra=extra)
