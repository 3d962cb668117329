"""PolarDataCollator layouts: every sequence is reconstructible, and padded is TRL's own output."""

from __future__ import annotations

import random

import pytest
import torch
from trl.trainer.reward_trainer import DataCollatorForPreference

from trl_polar.collator import PolarDataCollator
from trl_polar.packing import shared_prefix_length


def _rows(n=5, seed=0, k=None):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prefix = [1] + [rng.randint(3, 50) for _ in range(rng.randint(3, 20))]
        seqs = [prefix + [rng.randint(3, 50) for _ in range(rng.randint(1, 25))] + [99] for _ in range(k or 2)]
        if k:
            rows.append({"candidates_ids": seqs[: 2 + i % (k - 1)], "truncated": i % 2})
        else:
            rows.append({"chosen_ids": seqs[0], "rejected_ids": seqs[1], "margin": float(i), "truncated": 0})
    return rows


def _sequences(rows):
    return [r["candidates_ids"] if "candidates_ids" in r else [r["chosen_ids"], r["rejected_ids"]] for r in rows]


def _visible_sequence(batch, flat_position):
    """The tokens the reward position attends to, in order: what the model effectively reads for this sequence."""
    width = batch["input_ids"].shape[1]
    row, col = divmod(int(flat_position), width)
    if "segments" not in batch:  # packed: positions restart at 0 with each sequence
        start = col - int(batch["position_ids"][row, col])
        return batch["input_ids"][row, start : col + 1].tolist(), batch["position_ids"][row, start : col + 1].tolist()
    # shared prefix: one row; the segment's context, then the segment itself up to here
    assert row == 0
    start, _, context_start, context_length = next(s for s in batch["segments"].tolist() if s[0] <= col < s[0] + s[1])
    seen = list(range(context_start, context_start + context_length)) + list(range(start, col + 1))
    return batch["input_ids"][0, seen].tolist(), batch["position_ids"][0, seen].tolist()


def test_padded_pairs_are_trls_layout():
    rows = _rows()
    ours = PolarDataCollator(pad_token_id=0, batching="padded")(rows)
    trl = DataCollatorForPreference(pad_token_id=0)(
        [{k: r[k] for k in ("chosen_ids", "rejected_ids", "margin")} for r in rows]
    )
    for key in ("input_ids", "attention_mask", "margin"):
        torch.testing.assert_close(ours[key], trl[key])
    assert ours["candidate_index"].tolist() == [[i, i + 5] for i in range(5)]
    assert ours["truncated"].dtype == torch.bool


@pytest.mark.parametrize("batching", ["packed", "shared_prefix"])
@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("max_row_length", [None, 200])
def test_every_sequence_is_read_exactly(batching, k, max_row_length):
    rows = _rows(6, seed=1, k=k)
    batch = PolarDataCollator(pad_token_id=0, batching=batching, max_row_length=max_row_length)(rows)
    for g, seqs in enumerate(_sequences(rows)):
        for rank, seq in enumerate(seqs):
            slot = batch["candidate_index"][g, rank]
            ids, positions = _visible_sequence(batch, batch["reward_positions"][slot])
            assert ids == seq and positions == list(range(len(seq)))
        assert (batch["candidate_index"][g, len(seqs) :] == -1).all()
    total = sum(len(s) for seqs in _sequences(rows) for s in seqs)
    assert batch["sequence_tokens"].sum().item() == total
    rows_used = batch["input_ids"].shape[0]
    if batching == "shared_prefix":
        assert rows_used == 1  # the whole batch, unpadded
    elif max_row_length is None:
        assert rows_used == 6  # one group per row
    else:
        assert rows_used < 6  # groups share rows within the budget
        width = batch["input_ids"].shape[1]
        real = {}  # real tokens per row: rows are filled from the left, their last reward token ends them
        for position in batch["reward_positions"].tolist():
            r, c = divmod(position, width)
            real[r] = max(real.get(r, 0), c + 1)
        assert max(real.values()) <= max_row_length or rows_used == 6


def test_shared_prefix_computes_the_prefix_once():
    rows = _rows(4, seed=2)
    batch = PolarDataCollator(pad_token_id=0, batching="shared_prefix")(rows)
    unique = sum(shared_prefix_length(s) + sum(len(x) - shared_prefix_length(s) for x in s) for s in _sequences(rows))
    assert batch["input_ids"].numel() == unique  # one row, no padding
    assert unique < batch["sequence_tokens"].sum().item()


def test_branch_keeps_a_token_when_one_sequence_is_a_prefix_of_the_other():
    batch = PolarDataCollator(pad_token_id=0, batching="shared_prefix")(
        [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 3, 4]}]
    )
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert batch["input_ids"].tolist() == [[1, 2, 3, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3]]


def test_margin_must_be_everywhere():
    with pytest.raises(ValueError, match="margin"):
        PolarDataCollator(pad_token_id=0)(
            [
                {"chosen_ids": [1, 2], "rejected_ids": [1, 3], "margin": 1.0},
                {"chosen_ids": [1, 2], "rejected_ids": [1, 3], "margin": None},
            ]
        )


def test_unknown_batching_is_rejected():
    with pytest.raises(ValueError, match="batching"):
        PolarDataCollator(pad_token_id=0, batching="ragged")
