"""`PolarDataCollator`: padded, packed and shared-prefix batches of POLAR preference rows.

A row is a *group* of token sequences that share one prompt and one reference: a pair (``chosen_ids``,
``rejected_ids``, TRL's columns) or a best-first ranking (``candidates_ids``). Every output carries
``candidate_index`` ``(groups, k)``: where each candidate's reward sits in the flat vector of rewards the model
produces for the batch (-1 where a ranking is shorter than the longest one in the batch). How that flat vector is
produced depends on the layout:

- ``padded``: TRL's layout: ``input_ids``/``attention_mask`` with one right-padded row per sequence, all first-ranked
  sequences first (for pairs: chosen rows, then rejected rows); reward i is the pooled logit of row i.
- ``packed``: sequences concatenated into rows with ``position_ids`` restarting at 0 per sequence and no attention
  mask; reward i is read at flat position ``reward_positions[i]`` of the ``(rows, length)`` grid.
- ``shared_prefix``: per group, ``[prefix, branch_1, ..., branch_k]`` where the prefix is the longest common prefix of
  the group's sequences (every branch keeps at least one token); branch position ids continue from the prefix end.
  ``segment_ids``/``prefix_ids`` describe which tokens may see which (-1 marks padding); the trainer runs the real
  tokens as one unpadded row through segment attention (`trl_polar.segment_attention.layout_from_segment_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .config import BATCHING_MODES
from .template import common_prefix_length

PAIR_COLUMNS = ("chosen_ids", "rejected_ids")
RANKING_COLUMN = "candidates_ids"


def group_sequences(example: dict[str, Any]) -> list[list[int]]:
    """The token sequences of one row, best first."""
    if RANKING_COLUMN in example and example[RANKING_COLUMN] is not None:
        sequences = [list(s) for s in example[RANKING_COLUMN]]
    else:
        sequences = [list(example[PAIR_COLUMNS[0]]), list(example[PAIR_COLUMNS[1]])]
    if len(sequences) < 2 or any(len(s) == 0 for s in sequences):
        raise ValueError(
            f"A row needs at least 2 non-empty token sequences, got lengths {[len(s) for s in sequences]}."
        )
    return sequences


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens computed once for a group: the common prefix, leaving every branch at least its last token.

    >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 3]])
    2
    """
    return min(common_prefix_length(*sequences), min(len(s) for s in sequences) - 1)


@dataclass
class PolarDataCollator(DataCollatorForPreference):
    """Collates tokenized POLAR rows for `PolarRewardTrainer` (see the module docstring for the layouts).

    Args:
        pad_token_id: id used to pad rows.
        pad_to_multiple_of: pad row lengths to a multiple of this (padded layout only, as TRL).
        batching: "padded", "packed" or "shared_prefix".
        max_row_length: most tokens per packed or shared-prefix row, filled greedily (a group that is longer gets
            its own row); None puts each group in a row of its own, the fastest choice for sdpa and eager attention,
            whose cost grows with the square of the row length.

    Example:

    >>> collator = PolarDataCollator(pad_token_id=0, batching="shared_prefix")
    >>> batch = collator([{"chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9]}])
    >>> batch["input_ids"].tolist(), batch["position_ids"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 3, 2]])
    >>> batch["reward_positions"].tolist(), batch["candidate_index"].tolist()
    ([3, 4], [[0, 1]])
    """

    batching: str = "padded"
    max_row_length: int | None = None

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"`batching` must be one of {list(BATCHING_MODES)}, got {self.batching!r}.")
        if self.max_row_length is not None and self.max_row_length <= 0:
            raise ValueError(f"`max_row_length` must be positive or None, got {self.max_row_length}.")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups = [group_sequences(example) for example in examples]
        if self.batching == "padded":
            output = self._padded(examples, groups)
        else:
            output = self._rows(groups, shared=self.batching == "shared_prefix")
        output.update(self._row_fields(examples, groups))
        return output

    # ------------------------------------------------------------------------------------------------- layouts
    def _padded(self, examples: list[dict[str, Any]], groups: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        k = max(len(g) for g in groups)
        if k == 2 and all(RANKING_COLUMN not in e or e[RANKING_COLUMN] is None for e in examples):
            # Pairs: exactly TRL's collator output, so the padded path is the reference the other layouts match.
            output = super().torch_call([{c: e[c] for c in PAIR_COLUMNS} for e in examples])
            n = len(groups)
            output["candidate_index"] = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1)
            return output
        rows, index = [], torch.full((len(groups), k), -1, dtype=torch.long)
        for rank in range(k):  # rank-major, which for k = 2 is TRL's chosen-then-rejected layout
            for g, group in enumerate(groups):
                if rank < len(group):
                    index[g, rank] = len(rows)
                    rows.append(torch.tensor(group[rank]))
        ids = pad(
            rows, padding_value=self.pad_token_id, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
        )
        mask = pad(
            [torch.ones_like(r) for r in rows],
            padding_value=0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return {"input_ids": ids, "attention_mask": mask, "candidate_index": index}

    def _rows(self, groups: list[list[list[int]]], shared: bool) -> dict[str, torch.Tensor]:
        # Each group becomes a list of (token ids, position ids, segment, prefix segment) pieces; rows are filled
        # greedily in batch order so that a group never straddles two rows.
        k = max(len(g) for g in groups)
        index = torch.full((len(groups), k), -1, dtype=torch.long)
        rows: list[list[tuple[list[int], list[int], int, int]]] = [[]]
        row_lengths = [0]
        ends: list[tuple[int, int]] = []  # (row, offset of the reward token within the row) per sequence
        next_segment = 0
        for g, group in enumerate(groups):
            p = shared_prefix_length(group) if shared else 0
            length = p + sum(len(s) - p for s in group)
            if row_lengths[-1] and (self.max_row_length is None or row_lengths[-1] + length > self.max_row_length):
                rows.append([])
                row_lengths.append(0)
            row, offset = rows[-1], row_lengths[-1]
            # Ids unique within the batch: the group's prefix is `segment`, its branches segment+1 .. segment+k.
            segment, next_segment = next_segment, next_segment + 1 + len(group)
            if shared and p:
                row.append((group[0][:p], list(range(p)), segment, segment))
                offset += p
            for rank, seq in enumerate(group):
                branch = seq[p:]
                own = segment + 1 + rank
                row.append((branch, list(range(p, len(seq))), own, segment if shared else own))
                offset += len(branch)
                index[g, rank] = len(ends)
                ends.append((len(rows) - 1, offset - 1))
            row_lengths[-1] = offset
        width = max(row_lengths)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        # Padding positions restart at 0, so packed-sequence detection sees the padding as one more sequence.
        position_ids = torch.arange(width).repeat(n, 1)
        segment_ids = torch.full((n, width), -1, dtype=torch.long)
        prefix_ids = torch.full((n, width), -1, dtype=torch.long)
        for r, pieces in enumerate(rows):
            start = 0
            for ids, positions, segment, prefix in pieces:
                stop = start + len(ids)
                input_ids[r, start:stop] = torch.tensor(ids, dtype=torch.long)
                position_ids[r, start:stop] = torch.tensor(positions, dtype=torch.long)
                segment_ids[r, start:stop] = segment
                prefix_ids[r, start:stop] = prefix
                start = stop
            position_ids[r, start:] = torch.arange(width - start)
        output = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "reward_positions": torch.tensor([r * width + o for r, o in ends], dtype=torch.long),
            "candidate_index": index,
        }
        if shared:
            output["prefix_ids"] = prefix_ids
        return output

    # ------------------------------------------------------------------------------------------ per-row fields
    @staticmethod
    def _row_fields(examples: list[dict[str, Any]], groups: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        output = {"sequence_tokens": torch.tensor([sum(len(s) for s in g) for g in groups], dtype=torch.long)}
        if "margin" in examples[0]:
            missing = [i for i, e in enumerate(examples) if e.get("margin") is None]
            if missing:
                raise ValueError(
                    f"The `margin` column is missing or None in batch rows {missing}; give every row a float margin "
                    "(0.0 for none) or drop the column."
                )
            output["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float)
        if "truncated" in examples[0]:
            output["truncated"] = torch.tensor([bool(e.get("truncated")) for e in examples], dtype=torch.bool)
        return output
