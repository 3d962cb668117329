"""`trl-polar score --url` and `evaluate --url` against a real server that requires a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving_helpers import API_KEY, start_servers  # noqa: E402
from toy_data import toy_rows  # noqa: E402

from trl_polar.scorer import PolarScorer  # noqa: E402


@pytest.fixture(scope="module")
def protected(tiny_qwen2_rm_dir):
    (server,) = start_servers((tiny_qwen2_rm_dir, ("--api-key", API_KEY)))
    yield server
    server.stop()


def _cli(args: list[str], cwd, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRL_POLAR_API_KEY"} | env
    return subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
        env=environ, check=False,
    )  # fmt: skip


@pytest.fixture
def rows(tmp_path):
    data = toy_rows(6, seed=4)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return data


def test_score_without_the_key_is_one_line_naming_the_fix(protected, rows, tmp_path):
    out = _cli(["score", "--url", protected.url, "--data", "pairs.jsonl", "--output", "s.jsonl",
                "--candidate-column", "chosen"], tmp_path)  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "HTTP 401" in error[0] and "--api-key" in error[0] and "TRL_POLAR_API_KEY" in error[0]
    assert not (tmp_path / "s.jsonl").exists()


def test_score_reads_the_key_from_the_environment(protected, rows, tmp_path, tiny_qwen2_rm_dir):
    out = _cli(["score", "--url", protected.url, "--data", "pairs.jsonl", "--output", "s.jsonl",
                "--candidate-column", "chosen"], tmp_path, TRL_POLAR_API_KEY=API_KEY)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = [json.loads(line)["reward"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    local = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="fp32")
    expected = local.score([r["prompt"] for r in rows], [r["reference"] for r in rows], [r["chosen"] for r in rows])
    assert got == pytest.approx(expected, abs=1e-4)


def test_evaluate_takes_the_key_as_a_flag(protected, rows, tmp_path, tiny_qwen2_rm_dir):
    out = _cli(["evaluate", "--url", protected.url, "--api-key", API_KEY, "--data", "pairs.jsonl",
                "--out", "report", "--no-plots"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    local = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="fp32")
    chosen = local.score([r["prompt"] for r in rows], [r["reference"] for r in rows], [r["chosen"] for r in rows])
    rejected = local.score([r["prompt"] for r in rows], [r["reference"] for r in rows], [r["rejected"] for r in rows])
    assert report["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(rows))


def test_openrlhf_reward_file_takes_replicas_and_the_key_from_the_environment(protected, tiny_qwen2_rm_dir,
                                                                              monkeypatch):  # fmt: skip
    # docs/serving.md, "Replicas for OpenRLHF": TRL_POLAR_URL=a,b and TRL_POLAR_API_KEY in the reward file's
    # environment. The second replica is down: every rollout is still scored once, by the live one.
    from serving_helpers import free_port

    from trl_polar.integrations import openrlhf

    monkeypatch.setenv("TRL_POLAR_URL", f"{protected.url},http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TRL_POLAR_API_KEY", API_KEY)
    monkeypatch.delenv("TRL_POLAR_MODEL", raising=False)
    prompts = ["What is 2 + 2?", "Name a colour.", "Say hello."]
    responses, references = ["It is 4.", "Blue.", "Hello!"], ["4", "Red", "Hi."]
    got = [
        float(openrlhf.reward_func([p + r], [p], [ref])["rewards"][0])
        for p, r, ref in zip(prompts, responses, references)
    ]
    local = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="fp32")
    assert got == pytest.approx(local.score(prompts, references, responses), abs=1e-4)
