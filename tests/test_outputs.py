"""Commands that write files: the destination is checked before any work, written whole, and never the input."""

from __future__ import annotations

import json
import subprocess
import sys

from trl_polar.atomic import atomic_write


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old", encoding="utf-8")
    try:
        with atomic_write(target) as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_score_refuses_to_write_over_its_input(tmp_path, tiny_qwen2_rm_dir):
    data = tmp_path / "rows.jsonl"
    original = json.dumps({"prompt": "2+2?", "reference": "4", "output": "4"}) + "\n"
    data.write_text(original, encoding="utf-8")
    out = run_cli("score", "--model", tiny_qwen2_rm_dir, "--data", str(data), "--output", str(data))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: {data} is also the input; writing it would destroy the input. Pick another output."
    )
    assert data.read_text(encoding="utf-8") == original


def test_score_says_it_replaces_an_existing_output(tmp_path, tiny_qwen2_rm_dir):
    data, output = tmp_path / "rows.jsonl", tmp_path / "scored.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "reference": "4", "output": "4"}) + "\n", encoding="utf-8")
    output.write_text("stale\n", encoding="utf-8")
    out = run_cli("score", "--model", tiny_qwen2_rm_dir, "--data", str(data), "--output", str(output))
    assert out.returncode == 0, out.stderr
    assert f"{output} exists and will be replaced when the new output is complete." in out.stderr
    assert json.loads(output.read_text(encoding="utf-8"))["prompt"] == "2+2?"


def test_evaluate_checks_its_output_folder_first(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"}) + "\n")
    blocker = tmp_path / "report"
    blocker.write_text("a file where the folder should go")
    # The model path does not exist: the output check must fail first, before anything is loaded.
    out = run_cli("evaluate", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(blocker))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: {blocker} is a file; the output needs a folder. Pass a folder path or remove the file."
    )
