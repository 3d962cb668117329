"""Converters of public preference formats into POLAR rows.

Outputs (strings or message lists, as the input had them):

- triples: ``prompt, reference, chosen, rejected`` (plus ``id``/``category`` where the input has them), the
  pairwise rows `PolarRewardTrainer` and the evaluation read;
- listwise rows: ``prompt, reference, candidates`` (best first, k >= 2), for the listwise loss;
- RL rows (HH-RLHF): ``prompt, reference``, for a GRPO/RLOO dataset with a ``reference`` column;
- best-of-N rows (RMB BoN): ``prompt, reference, candidates`` where the first candidate beat every other one
  (the rest are not ordered among themselves), as `trl_polar.evaluation`'s best_of_n protocol reads them.

In a k-way ranking the best response becomes the reference (as in POLAR's fine-tuning: rank 1 = reference,
rank 2 = chosen, rank 3 = rejected) and every ordered pair of the rest becomes a triple.

Nothing is dropped silently: every skipped record or pair is counted in ``ConversionResult.counts`` and logged;
a bad record is an error naming its file and line unless ``skip_invalid`` is set.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..template import flatten
from .io import DataError, Record, read_records

logger = logging.getLogger(__name__)

TIES = ("error", "skip")
PAIRS = ("all", "adjacent")


@dataclass
class ConversionResult:
    """Rows produced, listwise rows (ranked formats only) and counts of everything produced and skipped."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    listwise: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


@dataclass
class ConvertOptions:
    """Settings shared by the converters."""

    skip_invalid: bool = field(
        default=False, metadata={"help": "Skip (and count) malformed records instead of stopping at the first one."}
    )
    ties: str = field(
        default="error",
        metadata={
            "help": "Equal ranks or scores: 'error' stops; 'skip' skips tied pairs, and records whose best response "
            "is tied (the reference would be ambiguous), counting both."
        },
    )
    pairs: str = field(
        default="all",
        metadata={"help": "Pairs among the non-reference responses: 'all' ordered pairs, or 'adjacent' ranks only."},
    )
    score_key: str = field(
        default="fine-grained_score",
        metadata={"help": "UltraFeedback: the completion field that ranks it (e.g. 'overall_score')."},
    )
    reference_column: str = field(default="reference", metadata={"help": "TRL format: the column of references."})
    id_field: str | None = field(
        default=None, metadata={"help": "The field holding a record id (default: the format's own, e.g. pair_uid)."}
    )

    def __post_init__(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"`ties` must be one of {TIES}, got {self.ties!r}.")
        if self.pairs not in PAIRS:
            raise ValueError(f"`pairs` must be one of {PAIRS}, got {self.pairs!r}.")


class _Context:
    """Per-conversion state: options, counts and the ids seen so far."""

    def __init__(self, options: ConvertOptions, id_field: str | None) -> None:
        self.options = options
        self.counts: Counter = Counter()
        self.id_field = options.id_field or id_field
        self.ids: dict[Any, str] = {}

    def invalid(self, location: str, message: str, reason: str) -> None:
        """Raise for a bad record, or count and log it when skipping."""
        if not self.options.skip_invalid:
            raise DataError(
                f"{location}: {message} Fix the record, or pass skip_invalid=True (--skip-invalid) to skip and count "
                "such records."
            )
        self.counts[f"skipped_{reason}"] += 1
        logger.warning("skipped %s: %s", location, message)

    def tie(self, location: str, message: str, reason: str) -> None:
        if self.options.ties == "error":
            raise DataError(f"{location}: {message} Pass ties='skip' (--ties skip) to skip and count ties.")
        self.counts[reason] += 1

    def new_id(self, record: Record) -> bool:
        """False (after raising or counting) when the record repeats an id seen before."""
        if not self.id_field or self.id_field not in record.value:
            return True
        value = record.value[self.id_field]
        key = json.dumps(value, sort_keys=True, default=str)
        if key in self.ids:
            self.invalid(
                record.location,
                f"duplicate id {self.id_field}={value!r} (first seen at {self.ids[key]}); ids must be unique.",
                "duplicate_id",
            )
            return False
        self.ids[key] = record.location
        return True


def _records(sources: Any, ctx: _Context) -> Iterable[Record]:
    if isinstance(sources, (str, bytes)) or hasattr(sources, "__fspath__"):
        sources = [sources]
    elif not isinstance(sources, Sequence) or (sources and isinstance(sources[0], Mapping)):
        sources = [sources]  # one in-memory dataset or list of records
    for source in sources:
        yield from read_records(source, skip_invalid=ctx.options.skip_invalid, counts=ctx.counts)


def _require(record: Record, ctx: _Context, *fields: str) -> bool:
    missing = [f for f in fields if record.value.get(f) is None]
    if missing:
        ctx.invalid(
            record.location,
            f"missing field(s) {missing} (the record has {sorted(record.value)}).",
            "missing_field",
        )
        return False
    return True


def _text_ok(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    try:
        return bool(flatten(value).strip())
    except ValueError:
        return False


def _key(value: Any) -> str:
    # Responses are compared by the text the reward model reads, so message lists and strings compare alike.
    return flatten(value)


# ----------------------------------------------------------------------------------------------- k-way rankings
def ranking_rows(
    prompt: Any,
    responses: Sequence[tuple[Any, float]],
    location: str,
    ctx: _Context,
    higher_is_better: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Turn one ranked list of (response, score) into triples and a listwise row, appended to ``ctx.result``."""
    extra = dict(extra or {})
    result: ConversionResult = ctx.result
    if not responses:
        ctx.invalid(location, "empty ranking: there are no responses to rank.", "empty_ranking")
        return
    unique: dict[str, tuple[Any, float]] = {}
    for response, score in responses:
        key = _key(response)
        if key in unique:
            # The same text twice: only its first occurrence is kept (a text cannot be better than itself).
            ctx.counts["duplicate_responses"] += 1
            continue
        unique[key] = (response, score)
    sign = 1 if higher_is_better else -1
    groups: dict[float, list[Any]] = {}
    for response, score in unique.values():
        groups.setdefault(sign * score, []).append(response)
    ordered = [groups[s] for s in sorted(groups, reverse=True)]
    if len(unique) < 3:
        ctx.invalid(
            location,
            f"a POLAR triple needs at least 3 distinct ranked responses (reference, chosen, rejected), got "
            f"{len(unique)}.",
            "too_few_responses",
        )
        return
    if len(ordered[0]) > 1:
        ctx.tie(location, f"{len(ordered[0])} responses tie for the best rank, so the reference is ambiguous.",
                "skipped_tie_at_top")  # fmt: skip
        return
    reference, rest = ordered[0][0], ordered[1:]
    tied = [g for g in rest if len(g) > 1]
    if tied:
        shown = "; ".join(" = ".join(repr(_key(r)[:30]) for r in g) for g in tied)
        ctx.tie(location, f"responses below the best share a rank or score ({shown}), so they form no pair.",
                "records_with_ties_below_top")  # fmt: skip
    triples = []
    for gi, better in enumerate(rest):
        worse_groups = rest[gi + 1 : gi + 2] if ctx.options.pairs == "adjacent" else rest[gi + 1 :]
        for chosen in better:
            for worse in worse_groups:
                for rejected in worse:
                    triples.append({"prompt": prompt, "reference": reference, "chosen": chosen,
                                    "rejected": rejected, **extra})  # fmt: skip
        if len(better) > 1:
            ctx.counts["tied_pairs_skipped"] += len(better) * (len(better) - 1) // 2
    if not triples:
        ctx.counts["records_without_triples"] += 1
    result.rows.extend(triples)
    ctx.counts["triples"] += len(triples)
    if all(len(g) == 1 for g in rest):
        result.listwise.append({"prompt": prompt, "reference": reference, "candidates": [g[0] for g in rest], **extra})
        ctx.counts["listwise_rows"] += 1
    else:
        ctx.counts["listwise_skipped_ties"] += 1


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


_TEXT_KEYS = ("text", "response", "content", "answer")


def _convert_ranked(records: Iterable[Record], ctx: _Context) -> None:
    for record in records:
        if not _require(record, ctx, "prompt", "responses") or not ctx.new_id(record):
            continue
        value, responses = record.value, record.value["responses"]
        if not isinstance(responses, list):
            ctx.invalid(record.location, f"'responses' must be a list, got {type(responses).__name__}.", "bad_field")
            continue
        scored, ok, higher = [], True, True
        keys = {k for item in responses if isinstance(item, Mapping) for k in ("rank", "score") if k in item}
        if len(keys) > 1:
            ctx.invalid(record.location, "responses mix 'rank' (1 = best) and 'score' (higher = better); use one.",
                        "bad_field")  # fmt: skip
            continue
        for i, item in enumerate(responses):
            if isinstance(item, str) or (isinstance(item, list) and item and isinstance(item[0], Mapping)):
                scored.append((item, float(-i)))  # plain list: best first
                continue
            if not isinstance(item, Mapping):
                ctx.invalid(record.location, f"responses[{i}] must be a string or an object, got {item!r:.60}.",
                            "bad_field")  # fmt: skip
                ok = False
                break
            text = next((item[k] for k in _TEXT_KEYS if k in item), None)
            if "rank" in item:
                rank, higher = _number(item["rank"]), False
            elif "score" in item:
                rank = _number(item["score"])
            else:
                rank = float(-i)
            if text is None or rank is None:
                ctx.invalid(
                    record.location,
                    f"responses[{i}] needs a text field (one of {_TEXT_KEYS}) and a numeric 'rank' (1 = best) or "
                    f"'score' (higher = better), or none of them for a best-first list; got {item!r:.80}.",
                    "bad_field",
                )
                ok = False
                break
            scored.append((text, rank))
        if ok:
            extra = {"id": value["id"]} if "id" in value else {}
            ranking_rows(value["prompt"], scored, record.location, ctx, higher_is_better=higher, extra=extra)


def _convert_ultrafeedback(records: Iterable[Record], ctx: _Context) -> None:
    key = ctx.options.score_key
    for record in records:
        if not _require(record, ctx, "instruction", "completions") or not ctx.new_id(record):
            continue
        completions = record.value["completions"]
        if not isinstance(completions, list):
            ctx.invalid(record.location, "'completions' must be a list.", "bad_field")
            continue
        scored, ok = [], True
        for i, completion in enumerate(completions):
            score = _number(completion.get(key)) if isinstance(completion, Mapping) else None
            text = completion.get("response") if isinstance(completion, Mapping) else None
            if not isinstance(text, str) or score is None:
                got = completion.get(key) if isinstance(completion, Mapping) else completion
                ctx.invalid(
                    record.location,
                    f"completions[{i}] needs a 'response' string and a numeric {key!r} (got {got!r:.40}); choose "
                    "another score with score_key= (--score-key), e.g. 'overall_score'.",
                    "bad_field",
                )
                ok = False
                break
            scored.append((text, score))
        if ok:
            extra = {"source": record.value["source"]} if "source" in record.value else {}
            ranking_rows(record.value["instruction"], scored, record.location, ctx, extra=extra)


# ---------------------------------------------------------------------------------------------------- HH-RLHF
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as a message list.

    >>> parse_hh_dialogue("\\n\\nHuman: Hi\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first 'Human:' turn: {parts[0]!r:.60}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]


def _convert_hh(records: Iterable[Record], ctx: _Context) -> None:
    seen: set[tuple[str, str]] = set()
    for record in records:
        if not _require(record, ctx, "chosen") or not ctx.new_id(record):
            continue
        chosen = record.value["chosen"]
        if not isinstance(chosen, str):
            ctx.invalid(record.location, f"'chosen' must be an HH transcript string, got {type(chosen).__name__}.",
                        "bad_field")  # fmt: skip
            continue
        try:
            messages = parse_hh_dialogue(chosen)
        except ValueError as e:
            ctx.invalid(record.location, f"'chosen' is not an HH transcript ({e}).", "bad_field")
            continue
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            ctx.invalid(record.location, "'chosen' must end with a Human turn followed by an Assistant turn.",
                        "bad_field")  # fmt: skip
            continue
        reference = messages[-1]["content"].strip()
        if not reference:
            ctx.invalid(record.location, "the last Assistant turn of 'chosen' is empty: no reference to use.",
                        "empty_reference")  # fmt: skip
            continue
        prompt = messages[:-1]
        key = (json.dumps(prompt), reference)
        if key in seen:
            ctx.counts["duplicate_rows_removed"] += 1
            continue
        seen.add(key)
        ctx.result.rows.append({"prompt": prompt, "reference": reference})
        ctx.counts["rl_rows"] += 1


# -------------------------------------------------------------------------------------------------------- RMB
def _rmb_prompt(record: Record, ctx: _Context) -> list[dict[str, str]] | None:
    messages = record.value.get("conversation_input")
    if not isinstance(messages, list) or not messages:
        ctx.invalid(record.location, "'conversation_input' must be a non-empty message list.", "bad_field")
        return None
    try:
        flatten(messages, "conversation_input")
    except ValueError as e:
        ctx.invalid(record.location, str(e), "bad_field")
        return None
    # RMB messages also carry a 'language' key; keep what the chat format defines.
    return [{"role": m.get("role", "user"), "content": m["content"]} for m in messages]


def _answer(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("answer"), str):
        return value["answer"]
    return None


def _top(answers: dict[str, float | None], losers: set[str], location: str, ctx: _Context) -> str | None:
    """The top-ranked answer of one prompt: never beaten in any comparison; the highest score among such."""
    champions = [a for a in answers if a not in losers]
    if len(champions) > 1 and all(answers[a] is not None for a in champions):
        best = max(answers[a] for a in champions)
        champions = [a for a in champions if answers[a] == best]
    if len(champions) == 1:
        return champions[0]
    if not champions:
        ctx.invalid(location, "every answer of this prompt loses some comparison (the preferences form a cycle), so "
                    "there is no top-ranked answer to use as reference.", "no_top_answer")  # fmt: skip
        return None
    ctx.tie(location, f"{len(champions)} answers are never beaten and tie on score, so the reference is ambiguous.",
            "skipped_tie_at_top")  # fmt: skip
    return None


def _convert_rmb_pairwise(records: Iterable[Record], ctx: _Context) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if not _require(record, ctx, "conversation_input", "chosen", "reject") or not ctx.new_id(record):
            continue
        prompt = _rmb_prompt(record, ctx)
        chosen, rejected = _answer(record.value["chosen"]), _answer(record.value["reject"])
        if prompt is None:
            continue
        if chosen is None or rejected is None:
            ctx.invalid(record.location, "'chosen' and 'reject' must be objects with an 'answer' string.", "bad_field")
            continue
        group = groups.setdefault(json.dumps(prompt), {"prompt": prompt, "answers": {}, "losers": set(),
                                                       "pairs": [], "location": record.location})  # fmt: skip
        for side, text in (("chosen", chosen), ("reject", rejected)):
            score = _number(record.value[side].get("score"))
            group["answers"].setdefault(text, score)
        if chosen == rejected:
            ctx.counts["pairs_identical_answers_skipped"] += 1
            continue
        group["losers"].add(rejected)
        group["pairs"].append((record, chosen, rejected))
    for group in groups.values():
        reference = _top(group["answers"], group["losers"], group["location"], ctx)
        if reference is None:
            ctx.counts["pairs_of_skipped_prompts"] += len(group["pairs"])
            continue
        made = 0
        for record, chosen, rejected in group["pairs"]:
            if reference in (chosen, rejected):
                # With the top answer as reference, a pair that contains it cannot be judged (paper: 2nd vs 3rd).
                ctx.counts["pairs_containing_reference"] += 1
                continue
            ctx.result.rows.append({"prompt": group["prompt"], "reference": reference, "chosen": chosen,
                                    "rejected": rejected, **_rmb_extra(record, "pair_uid")})  # fmt: skip
            made += 1
        ctx.counts["triples"] += made
        if not made:
            ctx.counts["prompts_without_triples"] += 1


def _rmb_extra(record: Record, id_key: str) -> dict[str, Any]:
    extra = {}
    if id_key in record.value:
        extra["id"] = str(record.value[id_key])
    if "category_path" in record.value:
        extra["category"] = record.value["category_path"]
    return extra


def _convert_rmb_bon(records: Iterable[Record], ctx: _Context) -> None:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if not _require(record, ctx, "conversation_input", "bon_best", "loser_list") or not ctx.new_id(record):
            continue
        prompt = _rmb_prompt(record, ctx)
        best, raw_losers = _answer(record.value["bon_best"]), record.value["loser_list"]
        if prompt is None:
            continue
        losers = [_answer(x) for x in raw_losers] if isinstance(raw_losers, list) else None
        if best is None or not losers or any(x is None for x in losers):
            ctx.invalid(record.location, "'bon_best' must be an object with an 'answer' string and 'loser_list' a "
                        "non-empty list of such objects.", "bad_field")  # fmt: skip
            continue
        group = groups.setdefault(json.dumps(prompt), {"prompt": prompt, "answers": {}, "losers": set(),
                                                       "records": [], "location": record.location})  # fmt: skip
        for text in [best, *losers]:
            group["answers"].setdefault(text, None)
        group["losers"].update(x for x in losers if x != best)
        group["records"].append((record, best, [x for x in losers if x != best]))
    for group in groups.values():
        reference = _top(group["answers"], group["losers"], group["location"], ctx)
        if reference is None:
            ctx.counts["records_of_skipped_prompts"] += len(group["records"])
            continue
        for record, best, losers in group["records"]:
            if best == reference:
                # The reference itself is this record's winner: nothing left to judge against it.
                ctx.counts["records_best_is_reference"] += 1
                continue
            # Only the first candidate's place is meaningful: it beat each of the others, which are not ordered.
            ctx.result.rows.append({"prompt": group["prompt"], "reference": reference, "candidates": [best, *losers],
                                    **_rmb_extra(record, "bon_uid")})  # fmt: skip
            ctx.counts["bon_rows"] += 1


# -------------------------------------------------------------------------------------------- TRL preference
def _split_implicit(chosen: list, rejected: list) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _convert_trl(records: Iterable[Record], ctx: _Context) -> None:
    column = ctx.options.reference_column
    checked_columns = False
    for record in records:
        value = record.value
        if not checked_columns:
            checked_columns = True
            if column not in value:
                # The whole dataset lacks the column: one clear error, not one per row.
                raise DataError(
                    f"{record.location}: no reference column {column!r} (the record has {sorted(value)}). POLAR "
                    "scores a candidate against a reference answer: add one (e.g. a strong model's answer) and name "
                    "it with reference_column= (--reference-column). Using 'chosen' as the reference would leak the "
                    "label."
                )
        if not _require(record, ctx, "chosen", "rejected", column) or not ctx.new_id(record):
            continue
        chosen, rejected, reference = value["chosen"], value["rejected"], value[column]
        if not _text_ok(reference):
            ctx.invalid(record.location, f"column {column!r} must be a non-empty string or message list.",
                        "empty_reference")  # fmt: skip
            continue
        if "prompt" in value and value["prompt"] is not None:
            prompt = value["prompt"]
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
            if not prompt:
                ctx.invalid(record.location, "implicit-prompt rows must share their first messages (the prompt).",
                            "bad_field")  # fmt: skip
                continue
        else:
            ctx.invalid(record.location, "rows without a 'prompt' column must be conversational (message lists) so "
                        "the prompt can be split off; add an explicit 'prompt' column.", "missing_field")  # fmt: skip
            continue
        if not _text_ok(chosen) or not _text_ok(rejected):
            ctx.invalid(record.location, "'chosen' and 'rejected' must be non-empty.", "empty_response")
            continue
        if _key(chosen) == _key(rejected):
            ctx.counts["pairs_identical_answers_skipped"] += 1
            continue
        row = {"prompt": prompt, "reference": reference, "chosen": chosen, "rejected": rejected}
        for name in ("margin", "id", "prompt_id"):
            if name in value:
                row[name] = value[name]
        ctx.result.rows.append(row)
        ctx.counts["triples"] += 1


# ------------------------------------------------------------------------------------------------ public API
_FORMATS: dict[str, tuple[Callable[[Iterable[Record], _Context], None], str | None]] = {
    "ranked": (_convert_ranked, "id"),
    "ultrafeedback": (_convert_ultrafeedback, "id"),
    "hh-rlhf": (_convert_hh, "id"),
    "rmb-pairwise": (_convert_rmb_pairwise, "pair_uid"),
    "rmb-bon": (_convert_rmb_bon, "bon_uid"),
    "trl": (_convert_trl, "id"),
}
FORMATS = tuple(_FORMATS)


def convert(fmt: str, sources: Any, options: ConvertOptions | None = None, **kwargs: Any) -> ConversionResult:
    """Convert records of a public format to POLAR rows.

    Args:
        fmt: one of ``FORMATS``: "ranked" (``prompt`` + ``responses`` best first, or with ``rank``/``score``),
            "ultrafeedback" (``instruction`` + ``completions`` with scores), "hh-rlhf" (``chosen``/``rejected``
            transcripts -> RL prompts whose reference is chosen's last Assistant turn), "rmb-pairwise" and "rmb-bon"
            (RMB's JSON files; reference = the top-ranked answer of each prompt, as the paper evaluates), "trl"
            (TRL preference rows plus a reference column).
        sources: a file path (.jsonl/.json/.parquet), a list of paths, or an in-memory dataset / list of dicts.
        options: a `ConvertOptions`; keyword arguments override its fields.

    Example::

        result = convert("ultrafeedback", "ultrafeedback.jsonl", ties="skip")
        result.rows       # triples: prompt, reference, chosen, rejected
        result.listwise   # prompt, reference, candidates (best first)
        result.counts     # what was produced and what was skipped, by reason
    """
    if fmt not in _FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
    options = ConvertOptions(**{**(options.__dict__ if options else {}), **kwargs})
    function, id_field = _FORMATS[fmt]
    ctx = _Context(options, id_field)
    ctx.result = ConversionResult(counts=ctx.counts)
    function(_records(sources, ctx), ctx)
    skipped = {k: v for k, v in ctx.counts.items() if "skipped" in k or "removed" in k or "containing" in k}
    if skipped:
        logger.warning("%s conversion skipped: %s", fmt, skipped)
    logger.info("%s conversion: %s", fmt, dict(ctx.counts))
    return ctx.result
