"""A shared prefix once, then its branches, under a token budget: the one packer of the collator and the scorer.

POLAR sequences come in *groups* that share a prompt and a reference: the chosen/rejected pair (or a ranking) of a
training row, the G completions of a GRPO group at scoring time. Every sequence of a group starts with the same
``BOS P \\n REF <|reward|> P \\n`` tokens, so a group is laid out as that common prefix once and then each
sequence's own tokens (its *branch*), whose positions continue from the prefix. A branch always keeps at least one
token: the reward token, whose hidden state the value head reads, sits in the branch.

A `Unit` is what is placed whole: one prefix and some branches of its group (a group larger than the budget is cut
into several units, each carrying the prefix). Units are filled greedily into rows (`pack_summed`); `lay_out` turns
a row of units into token ids, position ids, the segments that segment attention runs, and where each sequence's
reward token is read.

Example: two sequences sharing ``[1, 2, 3]`` become the prefix once and two branches.

>>> seqs = [[1, 2, 3, 7, 8], [1, 2, 3, 9]]
>>> row = lay_out(seqs, group_units(seqs, [0, 1]))
>>> row.input_ids, row.position_ids, row.reads
([1, 2, 3, 7, 8, 9], [0, 1, 2, 3, 4, 3], [4, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .segment_attention import Segment
from .template import common_prefix_length


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens a group computes once: the common prefix, leaving every branch at least its last token.

    >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 3]])
    2
    """
    return min(common_prefix_length(*sequences), min(len(s) for s in sequences) - 1)


@dataclass(frozen=True)
class Unit:
    """``prefix`` tokens shared by the sequences ``members`` (indices into the caller's list), placed whole.

    ``prefix == 0`` lays every member out whole and alone.
    """

    prefix: int
    members: tuple[int, ...]

    def tokens(self, sequences: Sequence[Sequence[int]]) -> int:
        """Real tokens the unit puts in a row: the prefix once and every member's branch."""
        return self.prefix + sum(len(sequences[i]) - self.prefix for i in self.members)


def pack_summed(order: Iterable[int], length_of: Callable[[int], int], budget: int | None) -> Iterable[list[int]]:
    """Greedy chunks, in ``order``, whose lengths sum to at most ``budget``; an item longer than it goes alone, and
    ``budget=None`` puts every item in a chunk of its own.

    >>> list(pack_summed(range(4), [3, 3, 5, 1].__getitem__, 6))
    [[0, 1], [2, 3]]
    """
    chunk: list[int] = []
    total = 0
    for i in order:
        length = length_of(i)
        if chunk and (budget is None or total + length > budget):
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += length
    if chunk:
        yield chunk


def pack_padded(order: Iterable[int], length_of: Callable[[int], int], budget: int) -> Iterable[tuple[list[int], int]]:
    """Greedy right-padded batches of items sorted longest first: rows x padded length <= ``budget``. Yields each
    batch with its padded length.

    >>> list(pack_padded([0, 1, 2], [4, 3, 3].__getitem__, 8))
    [([0, 1], 4), ([2], 3)]
    """
    chunk: list[int] = []
    longest = 0
    for i in order:
        length = length_of(i)
        new_longest = max(longest, length)
        if chunk and (len(chunk) + 1) * new_longest > budget:
            yield chunk, longest
            chunk, new_longest = [], length
        chunk.append(i)
        longest = new_longest
    if chunk:
        yield chunk, longest


def group_units(
    sequences: Sequence[Sequence[int]],
    members: Sequence[int],
    *,
    budget: int | None = None,
    min_prefix: int = 1,
    shared: bool = True,
) -> list[Unit]:
    """One group's units: its prefix once with branches summing to at most ``budget`` tokens per unit (None: all
    branches in one unit). A group whose prefix is shorter than ``min_prefix`` (or ``shared=False``) keeps every
    member whole: one unit without prefix, or one unit per member when a budget is given.

    >>> seqs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]
    >>> group_units(seqs, [0, 1, 2], budget=6)
    [Unit(prefix=2, members=(1,)), Unit(prefix=2, members=(0, 2))]
    """
    members = list(members)
    prefix = shared_prefix_length([sequences[i] for i in members]) if shared and len(members) > 1 else 0
    if prefix < min_prefix:
        if budget is None:
            return [Unit(0, tuple(members))]
        return [Unit(0, (i,)) for i in members]
    if budget is None:
        return [Unit(prefix, tuple(members))]
    members.sort(key=lambda i: len(sequences[i]), reverse=True)
    chunks = pack_summed(members, lambda i: len(sequences[i]) - prefix, budget - prefix)
    return [Unit(prefix, tuple(chunk)) for chunk in chunks]


@dataclass(frozen=True)
class RowLayout:
    """One row of units: its token ids and position ids, the segments segment attention runs, and for every
    member (in the units' order) the row position of its last token, where its reward is read."""

    input_ids: list[int]
    position_ids: list[int]
    segments: list[Segment]
    reads: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def lay_out(sequences: Sequence[Sequence[int]], units: Sequence[Unit]) -> RowLayout:
    """Lay ``units`` out in one row, in order: each prefix once, then its members' branches."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    reads: list[int] = []
    for unit in units:
        context = len(ids)
        if unit.prefix:
            segments.append(Segment(context, unit.prefix))
            ids.extend(sequences[unit.members[0]][: unit.prefix])
            positions.extend(range(unit.prefix))
        for i in unit.members:
            seq = sequences[i]
            segments.append(Segment(len(ids), len(seq) - unit.prefix, context, unit.prefix))
            ids.extend(seq[unit.prefix :])
            positions.extend(range(unit.prefix, len(seq)))
            reads.append(len(ids) - 1)
    return RowLayout(ids, positions, segments, reads)
