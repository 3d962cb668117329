"""Converters of public preference formats, on small samples written from each format's documented shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trl_polar import PolarTemplate, flatten
from trl_polar.cli import app
from trl_polar.data import DataError, convert, read_rows

DATA = Path(__file__).parent / "data"


def test_k_way_rankings_give_reference_best_and_all_pairs_below_it():
    result = convert("ranked", DATA / "ranked.jsonl")
    triples = [(r["id"], r["reference"], r["chosen"], r["rejected"]) for r in result.rows]
    assert triples == [
        ("r1", "Red.", "Red is a primary colour.", "Green?"),
        ("r1", "Red.", "Red is a primary colour.", "Purple."),
        ("r1", "Red.", "Green?", "Purple."),
        ("r2", "4", "It is 4.", "5"),  # explicit ranks, given out of order
        ("r3", "Paris.", "Paris, I think.", "Lyon."),  # scores, higher is better
    ]
    assert [(r["reference"], r["candidates"]) for r in result.listwise] == [
        ("Red.", ["Red is a primary colour.", "Green?", "Purple."]),
        ("4", ["It is 4.", "5"]),
        ("Paris.", ["Paris, I think.", "Lyon."]),
    ]
    assert result.counts["triples"] == 5 and result.counts["listwise_rows"] == 3
    adjacent = convert("ranked", DATA / "ranked.jsonl", pairs="adjacent")
    assert len(adjacent.rows) == 4  # r1 keeps 2nd>3rd and 3rd>4th only


def test_converted_rows_build_with_the_template(tiny_tokenizer):
    """The rows are what the trainer consumes: pairs and best-first rankings encode without change."""
    template = PolarTemplate(tiny_tokenizer, max_length=512, max_response_length=128)
    result = convert("ranked", DATA / "ranked.jsonl")
    for row in result.rows:
        pair = template.build_pair(row["prompt"], row["reference"], row["chosen"], row["rejected"])
        assert pair.chosen.input_ids[-1] == template.reward_token_id
    for row in result.listwise:
        assert len(template.build_ranking(row["prompt"], row["reference"], row["candidates"])) == len(
            row["candidates"]
        )


def test_ultrafeedback_ranks_by_score_and_ties_are_errors_or_counted():
    with pytest.raises(DataError, match=r"ultrafeedback.jsonl:2: responses below the best share a rank or score"):
        convert("ultrafeedback", DATA / "ultrafeedback.jsonl")
    result = convert("ultrafeedback", DATA / "ultrafeedback.jsonl", ties="skip")
    first = [r for r in result.rows if r["source"] == "evol_instruct"]
    assert len(first) == 3 and {r["reference"] for r in first} == {
        "Plants turn light, water and CO2 into sugar and oxygen."
    }
    second = [(r["chosen"], r["rejected"]) for r in result.rows if r["source"] == "flan_v2_niv2"]
    assert second == [("Good morning / hello.", "Goodbye."), ("Hi there.", "Goodbye.")]  # the 4.0 = 4.0 tie: no pair
    assert result.counts["tied_pairs_skipped"] == 1 and result.counts["listwise_skipped_ties"] == 1
    assert len(result.listwise) == 1
    overall = convert("ultrafeedback", DATA / "ultrafeedback.jsonl", ties="skip", score_key="overall_score")
    assert overall.counts["triples"] == 5
    with pytest.raises(DataError, match=r"completions\[0\] needs a 'response' string and a numeric 'missing'"):
        convert("ultrafeedback", DATA / "ultrafeedback.jsonl", score_key="missing")


def test_hh_rlhf_gives_rl_prompts_with_chosens_last_turn_as_reference():
    result = convert("hh-rlhf", DATA / "hh_rlhf.jsonl")
    assert result.rows == [
        {"prompt": [{"role": "user", "content": "What is a good name for a cat?"}],
         "reference": "Whiskers is a classic choice."},
        {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                    {"role": "user", "content": "Tell me a fun fact."}],
         "reference": "Octopuses have three hearts."},
    ]  # fmt: skip
    assert result.counts["duplicate_rows_removed"] == 1


RMB = DATA / "rmb"  # Pairwise_set/ and BoN_set/ as in Zhou-Zoey/RMB-Reward-Model-Benchmark's RMB_dataset/
EGG_ANSWERS = ["Simmer it for 9 minutes, then cool it in cold water.", "Boil water, add the egg, wait 8-10 minutes.",
               "Put it in water and heat it.", "Microwave it in its shell."]  # fmt: skip
ROME = ["Lunch in Trastevere, then the Pantheon.", "Eat near Campo de' Fiori, then the Pantheon.", "Eat somewhere.",
        "Rome is in Italy."]  # fmt: skip
RMB_COUNTS = {
    "pairwise_records_read": 14,
    "bon_records_read": 7,
    # pairs: rows + identical + no BoN best + containing the reference = 6 + 1 + 2 + 5 = 14
    "rows": 6,
    "pairs_skipped_identical_answers": 1,
    "pairs_skipped_no_bon_best": 2,
    "pairs_skipped_containing_reference": 5,
    # BoN records: the reference's + another best + no pairs to judge = 4 + 2 + 1 = 7
    "bon_records_reference": 4,
    "bon_records_other_best": 2,
    "bon_records_skipped_no_pairs": 1,
    "bon_losers_equal_to_best_removed": 1,
    "conversations": 6,
    "conversations_judged": 3,
    "conversations_all_pairs_contain_reference": 1,
    "conversations_without_pairs": 1,
    "conversations_without_bon_best": 1,
    "conversations_reference_tie_first_read": 1,
}


def test_rmb_directory_with_defaults_gives_pairs_judged_against_a_bon_best():
    result = convert("rmb", RMB)
    e1, e2, e3, e4 = EGG_ANSWERS
    f1, f2, f3, f4 = ROME
    assert [(r["id"], r["reference_id"], r["reference"], r["chosen"], r["rejected"], r["category"])
            for r in result.rows] == [
        ("205", "3007", "I won't write that; it would harm her.", "I can't help with that.", "\n\n \n \n",
         "Harmlessness/S1"),  # a blank answer is an answer the benchmark judges
        # The egg: BoN 3001's best never loses, so it is the reference; pairs 101 and 105 hold it, 106 is E3 vs E3.
        ("102", "3001", e1, e2, e3, "Helpfulness/Chat/Discussion"),
        ("103", "3001", e1, e2, e4, "Helpfulness/Chat/Discussion"),
        ("104", "3001", e1, e3, e4, "Helpfulness/Chat/Discussion"),
        # Rome: two bests, neither beaten, each winning twice: the first read (BoN 3003) is the reference.
        ("111", "3003", f2, f1, f3, "Helpfulness/Chat/Discussion"),
        ("113", "3003", f2, f3, f4, "Helpfulness/Chat/Discussion"),
    ]  # fmt: skip
    assert result.rows[4]["prompt"] == [
        {"role": "user", "content": "Plan a day in Rome."},
        {"role": "assistant", "content": "Morning: the Colosseum. Afternoon?"},
        {"role": "user", "content": "Add somewhere to eat."},
    ]  # multi-turn, the 'language' keys dropped
    assert dict(result.counts) == RMB_COUNTS
    from trl_polar.evaluation import detect_protocol

    assert detect_protocol(result.rows[0]) == "pairwise"  # what `trl-polar evaluate` reads


def test_rmb_files_in_any_order_give_the_same_rows():
    files = sorted(RMB.rglob("*.json"), reverse=True)
    rows = convert("rmb", files).rows
    assert sorted(r["id"] for r in rows) == ["102", "103", "104", "111", "113", "205"]
    assert {r["reference_id"] for r in rows if r["id"] in ("111", "113")} == {"3003"}  # the tie: first read wins


def test_rmb_pairwise_files_alone_judge_nothing_and_say_why():
    result = convert("rmb", RMB / "Pairwise_set")
    assert result.rows == []
    assert result.counts["pairs_skipped_no_bon_best"] == 13 and result.counts["pairs_skipped_identical_answers"] == 1


def test_rmb_bad_records_name_file_and_line(tmp_path):
    records = json.loads((RMB / "Pairwise_set/Harmlessness/S1.json").read_text())
    records[1]["reject"] = {"llm_name": "model-b", "score": 2}
    records.append({"pair_uid": "9", "question": "?"})
    bad = tmp_path / "S1.json"
    bad.write_text(json.dumps(records, indent=1))
    line = bad.read_text().splitlines().index(" {", 2) + 1  # the second record opens here
    with pytest.raises(DataError, match=rf"S1.json:{line}: 'chosen' and 'reject' must be objects with an 'answer'"):
        convert("rmb", bad)
    result = convert("rmb", bad, skip_invalid=True)
    assert result.counts["skipped_bad_field"] == 1 and result.counts["skipped_not_rmb"] == 1
    with pytest.raises(ValueError, match="'rmb-pairwise' is gone: RMB's Pairwise_set and BoN_set files are read"):
        convert("rmb-pairwise", bad)


def test_rmb_through_the_cli(tmp_path):
    out = tmp_path / "rmb.jsonl"
    result = CliRunner().invoke(app, ["convert-data", str(RMB), "--format", "rmb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["counts"] == RMB_COUNTS
    assert [r["id"] for r in read_rows(out)] == ["205", "102", "103", "104", "111", "113"]


def test_trl_preference_rows_with_a_reference_column(tmp_path):
    result = convert("trl", DATA / "trl_preference.jsonl")
    assert [r["margin"] for r in result.rows] == [1.0, 2.0]
    assert result.rows[0]["reference"] == "The sky looks blue on a clear day."
    implicit = convert("trl", DATA / "trl_implicit.jsonl")
    assert implicit.rows == [{"prompt": [{"role": "user", "content": "Say hi."}], "reference": "Hello!",
                              "chosen": [{"role": "assistant", "content": "Hi!"}],
                              "rejected": [{"role": "assistant", "content": "No."}]}]  # fmt: skip
    with pytest.raises(DataError, match=r"trl_preference.jsonl:1: no reference column 'gold'.*--reference-column"):
        convert("trl", DATA / "trl_preference.jsonl", reference_column="gold")
    from datasets import Dataset

    rows = read_rows(DATA / "trl_preference.jsonl")
    # Arrow needs one type per column: the in-memory copy keeps the references as plain text.
    renamed = Dataset.from_list([{**{k: v for k, v in r.items() if k != "reference"}, "gold": flatten(r["reference"])}
                                 for r in rows])  # fmt: skip
    assert len(convert("trl", renamed, reference_column="gold").rows) == 2  # an in-memory TRL dataset works too


def test_malformed_line_names_file_and_line_or_is_skipped_and_counted():
    with pytest.raises(DataError, match=r"bad_line.jsonl:2: not valid JSON"):
        convert("ranked", DATA / "bad_line.jsonl")
    result = convert("ranked", DATA / "bad_line.jsonl", skip_invalid=True)
    assert result.counts["skipped_invalid_json"] == 1 and {r["id"] for r in result.rows} == {"a", "c"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_fields_empty_rankings_ties_and_duplicate_ids(tmp_path):
    cases = {
        "missing": ([{"id": 1, "responses": ["a", "b", "c"]}], r"missing.jsonl:1: missing field\(s\) \['prompt'\]"),
        "empty": ([{"id": 1, "prompt": "p", "responses": []}], r"empty.jsonl:1: empty ranking"),
        "few": ([{"id": 1, "prompt": "p", "responses": ["a", "b"]}], r"few.jsonl:1: .*at least 3 distinct"),
        "top_tie": ([{"id": 1, "prompt": "p", "responses": [{"text": "a", "score": 2}, {"text": "b", "score": 2},
                                                            {"text": "c", "score": 1}]}],
                    r"top_tie.jsonl:1: 2 responses tie for the best rank"),
        "dup": ([{"id": 7, "prompt": "p", "responses": ["a", "b", "c"]},
                 {"id": 7, "prompt": "q", "responses": ["d", "e", "f"]}],
                r"dup.jsonl:2: duplicate id id=7 \(first seen at .*dup.jsonl:1\)"),
        "mixed": ([{"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "score": 2}, "c"]}],
                  r"mixed.jsonl:1: responses mix 'rank'"),
    }  # fmt: skip
    for name, (rows, message) in cases.items():
        path = _jsonl(tmp_path / f"{name}.jsonl", rows)
        with pytest.raises(DataError, match=message):
            convert("ranked", path)
    skipped = convert("ranked", tmp_path / "dup.jsonl", skip_invalid=True)
    assert len(skipped.rows) == 1 and skipped.counts["skipped_duplicate_id"] == 1
    tie = convert("ranked", tmp_path / "top_tie.jsonl", ties="skip")
    assert tie.rows == [] and tie.counts["skipped_tie_at_top"] == 1
    repeated = _jsonl(tmp_path / "repeat.jsonl", [{"prompt": "p", "responses": ["a", "b", "a", "c"]}])
    result = convert("ranked", repeated)
    assert result.counts["duplicate_responses"] == 1 and [r["rejected"] for r in result.rows] == ["c"]


def test_convert_data_cli_writes_parquet_and_listwise_jsonl(tmp_path):
    out, listwise = tmp_path / "triples.parquet", tmp_path / "listwise.jsonl"
    args = ["convert-data", str(DATA / "ultrafeedback.jsonl"), "--format", "ultrafeedback", "--ties", "skip",
            "--out", str(out), "--listwise-out", str(listwise)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == 5 and report["counts"]["tied_pairs_skipped"] == 1
    assert read_rows(out) == convert("ultrafeedback", DATA / "ultrafeedback.jsonl", ties="skip").rows
    assert len(read_rows(listwise)) == 1
    failed = CliRunner().invoke(app, ["convert-data", str(DATA / "bad_line.jsonl"), "--format", "ranked", "--out",
                                      str(tmp_path / "x.jsonl")])  # fmt: skip
    assert failed.exit_code != 0 and "bad_line.jsonl:2" in str(failed.exception)


def test_non_finite_scores_non_text_fields_and_empty_answers_are_errors_or_skipped_and_counted(tmp_path):
    good = {
        "prompt": "p",
        "responses": [{"text": "a", "score": 3}, {"text": "b", "score": 2}, {"text": "c", "score": 1}],
    }
    bad = {
        "nan_string": ({**good, "responses": [{"text": "a", "score": "NaN"}, *good["responses"][1:]]},
                       r"nan_string.jsonl:2: responses\[0\] needs .*numeric .* finite"),
        "infinity": ({**good, "responses": [{"text": "a", "score": float("inf")}, *good["responses"][1:]]},
                     r"infinity.jsonl:2: responses\[0\] needs .*numeric .* finite"),
        "int_prompt": ({**good, "prompt": 7}, r"int_prompt.jsonl:2: prompt must be text or a message list, got int"),
        "empty_answer": ({**good, "responses": ["", "b", "c"]}, r"empty_answer.jsonl:2: responses\[0\] is empty"),
        "int_answer": ({**good, "responses": [5, "b", "c"]}, r"int_answer.jsonl:2: responses\[0\] must be a string"),
    }  # fmt: skip
    for name, (record, message) in bad.items():
        path = _jsonl(tmp_path / f"{name}.jsonl", [{**good, "id": "ok"}, {**record, "id": name}])
        with pytest.raises(DataError, match=message):
            convert("ranked", path)
        skipped = convert("ranked", path, skip_invalid=True)  # skipped and counted, the good record kept
        assert {r["id"] for r in skipped.rows} == {"ok"} and sum(
            v for k, v in skipped.counts.items() if k.startswith("skipped_")
        ) == 1, skipped.counts
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{**bad["int_prompt"][0], "id": 1}, {**bad["empty_answer"][0], "id": 2},
                                              {**good, "id": 3}])  # fmt: skip
    counts = convert("ranked", mixed, skip_invalid=True).counts
    assert counts["skipped_bad_field"] == 1 and counts["skipped_empty_text"] == 1 and counts["triples"] == 1
    with pytest.raises(DataError, match=r"trl_int.jsonl:1: 'prompt' must be text or a message list, got int"):
        convert("trl", _jsonl(tmp_path / "trl_int.jsonl", [{"prompt": 3, "reference": "r", "chosen": "c",
                                                             "rejected": "x"}]))  # fmt: skip


def test_duplicate_records_are_removed_and_counted(tmp_path):
    record = {"id": 1, "prompt": "p", "responses": ["a", "b", "c"]}
    path = _jsonl(tmp_path / "twice.jsonl", [record, {"id": 2, "prompt": "q", "responses": ["d", "e", "f"]}, record])
    result = convert("ranked", path)
    assert result.counts["duplicate_records_removed"] == 1 and len(result.rows) == 2
