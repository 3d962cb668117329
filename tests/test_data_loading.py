"""Loading training data: files, build-data runs (through their store) and one-line errors for bad files."""

from __future__ import annotations

import json

import pytest

from trl_polar.data.io import DataError, write_rows
from trl_polar.data.loading import load_preference_dataset
from trl_polar.data.synthesis.store import RunStore

ROW = {"prompt": "p", "reference": "r", "chosen": "c", "rejected": "x"}


def test_a_broken_line_and_an_empty_file_are_one_line_errors_with_file_and_line(tmp_path):
    broken = tmp_path / "train.jsonl"
    broken.write_text(json.dumps(ROW) + "\n" + '{"prompt": "p", "reference": \n')
    with pytest.raises(
        DataError, match=r"train.jsonl:2: not valid JSON \(Expecting value at column \d+\)\. Fix the line"
    ):
        load_preference_dataset(str(broken))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: the file holds no records\. Write one JSON object per line"):
        load_preference_dataset(str(empty))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"latin.json:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_preference_dataset(str(latin))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROW) + "\n")
    assert load_preference_dataset(str(good))[0] == ROW


def test_a_build_data_run_is_read_through_its_store(tmp_path):
    store = RunStore(tmp_path / "run", "jsonl")
    store.directory.mkdir()
    store.write_shard(0, [ROW], {"triples": 1})
    store.write_manifest(2)
    with pytest.raises(DataError, match=r"unfinished build-data run \(1 of 2 shards\); run the same build-data"):
        load_preference_dataset(str(store.directory))
    store.write_shard(1, [{**ROW, "prompt": "q"}], {"triples": 1})
    store.write_manifest(2)
    assert load_preference_dataset(str(store.directory))["prompt"] == ["p", "q"]
    write_rows([ROW], tmp_path / "run" / "stray.jsonl")  # not listed in the manifest: not read
    assert len(load_preference_dataset(str(store.directory))) == 2
