"""Official InternLM2 POLAR checkpoints -> standard Llama reward models: parity with the upstream scores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from trl_polar.checkpoints import convert_checkpoint, load_internlm2_reward_model, split_wqkv
from trl_polar.modeling import load_reward_model, prepare_reward_model
from trl_polar.template import PolarTemplate


@pytest.fixture(scope="module")
def reference(shared_fixtures):
    return json.loads((shared_fixtures / "internlm2_reward_tiny" / "reference_scores.json").read_text())


def padded_scores(model, inputs, side, pad_id=3):
    width = max(len(x) for x in inputs)
    rows, masks = [], []
    for ids in inputs:
        pads = [pad_id] * (width - len(ids))
        rows.append(ids + pads if side == "right" else pads + ids)
        ones, zeros = [1] * len(ids), [0] * len(pads)
        masks.append(ones + zeros if side == "right" else zeros + ones)
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks)).logits[:, 0].tolist()


def test_split_wqkv_follows_internlm2_grouped_layout():
    # 4 query heads, 2 KV heads, head_dim 1: per KV head the rows are [q, q, k, v].
    wqkv = torch.arange(8, dtype=torch.float32)[:, None]
    q, k, v = split_wqkv(wqkv, num_heads=4, num_kv_heads=2)
    assert q[:, 0].tolist() == [0, 1, 4, 5] and k[:, 0].tolist() == [2, 6] and v[:, 0].tolist() == [3, 7]
    with pytest.raises(ValueError, match="does not match the weights"):
        split_wqkv(torch.zeros(7, 3), num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_converted_in_memory_matches_upstream_scores(shared_fixtures, reference, attn):
    model = load_internlm2_reward_model(shared_fixtures / "internlm2_reward_tiny")
    model.config._attn_implementation = attn
    assert model.config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 5e7, "factor": 2.0}
    inputs = [case["input_ids"] for case in reference["inputs"]]
    expected = [case["score"] for case in reference["inputs"]]
    with torch.no_grad():
        singles = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in inputs]
    assert singles == pytest.approx(expected, abs=1e-4)
    assert padded_scores(model, inputs, "right") == pytest.approx(reference["batched_right_padded_scores"], abs=1e-4)
    assert padded_scores(model, inputs, "left") == pytest.approx(reference["batched_left_padded_scores"], abs=1e-4)
    # The per-token values of the head agree too, not just the last one.
    case = reference["inputs"][3]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([case["input_ids"]])).last_hidden_state
        values = model.score(hidden)[0, :, 0].tolist()
    assert values == pytest.approx(case["per_token_values"], abs=1e-4)


def test_convert_checkpoint_writes_a_plain_transformers_checkpoint(tmp_path, shared_fixtures, reference):
    src, tokenizer = shared_fixtures / "internlm2_reward_tiny", shared_fixtures / "bpe_tokenizer_with_bos"
    out = convert_checkpoint(src, tmp_path / "polar", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["reward_token_id"] == 1999 and config["polar_template"]["reward_token"] == "[UNUSED_TOKEN_130]"
    model = AutoModelForSequenceClassification.from_pretrained(out)  # no remote code
    inputs = [case["input_ids"] for case in reference["inputs"]]
    assert padded_scores(model, inputs, "right") == pytest.approx([c["score"] for c in reference["inputs"]], abs=1e-4)
    template = PolarTemplate.from_pretrained(out)
    assert template.reward_token_id == 1999 and template.max_length == 16384
    # Scoring through the template: the ids a user gets are what the model reads.
    ids = template.encode("How many r's in strawberry?", "3.", "There are three.")
    assert ids[0] == 1 and ids[-1] == 1999


def test_load_reward_model_converts_official_checkpoints_in_memory(shared_fixtures, reference):
    model, template = load_reward_model(
        shared_fixtures / "internlm2_reward_tiny", tokenizer=str(shared_fixtures / "bpe_tokenizer_with_bos")
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    case = reference["inputs"][0]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([case["input_ids"]])).logits[0, 0].item() == pytest.approx(
            case["score"], abs=1e-4
        )
    # Training decides by the same rule (PolarConfig.trust_remote_code reaches prepare_reward_model).
    for load in (load_reward_model, prepare_reward_model):
        with pytest.raises(ValueError, match="Refusing to run the remote code"):
            load(shared_fixtures / "internlm2_reward_tiny", trust_remote_code=True)


def test_scorer_on_official_checkpoint_matches_upstream_scores(shared_fixtures, reference):
    """PolarScorer's unpadded rows and shared prefixes reproduce the upstream scores of the official architecture."""
    from trl_polar.scorer import PolarScorer

    model, template = load_reward_model(
        shared_fixtures / "internlm2_reward_tiny", tokenizer=str(shared_fixtures / "bpe_tokenizer_with_bos")
    )
    inputs = [case["input_ids"] for case in reference["inputs"]]
    scorer = PolarScorer(model, template, device="cpu")
    # Items 0, 1, 2 and 5 start with the same 8 ids: one group sharing that prefix; the others run whole.
    keys = ["shared" if i in (0, 1, 2, 5) else i for i in range(len(inputs))]
    with scorer.observe() as runs:
        got = scorer.score_ids(inputs, keys)
    assert got == pytest.approx([case["score"] for case in reference["inputs"]], abs=1e-4)
    plan = runs[-1].plan
    prefixes = dict(zip(plan[0].indices, plan[0].prefixes, strict=True))
    assert [prefixes[i] for i in (0, 1, 2, 5)] == [8] * 4 and len(plan) == 1


def test_a_tokenizer_of_another_model_is_refused(tmp_path, shared_fixtures, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        convert_checkpoint(shared_fixtures / "internlm2_reward_tiny", tmp_path / "bad", tokenizer=tiny_tokenizer_dir)


def test_convert_command_takes_every_dtype_name(tmp_path, shared_fixtures):
    def convert(dtype: str) -> subprocess.CompletedProcess:
        src, tokenizer = shared_fixtures / "internlm2_reward_tiny", shared_fixtures / "bpe_tokenizer_with_bos"
        args = ["convert", str(src), str(tmp_path / dtype), "--tokenizer", str(tokenizer), "--dtype", dtype]
        return subprocess.run(
            [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=120
        )

    out = convert("half")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "Error: `--dtype` must be 'auto', one of 'bf16', 'bfloat16', 'fp16', 'float16', 'fp32', 'float32' or a "
        "torch.dtype, got 'half'. 'auto' is bfloat16 on a GPU that supports it and float32 elsewhere."
    ]
    assert convert("bf16").returncode == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert model.score.weight.dtype == torch.bfloat16
