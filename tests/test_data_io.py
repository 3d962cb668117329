"""The one JSON / JSON Lines reader: records with their 1-based lines, and one-line errors naming file:line."""

from __future__ import annotations

from collections import Counter

import pytest

from trl_polar.data.io import DataError, iter_json_records, read_records, read_row


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_records_carry_their_lines_in_json_lines_and_json_arrays(tmp_path):
    jsonl = _write(tmp_path, "a.jsonl", b'{"a": 1}\n\n{"b": 2}\n')
    counts = Counter()
    assert list(iter_json_records(jsonl, counts=counts)) == [(1, {"a": 1}), (3, {"b": 2})]
    assert counts["blank_lines"] == 1
    array = _write(tmp_path, "a.json", b'[\n  {"a": 1},\n\n  {"b": 2}\n]\n')
    assert list(iter_json_records(array)) == [(2, {"a": 1}), (4, {"b": 2})]
    assert list(iter_json_records(_write(tmp_path, "one.json", b'{\n "a": 1\n}\n'))) == [(1, {"a": 1})]
    assert list(iter_json_records(_write(tmp_path, "lines.json", b'{"a": 1}\n{"b": 2}\n'))) == [
        (1, {"a": 1}),
        (2, {"b": 2}),
    ]
    assert [r.location for r in read_records(array)] == [f"{array}:2", f"{array}:4"]
    assert read_row(array, 1) == {"b": 2}
    with pytest.raises(DataError, match=r"a.json: has no row at index 2 \(it has 2 rows, at indices 0 to 1\)\.$"):
        read_row(array, 2)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "broken.jsonl",
            b'{"a": 1}\n{"b":\n',
            r"broken.jsonl:2: not valid JSON \(Expecting value at column 1\)",
        ),
        ("list.jsonl", b'{"a": 1}\n[1, 2]\n', r"list.jsonl:2: expected a JSON object .* got list"),
        (
            "latin1.jsonl",
            b'{"a": 1}\n{"a": "caf\xe9"}\n',
            r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 11",
        ),
        ("latin1.json", b'[{"a": 1},\n {"a": "caf\xe9"}]', r"latin1.json:2: not UTF-8 text .* Save the file as UTF-8"),
        ("broken.json", b'[\n {"a": 1},\n {"b": 2\n]\n', r"broken.json:4: not valid JSON .*use \.jsonl"),
        ("empty.jsonl", b"\n\n", r"empty.jsonl: the file holds no records\. Write one JSON object per line"),
        ("empty.json", b"[]", r"empty.json: the file holds no records"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, name, data, message):
    path = _write(tmp_path, name, data)
    with pytest.raises(DataError, match=message) as error:
        list(iter_json_records(path))
    assert "\n" not in str(error.value)
    assert "--skip-invalid" not in str(error.value)  # this caller offers no skipping
    with pytest.raises(DataError, match=message):
        list(read_records(path))  # the conversion path reads through the same reader


def test_skip_invalid_skips_and_counts_bad_lines_by_reason(tmp_path):
    path = _write(tmp_path, "mixed.jsonl", b'{"a": 1}\n{"b":\n[3]\n{"c": "\xff"}\n{"d": 4}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2: .* or pass skip_invalid=True \(--skip-invalid\)"):
        list(iter_json_records(path, skip_invalid=False))
    counts = Counter()
    assert [line for line, _ in iter_json_records(path, skip_invalid=True, counts=counts)] == [1, 5]
    assert counts == Counter(skipped_invalid_json=1, skipped_not_an_object=1, skipped_not_utf8=1)
