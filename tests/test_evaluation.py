"""Evaluation protocols measured against scores computed independently, one item at a time."""

from __future__ import annotations

import json

import pytest
import torch

from trl_polar.evaluation import detect_protocol, evaluate, write_report
from trl_polar.modeling import load_reward_model
from trl_polar.scorer import PolarScorer

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
        assert report.per_category[name] == {"rows": 4, "accuracy": sum(expected) / 4}
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
    with pytest.raises(ValueError, match="Row 1, column 'ranking': the rmb protocol needs a list of at least 3"):
        evaluate(None, [{"prompt": "p", "ranking": ["a", "b", "c"]}, {"prompt": "p", "ranking": ["a", "b"]}])
    with pytest.raises(ValueError, match="No rows"):
        evaluate(None, [])


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


def test_an_answer_that_cannot_be_built_names_its_row_and_column(tiny_qwen2_rm_dir):
    rows = [
        {"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "reference": "r", "chosen": "a", "rejected": [{"role": "assistant", "content": None}]},
    ]
    with pytest.raises(ValueError, match=r"^Row 1, column `rejected`: "):
        evaluate(PolarScorer(tiny_qwen2_rm_dir, device="cpu"), rows)
