"""The public reward-model benchmarks: converters on sample files in each one's published format, the benchmarks'
own scoring rules on known scores, and `trl-polar evaluate --benchmark` end to end with a tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_polar.benchmark_sets import (
    benchmark_prompts,
    evaluate_benchmark,
    load_benchmark,
    summarize_ppe,
    summarize_rewardbench2,
    summarize_rmbench,
    ties_score,
)
from trl_polar.data.io import DataError
from trl_polar.evaluation import EvaluationReport
from trl_polar.scorer import PolarScorer

DATA = Path(__file__).parent / "data"
RB2, RMB, JB, PPE, HS3 = (DATA / n for n in ("rewardbench2", "rm_bench", "judgebench", "ppe", "helpsteer3"))


def scored(row_scores):
    """A report holding given per-row scores, as `evaluate` returns them (reference against itself first)."""
    return EvaluationReport(protocol="pairwise", num_rows=len(row_scores), accuracy=0.0, row_scores=row_scores)


# Converters ---------------------------------------------------------------------------------------------------------


def test_rewardbench2_rows_keep_chosen_first_and_name_bad_records():
    result = load_benchmark("rewardbench2", RB2 / "test.jsonl", references=str(RB2 / "references.jsonl"),
                            skip_invalid=True)  # fmt: skip
    assert dict(result.counts) == {"bon_rows": 4, "references_from_file": 4, "skipped_bad_field": 2}
    first, tied = result.rows[0], result.rows[3]
    assert first["candidates"] == ["William Shakespeare wrote Hamlet.", "Christopher Marlowe wrote Hamlet.",
                                   "Hamlet was written by Ben Jonson.", "It is anonymous."]  # fmt: skip
    assert (first["num_correct"], first["category"]) == (1, "Factuality")
    assert first["reference"] == "A careful answer to: Who wrote Hamlet?"
    assert (tied["id"], tied["num_correct"], tied["candidates"][:3]) == ("tied:3", 3, ["Red.", "Blue.", "Yellow."])
    with pytest.raises(DataError, match=r"test\.jsonl:5: 'chosen' and 'rejected' must be non-empty lists"):
        load_benchmark("rewardbench2", RB2 / "test.jsonl", references=str(RB2 / "references.jsonl"))


def test_a_benchmark_without_gold_answers_asks_for_references_instead_of_using_the_chosen_answer():
    with pytest.raises(DataError, match=r"test\.jsonl:1: RewardBench 2 gives this prompt no gold answer .*"
                                        r"--references FILE.* would leak the label"):  # fmt: skip
        load_benchmark("rewardbench2", RB2 / "test.jsonl")


def test_rm_bench_rows_hold_the_six_styled_answers_and_the_domain_from_the_file_name(tmp_path):
    result = load_benchmark("rm-bench", RMB / "data", references=str(RMB / "references.jsonl"))
    assert dict(result.counts) == {"rows": 5, "references_from_file": 5}
    chat = result.rows[3]  # files in sorted order: math_filtered.json, then total_dataset.json
    assert chat["candidates"][0].endswith("right, short.") and chat["candidates"][5].startswith("**")
    assert chat["candidates"][5].endswith("wrong, in detail.") and chat["num_correct"] == 3
    assert [(row["category"], row["id"]) for row in result.rows] == [
        ("math", "21"), ("math", "22"), ("chat", "8"), ("safety-refuse", "8"), ("code", "9")]  # fmt: skip
    with pytest.raises(DataError, match=r"no_domain\.json:2: no RM-Bench domain"):
        load_benchmark("rm-bench", RMB / "no_domain.json", references=str(RMB / "references.jsonl"))
    # The same sample twice (the total file and a copy of one of its records) is named, not scored twice.
    copy = tmp_path / "chat_filtered.json"
    record = json.loads((RMB / "data" / "total_dataset.json").read_text())[0]
    copy.write_text(json.dumps([{k: v for k, v in record.items() if k != "domain"}]))
    with pytest.raises(DataError, match=r"chat_filtered\.json:1: chat id 8 already came at .*total_dataset\.json:2"):
        load_benchmark("rm-bench", [str(RMB / "data" / "total_dataset.json"), str(copy)],
                       references=str(RMB / "references.jsonl"))  # fmt: skip


def test_judgebench_labels_choose_the_correct_response():
    result = load_benchmark("judgebench", JB / "gpt-4o.jsonl", references=str(JB / "references.jsonl"),
                            skip_invalid=True)  # fmt: skip
    assert dict(result.counts) == {"triples": 2, "references_from_file": 2, "skipped_bad_label": 1}
    assert [(r["chosen"], r["rejected"], r["category"], r["id"]) for r in result.rows] == [
        ("One bit per use.", "Two bits per use.", "mmlu-pro-computer science", "81ec57f2"),
        ("Tom is grey.", "Tom is black.", "livebench-reasoning", "9a1c"),
    ]
    with pytest.raises(DataError, match=r"gpt-4o\.jsonl:3: label must be one of \['A>B', 'B>A'\], got 'A=B'"):
        load_benchmark("judgebench", JB / "gpt-4o.jsonl", references=str(JB / "references.jsonl"))


def test_ppe_uses_each_sets_gold_answer_and_references_only_for_ifeval():
    result = load_benchmark("ppe", PPE / "data", references=str(PPE / "references.jsonl"))
    assert dict(result.counts) == {"bon_rows": 5, "references_gold": 4, "references_from_file": 1,
                                   "empty_responses_removed": 1, "conflict_pairs_removed": 1}  # fmt: skip
    rows = {row["category"]: row for row in result.rows}
    assert list(rows) == ["gpqa", "ifeval", "math", "mbpp_plus", "mmlu_pro"]  # files in sorted order
    assert rows["mmlu_pro"]["reference"] == "The answer is (B) CO2"
    assert rows["math"]["reference"] == "3 + 4 = \\boxed{7}"
    assert rows["gpqa"]["reference"] == "electron"
    assert rows["mbpp_plus"]["reference"] == "def sq(x):\n    return x * x"
    assert rows["ifeval"]["reference"] == "A careful answer to: Write exactly two sentences about the sea."
    # MATH's empty third response is removed, its pair [2, 3] with it, and [3, 1] renumbered to [2, 1].
    math_row = rows["math"]
    assert (math_row["candidates"], math_row["labels"], math_row["pairs"]) == (
        ["7", "8", "The sum is 7."], [True, False, True], [[0, 1], [2, 1]])  # fmt: skip
    with pytest.raises(DataError, match=r"ifeval\.jsonl:1: PPE gives this prompt no gold answer"):
        load_benchmark("ppe", PPE / "data")


def test_helpsteer3_orders_by_overall_preference_and_counts_ties():
    result = load_benchmark("helpsteer3", HS3 / "validation.jsonl", references=str(HS3 / "references.jsonl"),
                            skip_invalid=True)  # fmt: skip
    assert dict(result.counts) == {"triples": 2, "references_from_file": 2, "ties_skipped": 1, "skipped_bad_field": 1}
    spanish, sky = result.rows
    assert len(spanish["prompt"]) == 3 and spanish["prompt"][-1]["content"] == "Ten minutes a day. Where do I start?"
    assert (spanish["chosen"], spanish["margin"], spanish["category"]) == (
        "Start with a spaced-repetition app and 20 common verbs.", 2, "general")  # fmt: skip
    assert (sky["chosen"], sky["rejected"], sky["margin"]) == (
        "Rayleigh scattering favours short wavelengths.", "Because it reflects the sea.", 3)  # fmt: skip
    with pytest.raises(DataError, match=r"validation\.jsonl:4: overall_preference must be an integer from -3 to 3"):
        load_benchmark("helpsteer3", HS3 / "validation.jsonl", references=str(HS3 / "references.jsonl"))


def test_references_files_are_checked_and_missing_prompts_named(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"prompt": "Say hi.", "reference": "Hi."}\n{"prompt": "Say hi.", "reference": "Hello."}\n')
    with pytest.raises(DataError, match=r"refs\.jsonl:2: this prompt already has a different reference at .*:1"):
        load_benchmark("judgebench", JB / "gpt-4o.jsonl", references=str(refs))
    refs.write_text('{"prompt": "What is the capacity of a noiseless binary channel?", "reference": "1 bit."}\n')
    result = load_benchmark("judgebench", JB / "gpt-4o.jsonl", references=str(refs), skip_invalid=True)
    assert dict(result.counts) == {"triples": 1, "references_from_file": 1, "skipped_no_reference": 1,
                                   "skipped_bad_label": 1}  # fmt: skip


def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"judgebench\.jsonl: no such file or folder"):
        load_benchmark("judgebench", str(tmp_path / "judgebench.jsonl"))
    with pytest.raises(ValueError, match=r"Unknown benchmark 'rewardbench'; choose one of \['helpsteer3', "):
        load_benchmark("rewardbench", RB2 / "test.jsonl")


def test_benchmark_prompts_lists_what_needs_a_reference():
    assert benchmark_prompts("rewardbench2", RB2 / "test.jsonl") == [
        "Who wrote Hamlet?",
        "What is 7 * 8?",
        "Name a primary colour.",
        "Reply with one word.",
        "Say hi.",
    ]
    assert benchmark_prompts("helpsteer3", HS3 / "validation.jsonl")[0][0]["content"] == "I want to learn Spanish."


# Scoring rules on known scores --------------------------------------------------------------------------------------


def test_rewardbench2_best_of_4_splits_a_tie_at_the_top_and_ties_follow_their_rule():
    rows = [{"category": "Math", "id": "1"}, {"category": "Math", "id": "2"}, {"category": "Focus", "id": "3"},
            {"category": "Ties", "id": "ref:3", "num_correct": 1},
            {"category": "Ties", "id": "tied:3", "num_correct": 3}]  # fmt: skip
    summary = summarize_rewardbench2(rows, scored([
        [0, 2.0, 2.0, 1.0, 0.5],  # chosen ties one rejected at the top: half a point
        [0, 1.0, 3.0, 0.0, 0.0],  # a rejected answer wins: no point
        [0, 3.0, 1.0, 1.0, 1.0],
        [0, 5.0, 1.0, 2.0],  # ref prompt: gap 5 - 2 = 3
        [0, 5.0, 4.0, 3.0, 1.0, 2.0],  # tied prompt: correct spread 2, gap 3 - 2 = 1
    ]))  # fmt: skip
    assert summary["subsets"]["Math"] == {"n": 2, "score": 0.25}
    assert summary["subsets"]["Focus"] == {"n": 1, "score": 1.0}
    ties = summary["subsets"]["Ties"]
    assert (ties["ref_accuracy"], ties["tied_accuracy"], ties["correctness_preferred"]) == (1.0, 1.0, 0.0)
    assert ties["correctness_margin_score"] == pytest.approx(math.tanh(1 / 2 - 1))
    assert ties["score"] == pytest.approx(0.6 + 0.01 * math.tanh(-0.5))
    assert summary["score"] == pytest.approx((0.25 + 1.0 + ties["score"]) / 3)


def test_ties_score_margins_compare_the_gap_with_the_spread_of_correct_answers():
    wide_gap = ties_score([("ref:1", 1, [9.0, 1.0]), ("tied:1", 2, [9.0, 8.0, 1.0])])
    assert (wide_gap["correctness_preferred"], wide_gap["correctness_preferred_hard"]) == (1.0, 1.0)
    assert wide_gap["score"] == pytest.approx(1.0 - 0.01 + 0.01 * (1 + math.tanh(7 / 1 - 1)))


def test_rm_bench_matrix_levels_and_domain_averages():
    def scores(wrong_cells):
        # Chosen answers score 1, rejected 0; a wrong cell (i, j) lifts rejected j above chosen i.
        chosen, rejected = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        for i, j in wrong_cells:
            chosen[i], rejected[j] = 0.0, 0.5
        return [0.0, *chosen, *rejected]

    rows = [{"category": d} for d in ("chat", "safety-refuse", "safety-response")]
    summary = summarize_rmbench(rows, scored([scores({(0, 2)}), scores(set()), scores({(2, 0)})]))
    chat, safety = summary["domains"]["chat"], summary["domains"]["safety"]
    assert chat["matrix"] == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # the concise chosen answer lost
    assert (chat["hard"], chat["normal"], chat["easy"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
    assert safety["n"] == 2  # both safety files form one domain
    assert safety["matrix"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    assert (safety["hard"], safety["normal"], safety["easy"]) == (1.0, pytest.approx(5 / 6), pytest.approx(2 / 3))
    assert summary["hard"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["score"] == pytest.approx((chat["average"] + safety["average"]) / 2)
    assert summary["styles"] == ["concise", "detailed_plain", "detailed_markdown"]


def test_ppe_best_of_k_pairwise_accuracy_and_bounds():
    rows = [{"category": "math", "labels": [True, False, True], "pairs": [[0, 1], [2, 1]]},
            {"category": "math", "labels": [False, False, True]},  # no sampled pairs: all correct x incorrect
            {"category": "gpqa", "labels": [False, False]}]  # fmt: skip
    summary = summarize_ppe(rows, scored([[0, 1.0, 2.0, 2.0], [0, 5.0, 1.0, 3.0], [0, 1.0, 0.0]]))
    math_set = summary["sets"]["math"]
    assert math_set["best_of_k"] == 0.25  # (0.5 + 0) / 2: a tie at the top shares the pick
    assert (math_set["pairs"], math_set["pairwise_accuracy"]) == (4, 0.25)
    assert (math_set["random"], math_set["oracle"]) == (pytest.approx((2 / 3 + 1 / 3) / 2), 1.0)
    assert summary["sets"]["gpqa"] == {"n": 1, "best_of_k": 0.0, "pairwise_accuracy": None, "pairs": 0,
                                       "random": 0.0, "oracle": 0.0}  # fmt: skip
    assert summary["score"] == pytest.approx(math_set["best_of_k"] / 2)


# End to end ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


@pytest.mark.parametrize(
    ("name", "data", "references"),
    [("judgebench", JB / "gpt-4o.jsonl", JB / "references.jsonl"),
     ("helpsteer3", HS3 / "validation.jsonl", HS3 / "references.jsonl")],
)  # fmt: skip
def test_pairwise_benchmarks_score_the_correct_answer_against_the_other(scorer, name, data, references):
    result = evaluate_benchmark(scorer, name, data, references=str(references), skip_invalid=True)
    wins = [s[1] > s[2] for s in result.report.row_scores]  # reference against itself, chosen, rejected
    assert result.summary["n"] == 2 and result.summary["score"] == sum(wins) / 2
    assert result.summary["score"] == result.report.accuracy  # the benchmark's rule is plain pairwise accuracy here
    assert result.to_dict()["conversion"]["skipped_bad_" + ("label" if name == "judgebench" else "field")] == 1


def test_best_of_k_benchmarks_score_every_candidate(scorer):
    result = evaluate_benchmark(scorer, "ppe", PPE / "data", references=str(PPE / "references.jsonl"))
    assert [len(s) for s in result.report.row_scores] == [5, 5, 4, 5, 5]  # reference, then the K candidates
    assert sorted(result.summary["sets"]) == ["gpqa", "ifeval", "math", "mbpp_plus", "mmlu_pro"]
    assert all(0.0 <= s["best_of_k"] <= 1.0 and s["random"] == 0.5 for s in result.summary["sets"].values()
               if s["n"] and s is not result.summary["sets"]["math"])  # fmt: skip
    result = evaluate_benchmark(scorer, "rewardbench2", RB2 / "test.jsonl", references=str(RB2 / "references.jsonl"),
                                skip_invalid=True)  # fmt: skip
    assert sorted(result.summary["subsets"]) == ["Factuality", "Math", "Ties"]
    assert result.summary["subsets"]["Ties"]["prompts_with_both"] == 1
    lines = result.to_markdown().splitlines()
    assert lines[:4] == ["# RewardBench 2", "", f"- score: {result.summary['score']:.4f}", "- rows scored: 4"]
    assert "| Math | 1 | " + f"{result.summary['subsets']['Math']['score']:.4f} |" in "\n".join(lines)
    assert "- skipped_bad_field: 2" in lines and "generic best_of_n one" in lines[-1]


def test_evaluate_benchmark_command_writes_the_benchmark_report(tmp_path, tiny_qwen2_rm_dir):
    out = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "evaluate", "--model", tiny_qwen2_rm_dir, "--benchmark", "rm-bench",
         "--data", str(RMB / "data"), "--references", str(RMB / "references.jsonl"), "--out", str(tmp_path / "eval"),
         "--no-plots"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "eval" / "benchmark.json").read_text())
    assert (report["benchmark"], report["rows"]) == ("rm-bench", 5)
    assert sorted(report["domains"]) == ["chat", "code", "math", "safety"]
    assert report["domains"]["math"]["n"] == 2 and len(report["domains"]["math"]["matrix"]) == 3
    assert report["score"] == pytest.approx(sum(d["average"] for d in report["domains"].values()) / 4)
    assert report["conversion"] == {"rows": 5, "references_from_file": 5}
    assert "# RM-Bench" in out.stdout
    assert (tmp_path / "eval" / "report.json").is_file() and (tmp_path / "eval" / "benchmark.md").is_file()


def test_evaluate_benchmark_command_names_the_record_without_a_reference(tmp_path, tiny_qwen2_rm_dir):
    out = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "evaluate", "--model", tiny_qwen2_rm_dir, "--benchmark", "judgebench",
         "--data", str(JB / "gpt-4o.jsonl"), "--out", str(tmp_path / "eval")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {JB / 'gpt-4o.jsonl'}:1: JudgeBench gives this prompt no gold answer")
