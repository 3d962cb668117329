"""Bad input on every surface gets a one-line answer naming the place and the fix, or a counted and logged skip.

The places follow docs/format.md: files by path and 1-based line, Python lists and datasets by index (``name[i]``,
``index i``), always with the field. The command line runs in process through `trl_polar.cli.main`, the entry point
of the ``trl-polar`` script, so that the one-line ``Error:`` is what is asserted.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from trl_polar import PolarConfig, PolarTemplate
from trl_polar.cli import main
from trl_polar.data import DataError
from trl_polar.data.loading import load_preference_dataset
from trl_polar.rewards import PolarReward
from trl_polar.score_file import score_file
from trl_polar.scorer import PolarScorer

try:  # the serving extra: the client test needs a server to (not) receive requests
    from fastapi import FastAPI, Request
except ImportError:  # pragma: no cover
    FastAPI = Request = None

SURROGATE = "\ud800"  # what the JSON escape "\\ud800" reads as: not text


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


def cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run ``trl-polar ARGS`` as the console script does; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["trl-polar", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err.replace("\r", "\n").splitlines()[-1] if out.err else ""


def write_jsonl(path, rows) -> str:
    # json.dumps writes a lone surrogate as its escape, exactly what a user's file would hold.
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


ROWS = [
    {"prompt": "What is 2 + 2?", "reference": "4", "output": "It is 4."},
    {"prompt": "What is 3 + 3?", "reference": "6", "output": "It is 7."},
]


# ------------------------------------------------------------------------------------------- lone surrogates
def test_surrogate_in_a_file_names_the_line_and_column(tmp_path, capsys, monkeypatch, tiny_qwen2_rm_dir):
    bad = [*ROWS, {"prompt": "p", "reference": "r", "output": f"x{SURROGATE}"}]
    data = write_jsonl(tmp_path / "rows.jsonl", bad)
    assert "x\\ud800" in (tmp_path / "rows.jsonl").read_text()  # the file holds the JSON escape
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", tiny_qwen2_rm_dir, "--data", data, "--output", str(out)]
    code, _, err = cli(capsys, monkeypatch, *args)
    assert code == 1
    assert err.strip() == (
        f"Error: {data}:3: `output` holds a lone UTF-16 surrogate '\\ud800' at character 1, which is not text. "
        "Replace it (e.g. text.encode('utf-8', 'replace').decode()) or drop the item."
    )
    assert not out.exists()
    # The Python API says the same of the same file.
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: `output` holds a lone UTF-16 surrogate"):
        score_file(tiny_qwen2_rm_dir, data, out, show_progress=False)


def test_surrogate_in_polar_reward_names_the_completion(scorer):
    reward = PolarReward(scorer)
    prompts, references = ["What is 2 + 2?"] * 2, ["4", "4"]
    with pytest.raises(ValueError, match=r"^`completions\[1\]` holds a lone UTF-16 surrogate '\\ud800' at character"):
        reward(prompts=prompts, completions=["4", f"It{SURROGATE}"], reference=references)
    with pytest.raises(ValueError, match=r"^`prompts\[0\]\[0\]\['content'\]` holds a lone UTF-16 surrogate"):
        reward(prompts=[[{"role": "user", "content": SURROGATE}], "q"], completions=["4", "4"], reference=references)
    with pytest.raises(ValueError, match=r"^`reference\[1\]\[0\]` holds a lone UTF-16 surrogate"):
        reward(prompts=prompts, completions=["4", "4"], reference=["4", [SURROGATE, "4"]])
    # With on_error="none" the bad completion gets None and the other its own score.
    lenient = PolarReward(scorer, on_error="none")
    out = lenient(prompts=prompts, completions=["The answer is 4", SURROGATE], reference=references)
    assert out[1] is None
    assert out[0] == pytest.approx(scorer.score(prompts[:1], ["4"], ["The answer is 4"])[0], abs=1e-6)


def test_template_refuses_a_surrogate_naming_the_part(tiny_qwen2_rm_dir):
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir)
    with pytest.raises(ValueError, match=r"^`reference` holds a lone UTF-16 surrogate '\\udfff' at character 0"):
        template.encode("p", "\udfff", "c")
    with pytest.raises(ValueError, match=r"^`candidate\[0\]\['content'\]\[1\]\['text'\]` holds a lone"):
        template.encode("p", "r", [{"role": "assistant", "content": [{"text": "ok"}, {"text": SURROGATE}]}])
    assert template.encode("p", "r", "caf\u00e9 \U0001f600")[-1] == template.reward_token_id  # real text passes


def test_polar_client_refuses_a_surrogate_before_sending():
    if FastAPI is None:
        pytest.skip("needs the serving extra (fastapi, uvicorn)")
    from serving_helpers import ThreadServer

    from trl_polar.serving.client import PolarClient

    received: list[int] = []
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request):
        items = (await request.json())["items"]
        received.append(len(items))
        return {"scores": [float(len(item["candidate"])) for item in items]}

    with ThreadServer(app) as server:
        client = PolarClient(url=server.url, max_retries=1)
        with pytest.raises(ValueError, match=r"^Item at index 1: `candidates\[1\]` holds a lone UTF-16 surrogate"):
            client.score(["p"] * 3, ["r"] * 3, ["a", f"b{SURROGATE}", "ccc"])
        assert received == []  # refused before any request
        lenient = PolarClient(url=server.url, max_retries=1, on_error="none")
        assert lenient.score(["p"] * 3, ["r"] * 3, ["a", f"b{SURROGATE}", "ccc"]) == [1.0, None, 3.0]
        assert received == [2]  # the two good items, in one request
        client.close()
        lenient.close()


# ------------------------------------------------------------------------------------- local paths, not hub ids
def test_local_paths_get_local_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.txt").write_text("one row\n")
    code, _, err = cli(capsys, monkeypatch, "evaluate", "--data", "rows.txt", "--out", "ev", "--url", "http://x:1")
    assert code == 1
    assert err.strip() == (
        "Error: rows.txt: a local file of a kind not read (suffix '.txt'). Training and evaluation data is one of "
        "['.csv', '.json', '.jsonl', '.parquet']: write it as JSON Lines (one object per line) or rename it."
    )
    with pytest.raises(DataError, match=r"^rows\.txt: a local file of a kind not read"):
        load_preference_dataset("rows.txt")
    for missing in ("./nope", "data/rows.tsv"):
        with pytest.raises(FileNotFoundError, match=rf"^{missing}: no such file or directory \(looked from"):
            load_preference_dataset(missing)
    code, _, err = cli(capsys, monkeypatch, "convert", "./nope", "out")
    assert code == 1
    assert err.strip() == (
        "Error: ./nope does not exist: SRC must be a checkpoint directory (config.json and weights) or a hub name "
        "(org/name)."
    )
    code, _, err = cli(capsys, monkeypatch, "convert", "rows.txt", "out")
    assert code == 1 and err.startswith("Error: rows.txt is a file: SRC must be a checkpoint directory")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ silence
def test_score_refuses_to_replace_an_existing_reward_column(tmp_path, capsys, monkeypatch, tiny_qwen2_rm_dir, scorer):
    data = write_jsonl(tmp_path / "scored.jsonl", [{**row, "reward": 1.5} for row in ROWS])
    out = tmp_path / "out.jsonl"
    args = ["score", "--model", tiny_qwen2_rm_dir, "--data", data, "--output", str(out)]
    code, _, err = cli(capsys, monkeypatch, *args)
    assert code == 1
    assert err.strip() == (
        f"Error: {data}:1 already has a 'reward' value (2 of 2 rows do). Pass --output-column NAME (output_column=) "
        "to keep them beside the new scores, or --overwrite (overwrite=True) to replace them."
    )
    assert not out.exists()
    expected = scorer.score(*([row[c] for row in ROWS] for c in ("prompt", "reference", "output")))
    code, _, _ = cli(capsys, monkeypatch, *args, "--output-column", "reward_v2")
    assert code is None or code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.5, 1.5]
    assert [r["reward_v2"] for r in rows] == pytest.approx(expected, abs=1e-5)
    out.unlink()
    with pytest.raises(ValueError, match=r"scored\.jsonl:1 already has a 'reward' value"):
        score_file(scorer, data, out, show_progress=False)
    summary = score_file(scorer, data, out, show_progress=False, overwrite=True)
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == pytest.approx(expected, abs=1e-5)
    assert summary["rows"] == 2 and summary["mean"] == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_zero_epochs_without_max_steps_is_refused(tmp_path, capsys, monkeypatch, tiny_qwen2_lm_dir):
    message = "`num_train_epochs`=0 with no `max_steps` trains nothing. Set num_train_epochs > 0 (e.g. 1) or max_steps"
    with pytest.raises(ValueError, match=r"^`num_train_epochs`=0 with no `max_steps` trains nothing"):
        PolarConfig(output_dir=str(tmp_path / "o"), num_train_epochs=0, use_cpu=True, bf16=False)
    assert PolarConfig(output_dir=str(tmp_path / "o"), num_train_epochs=0, max_steps=1, use_cpu=True).max_steps == 1
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "reference": "a", "chosen": "a", "rejected": "b"}])
    args = ["train", "--model_name_or_path", tiny_qwen2_lm_dir, "--train_data", data, "--output_dir",
            str(tmp_path / "out"), "--num_train_epochs", "0", "--use_cpu", "true"]  # fmt: skip
    code, _, err = cli(capsys, monkeypatch, *args)
    assert code == 1 and err == f"Error: {message} > 0."
    assert not (tmp_path / "out").exists()  # nothing saved as if trained


def test_completion_message_without_content_is_an_error(tmp_path, capsys, monkeypatch, scorer, tiny_qwen2_rm_dir):
    reward = PolarReward(scorer)
    completions = [[{"role": "assistant", "content": "4"}], [{"role": "assistant"}]]
    with pytest.raises(ValueError, match=r"^`completions\[1\]\[0\]` is a message without 'content' \(\{'role': "):
        reward(prompts=["2+2?"] * 2, completions=completions, reference=["4", "4"])
    # A bare tool call (no text, by design) is not an error: it is scored as an empty answer.
    tool_call = [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]
    assert isinstance(reward(prompts=["2+2?"], completions=[tool_call], reference=["4"])[0], float)
    logged = {}
    lenient = PolarReward(scorer, on_error="none")
    out = lenient(prompts=["2+2?"] * 2, completions=completions, reference=["4", "4"],
                  log_metric=lambda name, value: logged.setdefault(name, value))  # fmt: skip
    assert out[1] is None and isinstance(out[0], float) and logged["polar_reward/failed_frac"] == 0.5
    # In a file: the line and the column.
    rows = [ROWS[0], {**ROWS[1], "output": [{"role": "assistant"}]}]
    data = write_jsonl(tmp_path / "msgs.jsonl", rows)
    code, _, err = cli(capsys, monkeypatch, "score", "--model", tiny_qwen2_rm_dir, "--data", data,
                       "--output", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert code == 1
    assert err.startswith(f"Error: {data}:2: `output[0]` must be a message dict with a 'content' key, got ")


def test_empty_items_in_a_list_of_references_are_counted_and_logged(scorer, caplog):
    reward = PolarReward(scorer)
    prompts, completions = ["What is 2 + 2?"] * 2, ["The answer is 4", "5"]
    with caplog.at_level(logging.WARNING, logger="trl_polar.rewards"):
        out = reward(prompts=prompts, completions=completions, reference=[["4", "", None], ["four"]])
    alone = reward(prompts=prompts, completions=completions, reference=[["4"], ["four"]])
    assert out == pytest.approx(alone, abs=1e-6)  # scored against the one real reference
    assert reward.empty_reference_items == 2
    assert "2 empty item(s) in lists of references so far (latest: `reference[0][1]`)" in caplog.text
    strict = PolarReward(scorer, on_missing_reference="error")
    with pytest.raises(ValueError, match=r"^`reference\[1\]\[0\]` is empty: the row at index 1 .* lacks a reference"):
        strict(prompts=prompts, completions=completions, reference=[["4"], [None, "four"]])


# ---------------------------------------------------------------------------------- errors that name the place
def test_polar_reward_names_rows_by_their_index(scorer):
    # A prompt the template cannot read fails inside the scorer; the message names the caller's row and field.
    reward = PolarReward(scorer)
    with pytest.raises(ValueError, match=r"^`prompts\[1\]` must be a string or a list of messages"):
        reward(prompts=["2+2?", 7], completions=["4", "4"], reference=["4", "4"])
    lenient = PolarReward(scorer, baseline=True, on_error="none")
    out = lenient(prompts=["2+2?", 7], completions=["4", "4"], reference=["4", "4"])
    assert out[1] is None and out[0] == pytest.approx(0.0, abs=1e-6)  # "4" is the reference: baseline gap 0
    # An error inside the scorer (here: no room for the prompt) is put in the caller's terms: row index and field.
    template = PolarTemplate(scorer.template.tokenizer, max_length=12, max_response_length=8)
    tight = PolarReward(PolarScorer(scorer.model, template, device="cpu"))
    with pytest.raises(ValueError, match=r"^Index 1: No room left for the prompt"):
        tight(prompts=["q", "q"], completions=["4", "a b c d e f g h i j k"], reference=["4", "4"])


def test_a_listwise_row_with_one_candidate_names_the_row(tmp_path, tiny_qwen2_lm_dir):
    from datasets import Dataset

    from trl_polar import PolarRewardTrainer
    from trl_polar.collator import PolarDataCollator

    rows = [{"prompt": "q", "reference": "a", "candidates": ["a", "b"]}, {"prompt": "q", "reference": "a",
            "candidates": ["only one"]}]  # fmt: skip
    args = PolarConfig(output_dir=str(tmp_path), loss_type="listwise", max_steps=1, use_cpu=True, bf16=False,
                       report_to="none", max_length=128, max_response_length=32)  # fmt: skip
    with pytest.raises(ValueError, match=r"^train dataset, index 1: `candidates` holds 1 response\(s\); a ranking"):
        PolarRewardTrainer(model=tiny_qwen2_lm_dir, args=args, train_dataset=Dataset.from_list(rows))
    # Rows tokenized by hand reach the collator, which names the batch row and the column.
    collator = PolarDataCollator(pad_token_id=0)
    with pytest.raises(ValueError, match=r"^Batch row at index 1, column `candidates_ids`: a row needs at least 2"):
        collator([{"candidates_ids": [[1, 2], [3]]}, {"candidates_ids": [[1, 2]]}])
