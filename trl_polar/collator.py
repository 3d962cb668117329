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
- ``shared_prefix``: the whole batch as ONE unpadded row (``(1, tokens)``): per group its common prefix once, then
  each sequence's own tokens (its branch; every branch keeps at least one token), branch position ids continuing
  from the prefix end (`trl_polar.packing`). ``segments`` ``(S, 4)`` lists each run of tokens as (start, length,
  context start, context length): what segment attention needs to let every branch attend to its prefix and itself.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import torch
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .config import BATCHING_MODES
from .packing import group_units, lay_out, pack_summed

PAIR_COLUMNS = ("chosen_ids", "rejected_ids")
RANKING_COLUMN = "candidates_ids"


def group_sequences(example: dict[str, Any], position: int = 0) -> list[list[int]]:
    """The token sequences of one row, best first; ``position`` (the row's index in its batch) names it in errors."""
    if RANKING_COLUMN in example and example[RANKING_COLUMN] is not None:
        column, sequences = f"`{RANKING_COLUMN}`", [list(s) for s in example[RANKING_COLUMN]]
    else:
        column = f"`{PAIR_COLUMNS[0]}`/`{PAIR_COLUMNS[1]}`"
        sequences = [list(example[PAIR_COLUMNS[0]]), list(example[PAIR_COLUMNS[1]])]
    if len(sequences) < 2 or any(len(s) == 0 for s in sequences):
        raise ValueError(
            f"Batch row at index {position}, column {column}: a row needs at least 2 non-empty token sequences (a "
            f"listwise row at least 2 candidates), got lengths {[len(s) for s in sequences]}. Drop such rows (e.g. "
            "dataset.filter(lambda row: len(row['candidates']) >= 2)) or tokenize text rows with the trainer, "
            "which names the dataset row."
        )
    return sequences


@dataclass
class PolarDataCollator(DataCollatorForPreference):
    """Collates tokenized POLAR rows for `PolarRewardTrainer` (see the module docstring for the layouts).

    Args:
        pad_token_id: id used to pad rows.
        pad_to_multiple_of: pad row lengths to a multiple of this (padded layout only, as TRL).
        batching: "padded", "packed" or "shared_prefix".
        max_row_length: most tokens per packed row, filled greedily (a group that is longer gets its own row); None
            puts each group in a row of its own, the fastest choice for sdpa and eager attention, whose cost grows
            with the square of the row length. A shared-prefix batch is always one row.
        segment_attention: lay "packed" batches out as one unpadded row with ``segments``, as "shared_prefix" but
            without sharing prefixes, for segment attention to run (the trainer sets it on CUDA, where segment
            attention's flex kernel needs no mask; sdpa would build a dense one for packed rows).

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
    segment_attention: bool = False

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"`batching` must be one of {list(BATCHING_MODES)}, got {self.batching!r}.")
        if self.max_row_length is not None and self.max_row_length <= 0:
            raise ValueError(f"`max_row_length` must be positive or None, got {self.max_row_length}.")

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        groups = [group_sequences(example, i) for i, example in enumerate(examples)]
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
        sequences = [seq for group in groups for seq in group]
        index = torch.full((len(groups), max(len(g) for g in groups)), -1, dtype=torch.long)
        units, start = [], 0
        for g, group in enumerate(groups):
            members = range(start, start + len(group))
            units.extend(group_units(sequences, members, shared=shared))
            index[g, : len(group)] = torch.as_tensor(members)
            start += len(group)
        one_row = shared or self.segment_attention
        if one_row:
            # Segment attention keeps every branch to its prefix and itself, so the whole batch is one row: no
            # padding, and a row's length costs nothing by itself.
            rows = [lay_out(sequences, units)]
        else:
            # A group never straddles two rows; sdpa and eager pay for a row's length squared.
            chunks = pack_summed(range(len(units)), lambda u: units[u].tokens(sequences), self.max_row_length)
            rows = [lay_out(sequences, [units[u] for u in chunk]) for chunk in chunks]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        # Padding positions restart at 0, so packed-sequence detection sees the padding as one more sequence.
        position_ids = torch.arange(width).repeat(len(rows), 1)
        reads = []
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row.input_ids, dtype=torch.long)
            position_ids[r, : len(row)] = torch.tensor(row.position_ids, dtype=torch.long)
            position_ids[r, len(row) :] = torch.arange(width - len(row))
            reads.extend(r * width + read for read in row.reads)
        output = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "reward_positions": torch.tensor(reads, dtype=torch.long),
            "candidate_index": index,
        }
        if one_row:
            output["segments"] = torch.tensor([astuple(s) for s in rows[0].segments], dtype=torch.long)
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
