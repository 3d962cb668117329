"""Evaluation protocols measured against scores computed independently, one item at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trl_polar.evaluation import detect_protocol, evaluate, write_report
from trl_polar.modeling import load_reward_model
from trl_polar.scorer import PolarScorer

DATA = Path(__file__).parent / "data"
PROMPTS = ["What is 2 + 2?", "Name a colour.", "Translate 'bonjour'.", "Capital of France?"]


@pytest.fixture(scope="module")
def model_and_template(tiny_qwen2_rm_dir):
    return load_reward_model(tiny_qwen2_rm_dir)


def one_by_one(model_and_template, prompt, reference, candidate):
    model, template = model_and_template
    with torch.no_grad():
        return model(input_ids=torch.tensor([template.encode(prompt, reference, candidate)])).logits[0, 0].item()


def test_pairwise_accuracy_margins_and_categories(model_and_template):
    model, template = model_and_template
    rows = [
        {"prompt": p, "reference": f"ref {i}", "chosen": f"good answer {i}", "rejected": f"bad {i * 7}",
         "category": "math" if i % 2 else "chat"}
        for i, p in enumerate(PROMPTS * 2)
    ]  # fmt: skip
    report = evaluate(PolarScorer(model, template), rows)
    assert report.protocol == "pairwise" and report.num_rows == 8
    chosen = [one_by_one(model_and_template, r["prompt"], r["reference"], r["chosen"]) for r in rows]
    rejected = [one_by_one(model_and_template, r["prompt"], r["reference"], r["rejected"]) for r in rows]
    wins = [c > j for c, j in zip(chosen, rejected)]
    assert report.accuracy == sum(wins) / 8
    assert report.margin_stats["mean"] == pytest.approx(sum(c - j for c, j in zip(chosen, rejected)) / 8, abs=1e-5)
    for name in ("math", "chat"):
        expected = [w for w, r in zip(wins, rows) if r["category"] == name]
        assert report.per_category[name] == {"rows": 4, "correct": sum(expected), "accuracy": sum(expected) / 4}
    selfs = [one_by_one(model_and_template, r["prompt"], r["reference"], r["reference"]) for r in rows]
    assert report.reference_self_score["mean"] == pytest.approx(sum(selfs) / 8, abs=1e-5)
    assert report.score_stats_by_rank["rank_1"]["max"] == pytest.approx(max(chosen), abs=1e-5)


def test_best_of_n_needs_the_first_to_beat_all(model_and_template):
    model, template = model_and_template
    rows = [
        {"prompt": p, "reference": "gold", "candidates": [f"c{i}{k}" for k in range(4)]} for i, p in enumerate(PROMPTS)
    ]
    report = evaluate(PolarScorer(model, template), rows)
    expected = 0
    for r in rows:
        s = [one_by_one(model_and_template, r["prompt"], "gold", c) for c in r["candidates"]]
        expected += all(s[0] > x for x in s[1:])
    assert report.protocol == "best_of_n" and report.accuracy == expected / len(rows)
    assert sorted(report.score_stats_by_rank) == ["rank_1", "rank_2", "rank_3", "rank_4"]


def test_rmb_protocol_uses_the_top_answer_as_reference(model_and_template):
    model, template = model_and_template
    rows = [
        {"prompt": p, "ranking": [f"top {i}", f"second {i}", f"third {i}", f"fourth {i}"]}
        for i, p in enumerate(PROMPTS)
    ]
    report = evaluate(PolarScorer(model, template), rows)
    expected = sum(
        one_by_one(model_and_template, r["prompt"], r["ranking"][0], r["ranking"][1])
        > one_by_one(model_and_template, r["prompt"], r["ranking"][0], r["ranking"][2])
        for r in rows
    )
    assert report.protocol == "rmb" and report.accuracy == expected / len(rows)
    assert sorted(report.score_stats_by_rank) == ["rank_2", "rank_3"]


def test_reports_are_written(tmp_path, model_and_template):
    model, template = model_and_template
    rows = [{"prompt": p, "reference": "r", "chosen": "a", "rejected": "b", "category": p[:4]} for p in PROMPTS]
    report = evaluate(PolarScorer(model, template), rows)
    paths = write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["accuracy"] == report.accuracy and data["num_rows"] == 4 and "scores_by_rank" not in data
    assert f"- accuracy: {report.accuracy:.4f}" in (tmp_path / "summary.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "scores_by_rank.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_by_category.png").stat().st_size > 1000
    assert set(paths) == {"json", "markdown", "scores_by_rank", "accuracy_by_category"}


def test_bad_data_is_explained():
    with pytest.raises(ValueError, match="Cannot tell the evaluation protocol"):
        detect_protocol(["question", "answer"])
    with pytest.raises(ValueError, match=r"None of the 1 rows can be judged under the rmb protocol: \{'ranking_fewer"):
        evaluate(None, [{"prompt": "p", "ranking": ["a", "b"]}])
    with pytest.raises(ValueError, match="No rows"):
        evaluate(None, [])


def test_rows_that_cannot_be_judged_are_skipped_and_counted(model_and_template, caplog):
    model, template = model_and_template
    rows = [
        {"prompt": "p", "reference": "gold", "candidates": ["a", "b", "c"]},
        {"prompt": "q", "reference": "gold", "candidates": ["only one"]},  # nothing to beat
        {"prompt": "r", "reference": None, "candidates": ["a", "b"]},
        {"prompt": "s", "reference": "gold", "candidates": ["a", 7]},
        {"prompt": "t", "reference": "gold", "candidates": ["x", "y"]},
    ]
    report = evaluate(PolarScorer(model, template), rows)
    assert report.rows_read == 5 and report.num_rows == 2
    assert "Row at index 2 cannot be judged (missing_reference)" in caplog.text  # the row's place in the input
    assert report.skipped == {"candidates_fewer_than_2": 1, "missing_reference": 1, "not_text": 1}
    expected = 0
    for r in (rows[0], rows[4]):
        s = [one_by_one(model_and_template, r["prompt"], "gold", c) for c in r["candidates"]]
        expected += all(s[0] > x for x in s[1:])
    assert report.accuracy == expected / 2
    assert "- rows judged: 2 of 5 (skipped: candidates_fewer_than_2 1, missing_reference 1, not_text 1)" in (
        report.to_markdown()
    )


def test_rmb_rows_report_every_level_and_score_each_answer_once(tmp_path, model_and_template):
    """The converted RMB samples: a reference's answers are scored once, however many pairs hold them."""
    from trl_polar.data import convert

    model, template = model_and_template
    rows = convert("rmb", DATA / "rmb").rows
    report = evaluate(PolarScorer(model, template), rows)
    wins = [
        one_by_one(model_and_template, r["prompt"], r["reference"], r["chosen"])
        > one_by_one(model_and_template, r["prompt"], r["reference"], r["rejected"])
        for r in rows
    ]
    assert report.num_rows == 6 and report.accuracy == sum(wins) / 6
    helpful = wins[1:]  # the first row is Harmlessness/S1, the rest Helpfulness/Chat/Discussion
    assert report.per_category["Harmlessness/S1"] == {"rows": 1, "correct": wins[0], "accuracy": float(wins[0])}
    assert report.category_rollup == {
        "Harmlessness": {"rows": 1, "correct": wins[0], "accuracy": float(wins[0]), "categories": 1,
                         "macro_accuracy": float(wins[0])},
        "Helpfulness": {"rows": 5, "correct": sum(helpful), "accuracy": sum(helpful) / 5, "categories": 1,
                        "macro_accuracy": sum(helpful) / 5},
        "Helpfulness/Chat": {"rows": 5, "correct": sum(helpful), "accuracy": sum(helpful) / 5, "categories": 1,
                             "macro_accuracy": sum(helpful) / 5},
    }  # fmt: skip
    # 3 (prompt, reference) prefixes: the scam (1 pair, 3 answers with the reference), the egg (3 pairs over 3
    # answers + the reference) and Rome (2 pairs over 3 answers + the reference): 11 items instead of 18.
    t = report.throughput
    assert (t["items_requested"], t["items_scored"], t["prefix_groups"]) == (18, 11, 3)
    prompts, references, candidates = [], [], []
    for r in rows:
        for answer in (r["reference"], r["chosen"], r["rejected"]):
            if (r["prompt"], r["reference"], answer) not in zip(prompts, references, candidates):
                prompts.append(r["prompt"]), references.append(r["reference"]), candidates.append(answer)
    ids = [template.encode(p, ref, c) for p, ref, c in zip(prompts, references, candidates)]
    saved = 0
    for key in {json.dumps([p, ref]) for p, ref in zip(prompts, references)}:
        group = [i for i, (p, ref) in enumerate(zip(prompts, references)) if json.dumps([p, ref]) == key]
        common = min(len(ids[i]) for i in group) - 1  # every item keeps at least its reward token
        while any(ids[i][:common] != ids[group[0]][:common] for i in group):
            common -= 1
        saved += common * (len(group) - 1)
    assert t["tokens_saved"] == saved and t["tokens_run"] == sum(map(len, ids)) - saved
    assert t["items_per_second"] == pytest.approx(11 / t["seconds"])
    summary = report.to_markdown()
    assert "| **Helpfulness/Chat** (all 1; mean of them" in summary and "| Harmlessness/S1 | 1 |" in summary


def test_max_rows_takes_a_stratified_sample(model_and_template):
    model, template = model_and_template
    rows = [
        {"prompt": f"q{i}", "reference": "r", "chosen": f"a{i}", "rejected": f"b{i}", "category": c}
        for i, c in enumerate(["Helpfulness/Code"] * 12 + ["Helpfulness/Chat"] * 6 + ["Harmlessness/S1"] * 2)
    ]
    report = evaluate(PolarScorer(model, template), rows, max_rows=10, seed=3)
    assert report.num_rows == 10 and report.sample == {"rows": 10, "from_rows": 20, "seed": 3,
                                                       "stratified_by": "category"}  # fmt: skip
    assert {k: v["rows"] for k, v in report.per_category.items()} == {
        "Helpfulness/Code": 6, "Helpfulness/Chat": 3, "Harmlessness/S1": 1
    }  # fmt: skip
    assert "- stratified sample: 10 of 20 rows (seed 3)" in report.to_markdown()
    # Each category keeps a row while the sample allows, however small it is.
    from trl_polar.evaluation import stratified_sample

    picked = stratified_sample(rows, 3, "category")
    assert sorted(rows[i]["category"] for i in picked) == ["Harmlessness/S1", "Helpfulness/Chat", "Helpfulness/Code"]


def test_category_plots_are_horizontal_bars_sized_to_their_labels(tmp_path, model_and_template):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    model, template = model_and_template
    names = [f"Helpfulness/Task {k}/A long subcategory name number {k}" for k in range(12)]
    rows = [{"prompt": f"q{i}", "reference": "r", "chosen": "a", "rejected": f"b{i}", "category": names[i % 12]}
            for i in range(24)]  # fmt: skip
    report = evaluate(PolarScorer(model, template), rows)
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "markdown", "scores_by_rank", "accuracy_by_category", "accuracy_by_group"}
    height, width, _ = imread(paths["accuracy_by_category"]).shape
    assert width == 1200 and abs(height - 120 * (0.9 + 0.26 * 12)) < 1  # one bar row per category
    height, _, _ = imread(paths["accuracy_by_group"]).shape
    assert abs(height - 120 * (0.9 + 0.26 * 13)) < 1  # Helpfulness and its 12 task folders


def test_a_protocol_the_rows_do_not_fit_is_one_line_through_the_cli(tmp_path, tiny_qwen2_rm_dir):
    import json
    import subprocess
    import sys

    data = tmp_path / "bon.jsonl"
    data.write_text(json.dumps({"prompt": "p", "reference": "r", "candidates": ["a", "b"]}) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "evaluate", "--model", tiny_qwen2_rm_dir, "--data", str(data),
         "--out", str(tmp_path / "report"), "--protocol", "pairwise"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: {data}: protocol 'pairwise' needs the columns ['chosen', 'prompt', 'reference', 'rejected']; the "
        "rows lack ['chosen', 'rejected'] (they have ['candidates', 'prompt', 'reference']). Use --protocol best_of_n."
    )


def test_an_answer_that_cannot_be_built_is_skipped_with_its_row_logged(tiny_qwen2_rm_dir, caplog):
    rows = [
        {"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "reference": "r", "chosen": "a", "rejected": [{"role": "assistant", "content": None}]},
    ]
    report = evaluate(PolarScorer(tiny_qwen2_rm_dir, device="cpu"), rows)
    assert (report.num_rows, report.rows_read, report.skipped) == (1, 2, {"not_text": 1})
    assert "Row at index 1 cannot be judged (not_text)" in caplog.text


def test_evaluate_command_on_converted_rmb_rows_with_a_sample(tmp_path, tiny_qwen2_rm_dir):
    import subprocess
    import sys

    from trl_polar.data import convert, write_rows

    data = tmp_path / "rmb.jsonl"
    write_rows(convert("rmb", DATA / "rmb").rows, data)
    out = subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", "evaluate", "--model", tiny_qwen2_rm_dir, "--data", str(data),
         "--out", str(tmp_path / "report"), "--max-rows", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["protocol"] == "pairwise" and report["num_rows"] == 2
    assert report["sample"] == {"rows": 2, "from_rows": 6, "seed": 0, "stratified_by": "category"}
    assert {k: v["rows"] for k, v in report["per_category"].items()} == {
        "Harmlessness/S1": 1, "Helpfulness/Chat/Discussion": 1
    }  # fmt: skip
    assert sorted(report["category_rollup"]) == ["Harmlessness", "Helpfulness", "Helpfulness/Chat"]
    assert report["throughput"]["items_scored"] == 6  # the reference and the two answers of each sampled pair
    assert "POLAR evaluation: 100%" in out.stderr and "- stratified sample: 2 of 6 rows (seed 0)" in out.stdout
