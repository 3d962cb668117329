"""Converters of public preference formats into POLAR rows.

Outputs (strings or message lists, as the input had them):

- triples: ``prompt, reference, chosen, rejected`` (plus ``id``/``category`` where the input has them), the
  pairwise rows `PolarRewardTrainer` and the evaluation read;
- listwise rows: ``prompt, reference, candidates`` (best first, k >= 2), for the listwise loss;
- RL rows (HH-RLHF): ``prompt, reference``, for a GRPO/RLOO dataset with a ``reference`` column;

In a k-way ranking the best response becomes the reference (as in POLAR's fine-tuning: rank 1 = reference,
rank 2 = chosen, rank 3 = rejected) and every ordered pair of the rest becomes a triple.

Nothing is dropped silently: every skipped record or pair is counted in ``ConversionResult.counts`` and logged;
a bad record is an error naming its file and line unless ``skip_invalid`` is set. A new format is one function
``(records, conversion) -> None`` registered in ``_FORMATS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..io import Record
from .base import PAIRS, TIES, Conversion, ConversionResult, ConvertOptions
from .helpsteer3 import convert_helpsteer3
from .judgebench import convert_judgebench
from .ppe import convert_ppe
from .preference import convert_hh, convert_trl, parse_hh_dialogue
from .ranked import add_ranking, convert_ranked, convert_ultrafeedback
from .rewardbench2 import convert_rewardbench2
from .rmb import convert_rmb
from .rmbench import convert_rmbench

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "PAIRS",
    "TIES",
    "Conversion",
    "ConversionResult",
    "ConvertOptions",
    "add_ranking",
    "convert",
    "parse_hh_dialogue",
]

_FORMATS: dict[str, tuple[Callable[[Iterable[Record], Conversion], None], str | None]] = {
    "ranked": (convert_ranked, "id"),
    "ultrafeedback": (convert_ultrafeedback, "id"),
    "hh-rlhf": (convert_hh, "id"),
    # RMB's pairwise and BoN records carry different ids (pair_uid, bon_uid); the converter checks each.
    "rmb": (convert_rmb, None),
    "trl": (convert_trl, "id"),
    # Benchmarks (`trl_polar.benchmark_sets` evaluates them by their own rules); each needs references where it
    # has no gold answer.
    "rewardbench2": (convert_rewardbench2, "id"),
    "rm-bench": (convert_rmbench, None),
    "judgebench": (convert_judgebench, "pair_id"),
    "ppe": (convert_ppe, None),
    "helpsteer3": (convert_helpsteer3, None),
}
FORMATS = tuple(_FORMATS)
# Formats that were folded into another: their name says where to go.
_RENAMED = {
    "rmb-pairwise": "RMB's Pairwise_set and BoN_set files are read together by the 'rmb' format",
    "rmb-bon": "RMB's Pairwise_set and BoN_set files are read together by the 'rmb' format",
}


def convert(fmt: str, sources: Any, options: ConvertOptions | None = None, **kwargs: Any) -> ConversionResult:
    """Convert records of a public format to POLAR rows.

    Args:
        fmt: one of ``FORMATS``: "ranked" (``prompt`` + ``responses`` best first, or with ``rank``/``score``),
            "ultrafeedback" (``instruction`` + ``completions`` with scores), "hh-rlhf" (``chosen``/``rejected``
            transcripts -> RL prompts whose reference is chosen's last Assistant turn), "rmb" (RMB's
            Pairwise_set and BoN_set JSON files together, or their directory: a conversation's BoN best is the
            reference of its pairwise pairs; see `trl_polar.data.converters.rmb`), "trl"
            (TRL preference rows plus a reference column), and the benchmarks "rewardbench2", "rm-bench",
            "judgebench", "ppe", "helpsteer3" (`trl_polar.benchmark_sets` scores them; ``references=`` gives a
            reference per prompt where the set has no gold answer).
        sources: a file path (.jsonl/.json/.parquet), a directory (its files, recursively), a list of paths, or an
            in-memory dataset / list of dicts.
        options: a `ConvertOptions`; keyword arguments override its fields.

    Example::

        result = convert("ultrafeedback", "ultrafeedback.jsonl", ties="skip")
        result.rows       # triples: prompt, reference, chosen, rejected
        result.listwise   # prompt, reference, candidates (best first)
        result.counts     # what was produced and what was skipped, by reason
    """
    if fmt in _RENAMED:
        raise ValueError(f"Format {fmt!r} is gone: {_RENAMED[fmt]} (convert('rmb', 'RMB_dataset/')).")
    if fmt not in _FORMATS:
        raise ValueError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
    options = ConvertOptions(**{**(options.__dict__ if options else {}), **kwargs})
    function, id_field = _FORMATS[fmt]
    conversion = Conversion(options, id_field)
    function(conversion.records(sources), conversion)
    counts = conversion.counts
    skipped = {k: v for k, v in counts.items() if "skipped" in k or "removed" in k or "containing" in k}
    if skipped:
        logger.warning("%s conversion skipped: %s", fmt, skipped)
    logger.info("%s conversion: %s", fmt, dict(counts))
    return conversion.result
