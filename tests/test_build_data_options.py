"""build-data as a real pool needs it: policies whose tokenizer ships as code (an explicit trust option, never a
question on the terminal), the run's size in tokens in the manifest, and a held-out split of the triples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_sentencepiece_checkpoint import write_sentencepiece_tokenizer
from transformers import AutoTokenizer

from trl_polar.data import read_rows
from trl_polar.data.loading import load_preference_dataset
from trl_polar.tiny import build_tiny_causal_lm

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def code_tokenizer_pool(tmp_path_factory) -> list[str]:
    """Two tiny base policies whose SentencePiece tokenizer ships as code, as InternLM2 policies' does."""
    specs = []
    for i in range(2):
        path = tmp_path_factory.mktemp(f"sp-policy{i}")
        write_sentencepiece_tokenizer(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        build_tiny_causal_lm(tokenizer, arch="llama", seed=i).save_pretrained(path)
        specs.append(f"p{i}={path}:base")
    return specs


def _build_data(out: Path, pool: list[str], *extra: str) -> subprocess.CompletedProcess:
    args = ["build-data", "--corpus", str(DATA / "corpus.jsonl"), "--out", str(out), "--max-new-tokens", "6",
            "--max-prefix-tokens", "8", "--shard-size", "4", "--output-format", "jsonl", "--no-progress",
            *extra]  # fmt: skip
    for spec in pool:
        args += ["--policy", spec]
    # stdin closed: a question on the terminal would fail the run instead of hanging the test.
    return subprocess.run([sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)  # fmt: skip


def test_code_tokenizers_need_the_trust_option_and_never_ask(tmp_path, code_tokenizer_pool):
    refused = _build_data(tmp_path / "refused", code_tokenizer_pool)
    assert refused.returncode == 1
    assert "trust_remote_code" in refused.stderr and "[y/N]" not in refused.stdout + refused.stderr
    assert not (tmp_path / "refused" / "manifest.json").exists()

    out = tmp_path / "run"
    done = _build_data(out, code_tokenizer_pool, "--trust-remote-code")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["complete"] and report["counts"]["triples"] > 0

    # The manifest's sizes are the triples' tokens, counted with the first policy's tokenizer.
    rows = [row for shard in sorted(out.glob("shard-*.jsonl")) for row in read_rows(shard)]
    tokenizer = AutoTokenizer.from_pretrained(code_tokenizer_pool[0].split("=")[1][: -len(":base")],
                                              trust_remote_code=True)  # fmt: skip

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    expected = sum(4 * n(r["prompt"]) + 2 * n(r["reference"]) + n(r["chosen"]) + n(r["rejected"]) for r in rows)
    tokens = json.loads((out / "manifest.json").read_text())["tokens"]
    assert tokens == report["tokens"]
    assert tokens["rm_tokens"] == expected
    assert tokens["tokens_per_sample"] == pytest.approx(expected / len(rows))

    # docs/data.md's held-out split: the last 25% of the run's triples, disjoint from the training 75%.
    train = load_preference_dataset(str(out), split="train[:75%]")
    heldout = load_preference_dataset(str(out), split="train[75%:]")
    assert len(train) + len(heldout) == len(rows) and len(heldout) >= 1
    assert not set(train["prompt_id"]) & set(heldout["prompt_id"])
