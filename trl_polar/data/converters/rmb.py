"""RMB (Zhou-Zoey/RMB-Reward-Model-Benchmark): its Pairwise_set and BoN_set files, read together.

The public files hold pairwise preferences and best-of-N records, but no full rankings, so the paper's protocol
(the top-ranked answer is the reference, correct when the 2nd beats the 3rd) cannot be rebuilt from them. What they
do support: a conversation's BoN best answer is the reference, and every pairwise pair of that conversation which
does not contain it is judged, r(p, ref, chosen) > r(p, ref, rejected).

- Records are told apart by their fields: ``chosen``/``reject`` (pairwise) or ``bon_best``/``loser_list`` (BoN);
  answers are ``{llm_name, answer}`` objects. A conversation is its message list (role and content).
- The reference of a conversation is one of its BoN bests: the one that loses fewest comparisons (pairwise and
  BoN) of that conversation, then the one that wins most, then the first read. Tied candidates are counted.
- Every record is converted or counted under one reason, so the counts add up to the records read:
  pairs: ``rows`` + ``pairs_skipped_identical_answers`` + ``pairs_skipped_no_bon_best`` +
  ``pairs_skipped_containing_reference``; BoN records: ``bon_records_reference`` + ``bon_records_other_best`` +
  ``bon_records_skipped_no_pairs``; besides, ``skipped_*`` counts malformed records (with ``skip_invalid``) and
  ``duplicate_records_removed`` records read twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...template import flatten
from ..io import Record
from .base import Conversion


@dataclass
class _Conversation:
    prompt: list[dict[str, Any]]
    pairs: list[tuple[Record, str, str]] = field(default_factory=list)
    bons: list[tuple[Record, str, list[str]]] = field(default_factory=list)
    lost: Counter = field(default_factory=Counter)
    won: Counter = field(default_factory=Counter)


def _prompt(record: Record, conversion: Conversion) -> list[dict[str, Any]] | None:
    messages = record.value.get("conversation_input")
    if not isinstance(messages, list) or not messages:
        conversion.invalid(record.location, "'conversation_input' must be a non-empty message list.", "bad_field")
        return None
    try:
        flatten(messages, "conversation_input")
    except ValueError as e:
        conversion.invalid(record.location, str(e), "bad_field")
        return None
    # RMB messages also carry a 'language' key; keep what the chat format defines.
    return [{"role": m.get("role", "user"), "content": m["content"]} for m in messages]


def _answer(value: Any) -> str | None:
    # A blank answer is still an answer the benchmark judges (a model that wrote nothing), so it is kept.
    if isinstance(value, Mapping) and isinstance(value.get("answer"), str):
        return value["answer"]
    return None


def _category(record: Record) -> dict[str, str]:
    path = record.value.get("category_path")
    if not isinstance(path, str):
        return {}
    head, _, rest = path.partition("/")
    # "Pairwise_set/Helpfulness/Chat/Discussion": the set names the file kind, the rest is the category.
    return {"category": rest if head.endswith("_set") and rest else path}


def _new_uid(record: Record, uid: str, conversion: Conversion) -> bool:
    return uid not in record.value or conversion.new_id(record, uid)


def _read(records: Iterable[Record], conversion: Conversion) -> dict[str, _Conversation]:
    conversations: dict[str, _Conversation] = {}
    counts = conversion.counts
    for record in records:
        value = record.value
        if "bon_best" in value or "loser_list" in value:
            kind, fields = "bon", ("conversation_input", "bon_best", "loser_list")
        elif "chosen" in value or "reject" in value:
            kind, fields = "pairwise", ("conversation_input", "chosen", "reject")
        else:
            conversion.invalid(
                record.location,
                f"not an RMB record: a pairwise record has 'chosen' and 'reject', a BoN record 'bon_best' and "
                f"'loser_list' (this one has {sorted(value)}).",
                "not_rmb",
            )
            continue
        counts[f"{kind}_records_read"] += 1
        if not conversion.require(record, *fields):
            continue
        if not _new_uid(record, "pair_uid" if kind == "pairwise" else "bon_uid", conversion):
            continue
        prompt = _prompt(record, conversion)
        if prompt is None:
            continue
        conversation = conversations.setdefault(json.dumps(prompt, ensure_ascii=False), _Conversation(prompt))
        if kind == "pairwise":
            chosen, rejected = _answer(value["chosen"]), _answer(value["reject"])
            if chosen is None or rejected is None:
                conversion.invalid(
                    record.location, "'chosen' and 'reject' must be objects with an 'answer' string.", "bad_field"
                )
                continue
            if chosen == rejected:
                # The same text on both sides cannot be ranked by any reward model.
                counts["pairs_skipped_identical_answers"] += 1
                continue
            conversation.pairs.append((record, chosen, rejected))
            conversation.won[chosen] += 1
            conversation.lost[rejected] += 1
            continue
        best = _answer(value["bon_best"])
        raw = value["loser_list"]
        losers = [_answer(x) for x in raw] if isinstance(raw, list) else [None]
        if best is None or any(x is None for x in losers):
            conversion.invalid(
                record.location,
                "'bon_best' must be an object with an 'answer' string and 'loser_list' a list of such objects.",
                "bad_field",
            )
            continue
        kept = [x for x in losers if x != best]
        counts["bon_losers_equal_to_best_removed"] += len(losers) - len(kept)
        conversation.bons.append((record, best, kept))
        conversation.won[best] += len(kept)
        for loser in kept:
            conversation.lost[loser] += 1
    return conversations


def _reference(conversation: _Conversation, conversion: Conversion) -> str:
    """The conversation's highest-standing BoN best: fewest comparisons lost, then most won, then first read."""
    bests = list(dict.fromkeys(best for _, best, _ in conversation.bons))
    standing = {best: (conversation.lost[best], -conversation.won[best]) for best in bests}
    top = min(standing.values())
    tied = [best for best in bests if standing[best] == top]
    if len(tied) > 1:
        conversion.counts["conversations_reference_tie_first_read"] += 1
    return tied[0]


def convert_rmb(records: Iterable[Record], conversion: Conversion) -> None:
    counts = conversion.counts
    for conversation in _read(records, conversion).values():
        counts["conversations"] += 1
        if not conversation.bons:
            counts["conversations_without_bon_best"] += 1
            counts["pairs_skipped_no_bon_best"] += len(conversation.pairs)
            continue
        if not conversation.pairs:
            counts["conversations_without_pairs"] += 1
            counts["bon_records_skipped_no_pairs"] += len(conversation.bons)
            continue
        reference = _reference(conversation, conversion)
        source = next(record for record, best, _ in conversation.bons if best == reference)
        for _, best, _ in conversation.bons:
            counts["bon_records_reference" if best == reference else "bon_records_other_best"] += 1
        made = 0
        for record, chosen, rejected in conversation.pairs:
            if reference in (chosen, rejected):
                # The reference against itself says nothing about the pair: a copy of the reference always wins.
                counts["pairs_skipped_containing_reference"] += 1
                continue
            row = {"prompt": conversation.prompt, "reference": reference, "chosen": chosen, "rejected": rejected}
            if "pair_uid" in record.value:
                row["id"] = str(record.value["pair_uid"])
            if "bon_uid" in source.value:
                row["reference_id"] = str(source.value["bon_uid"])
            row.update(_category(record))
            conversion.result.rows.append(row)
            made += 1
        counts["rows"] += made
        counts["conversations_judged" if made else "conversations_all_pairs_contain_reference"] += 1
