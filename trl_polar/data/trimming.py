"""Cleaning sampled trajectories as the paper does (App. D.1.1).

- Repetition loops are cut short but kept: a loop-prone policy should still look loop-prone to the discriminator,
  so the trajectory keeps the start of the loop (a couple of repetitions) instead of being dropped.
- Incomplete endings (the sample hit the token limit mid-sentence) are cut back to the last sentence or line end,
  so each trajectory is self-contained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A sentence or line ends at one of these (ASCII and CJK full stops), optionally followed by closing quotes/brackets.
_SENTENCE_END = re.compile(r"[.!?。！？…\n][\"'”’)\]]*(?=\s|$)|[。！？\n]")


@dataclass(frozen=True)
class Loop:
    """A run of ``repeats`` consecutive copies of a ``period``-token block starting at token ``start``."""

    start: int
    period: int
    repeats: int


def find_loop(ids: Sequence[int], max_period: int = 128, min_repeats: int = 4, min_tokens: int = 32) -> Loop | None:
    """The earliest repetition loop in ``ids``: a block of 1..max_period tokens repeated at least ``min_repeats``
    times in a row, covering at least ``min_tokens`` tokens. None when there is none.

    >>> find_loop([5, 6] + [1, 2, 3] * 12, min_tokens=9)
    Loop(start=2, period=3, repeats=12)
    """
    a = np.asarray(ids, dtype=np.int64)
    n = len(a)
    best: Loop | None = None
    for period in range(1, min(max_period, n // 2) + 1):
        # eq[j] says token j equals token j + period; a run of L such positions starting at s means tokens
        # s .. s+L+period-1 repeat with this period, i.e. (L + period) // period full copies of the block.
        eq = a[:-period] == a[period:]
        if not eq.any():
            continue
        padded = np.concatenate(([False], eq, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        starts, ends = edges[0::2], edges[1::2]
        lengths = ends - starts
        repeats = (lengths + period) // period
        ok = (repeats >= min_repeats) & (repeats * period >= min_tokens)
        if not ok.any():
            continue
        i = int(np.flatnonzero(ok)[0])
        candidate = Loop(int(starts[i]), period, int(repeats[i]))
        # Prefer the earliest loop; at equal starts the shortest period (a loop of period p also repeats at 2p).
        if best is None or candidate.start < best.start:
            best = candidate
    return best


def trim_loop(
    ids: Sequence[int], keep_repeats: int = 2, max_period: int = 128, min_repeats: int = 4, min_tokens: int = 32
) -> tuple[list[int], bool]:
    """``ids`` cut after ``keep_repeats`` copies of the first loop's block, and whether a loop was found.

    >>> trim_loop([9] + [1, 2] * 20, keep_repeats=2, min_tokens=8)
    ([9, 1, 2, 1, 2], True)
    """
    loop = find_loop(ids, max_period=max_period, min_repeats=min_repeats, min_tokens=min_tokens)
    if loop is None:
        return list(ids), False
    return list(ids[: loop.start + keep_repeats * loop.period]), True


def trim_incomplete_ending(text: str) -> tuple[str, bool]:
    """``text`` cut after its last sentence or line end, and whether that worked.

    Returns the text unchanged and False when it has no sentence end at all (one long unfinished sentence);
    the caller decides whether to keep or drop such a trajectory.

    >>> trim_incomplete_ending("One. Two! Three is cut")
    ('One. Two!', True)
    """
    matches = list(_SENTENCE_END.finditer(text))
    last = matches[-1] if matches else None
    if last is None or not text[: last.end()].strip():
        return text, False
    return text[: last.end()].rstrip(), True
