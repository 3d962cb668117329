"""Prompt sampling: seeded 1..N-token prefixes of documents, plus a share of instruction prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trl_polar.data import DataError, PromptConfig, sample_prompts
from trl_polar.data.prompts import PAPER_INSTRUCTION_SHARE, default_instruction_share

DATA = Path(__file__).parent / "data"
DOCS = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()]


def test_prefixes_are_exact_document_starts_of_1_to_n_tokens(tiny_tokenizer):
    result = sample_prompts(str(DATA / "corpus.jsonl"), tiny_tokenizer, PromptConfig(max_prefix_tokens=8, seed=0))
    assert len(result) == 9 and result.counts["empty_documents"] == 1  # one prompt per non-empty document
    for row in result.rows:
        doc = DOCS[row["source_index"]]
        assert doc.startswith(row["prompt"]) and row["prompt"]  # never a decoded approximation of the text
        assert "\ufffd" not in row["prompt"]  # no multi-byte character split by a byte-level token
        assert 1 <= row["prefix_tokens"] <= 8
        assert len(tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) == row["prefix_tokens"]
        assert (row["kind"], row["wrapper"], row["messages"]) == ("prefix", "pretrain", None)
        assert row["prompt_id"] == f"prefix-{row['source_index']}"
    assert len({row["prefix_tokens"] for row in result.rows}) > 2  # lengths really are drawn, not fixed


def test_sampling_is_deterministic_per_seed(tiny_tokenizer):
    config = PromptConfig(num_prompts=6, max_prefix_tokens=10, seed=7)
    first = sample_prompts(str(DATA / "corpus.jsonl"), tiny_tokenizer, config)
    again = sample_prompts(str(DATA / "corpus.jsonl"), tiny_tokenizer, config)
    other = sample_prompts(
        str(DATA / "corpus.jsonl"), tiny_tokenizer, PromptConfig(num_prompts=6, max_prefix_tokens=10)
    )
    assert first.rows == again.rows and first.fingerprint() == again.fingerprint()
    assert first.fingerprint() != other.fingerprint()


def test_instruction_share_and_message_prompts(tiny_tokenizer):
    instructions = [
        {"prompt": [{"role": "user", "content": "Plan a trip."}, {"role": "assistant", "content": "Sure."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define entropy."}]},
        {"prompt": [{"role": "user", "content": "Count to three."}]},
    ]
    config = PromptConfig(num_prompts=8, max_prefix_tokens=6, instruction_share=0.25, seed=1)
    result = sample_prompts(str(DATA / "corpus.jsonl"), tiny_tokenizer, config, instructions=instructions)
    instr = [row for row in result.rows if row["kind"] == "instruction"]
    assert len(result) == 8 and len(instr) == 2
    for row in instr:
        assert row["wrapper"] == "sft" and row["messages"][-1]["role"] == "user"  # trailing answers dropped
        assert row["prompt"] == "\n".join(m["content"] for m in row["messages"])
    assert [row["kind"] for row in result.rows] != ["prefix"] * 6 + ["instruction"] * 2  # the mix is shuffled


def test_the_default_mix_is_the_papers_when_there_are_instructions(tiny_tokenizer):
    docs = [{"text": f"document number {i} says something"} for i in range(200)]
    instructions = [{"prompt": f"Explain idea {i}."} for i in range(5)]
    result = sample_prompts(docs, tiny_tokenizer, PromptConfig(num_prompts=200), instructions=instructions)
    assert result.config.instruction_share == PAPER_INSTRUCTION_SHARE == 0.01
    assert sum(row["kind"] == "instruction" for row in result.rows) == 2  # 1% of 200
    # Without instructions (a base-only pool has nobody to answer them) every prompt is a prefix.
    result = sample_prompts(docs, tiny_tokenizer, PromptConfig(num_prompts=200))
    assert result.config.instruction_share == 0.0 and {row["kind"] for row in result.rows} == {"prefix"}
    # build-data knows the pool: instruction prompts need two chat policies to tell apart.
    assert default_instruction_share(True, num_chat_policies=2) == 0.01
    assert default_instruction_share(True, num_chat_policies=1) == 0.0
    assert default_instruction_share(False, num_chat_policies=4) == 0.0


def test_duplicate_prompts_are_removed_and_counted(tiny_tokenizer):
    docs = [{"text": "same text"}] * 4 + [{"text": "other"}]
    result = sample_prompts(docs, tiny_tokenizer, PromptConfig(max_prefix_tokens=64))
    assert sorted(row["prompt"] for row in result.rows) == ["other", "same text"]
    assert result.counts["duplicate_prompts"] == 3


def test_clear_errors(tiny_tokenizer):
    corpus = str(DATA / "corpus.jsonl")
    with pytest.raises(DataError, match=r"only 9 usable prefix prompts of the 20 asked for"):
        sample_prompts(corpus, tiny_tokenizer, PromptConfig(num_prompts=20))
    with pytest.raises(DataError, match=r"no column 'body' \(it has \['text'\]\)"):
        sample_prompts(corpus, tiny_tokenizer, PromptConfig(text_column="body"))
    with pytest.raises(DataError, match="needs an instruction set"):
        sample_prompts(corpus, tiny_tokenizer, PromptConfig(instruction_share=0.5))
    with pytest.raises(ValueError, match="min_prefix_tokens <= max_prefix_tokens"):
        PromptConfig(min_prefix_tokens=5, max_prefix_tokens=2)


def test_a_corpus_record_that_is_not_text_names_the_file_and_line(
    tmp_path, tiny_tokenizer, capsys, monkeypatch, plain_tokenizer_dir, tiny_qwen2_lm_dir
):
    import sys

    from trl_polar.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "A first document about rivers."}\n{"text": 5}\n{"text": "Third."}\n')
    message = f"{corpus}:2, field 'text': must hold text, got int: 5. Write documents as strings, or name the text"
    with pytest.raises(DataError, match="^" + re.escape(message)):
        sample_prompts(str(corpus), tiny_tokenizer, PromptConfig(max_prefix_tokens=4, seed=0))
    # The same from the command line, before any policy loads.
    policy = f"{tiny_qwen2_lm_dir}:base"
    argv = ["trl-polar", "build-data", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--policy", policy,
            "--policy", policy, "--tokenizer", plain_tokenizer_dir]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"Error: {message} column with --text-column.")
    # Records that are not files are named by their index.
    with pytest.raises(DataError, match=r"^corpus index \d, field 'text': must hold text, got int"):
        sample_prompts([{"text": 6}, {"text": 7}], tiny_tokenizer, PromptConfig(max_prefix_tokens=4, seed=0))
    with pytest.raises(DataError, match=r"^The records do not form one table \(.*\); every record's 'text' must"):
        sample_prompts([{"text": "a b c"}, {"text": 7}], tiny_tokenizer, PromptConfig(max_prefix_tokens=4, seed=0))
