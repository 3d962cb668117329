"""PolarScorer's attention is chosen by rule and never switched by trial: the fast path's own bugs fail its tests,
a kernel that cannot run is an error naming the way out, and `observe` shows what ran."""

from __future__ import annotations

import logging

import pytest
import torch

from trl_polar.scorer import PolarScorer
from trl_polar.template import PolarTemplate

PROMPTS = ["What is 2 + 2?"] * 5 + ["Say hi."] * 2
REFERENCES = ["4"] * 5 + ["hi"] * 2
# A GRPO group often holds the same answer twice: their common prefix is the whole sequence, so each must keep at
# least its last token as its own segment (an off-by-one there lays out an empty segment).
CANDIDATES = ["4", "4", "It is 4.", "five", "4", "hi", "hi"]


def _model(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa").eval()


def _one_by_one(model, template):
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([template.encode(p, r, c)])).logits[0, 0].item()
            for p, r, c in zip(PROMPTS, REFERENCES, CANDIDATES, strict=True)
        ]


def test_duplicate_answers_run_the_fast_path_exactly(tiny_qwen2_rm_dir, caplog):
    model = _model(tiny_qwen2_rm_dir)
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir)
    with caplog.at_level(logging.INFO, logger="trl_polar"):
        scorer = PolarScorer(model, template, device="cpu")
        with scorer.observe() as runs:
            got = scorer.score(PROMPTS, REFERENCES, CANDIDATES)
    assert got == pytest.approx(_one_by_one(model, template), abs=1e-5)
    (run,) = runs
    assert [mb.kind for mb in run.plan] == ["row"] and min(run.plan[0].prefixes) > 0
    assert run.kernels == {"split": model.config.num_hidden_layers}
    assert "segment attention (kernel='auto')" in caplog.text and "kernel calls {'split': 2}" in caplog.text


def test_the_kernel_is_the_one_asked_for(tiny_qwen2_rm_dir, monkeypatch):
    model = _model(tiny_qwen2_rm_dir)
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir)
    expected = _one_by_one(model, template)
    for kernel, ran in (("buckets", {"buckets": 2}), ("plain", {})):
        scorer = PolarScorer(model, template, device="cpu", kernel=kernel)
        with scorer.observe() as runs:
            assert scorer.score(PROMPTS, REFERENCES, CANDIDATES) == pytest.approx(expected, abs=1e-5)
        assert runs[-1].kernels == ran and scorer.uses_segment_attention == (kernel != "plain")
    monkeypatch.setenv("TRL_POLAR_ATTENTION_KERNEL", "buckets")  # what layouts built without a kernel take
    scorer = PolarScorer(model, template, device="cpu")
    with scorer.observe() as runs:
        scorer.score(PROMPTS, REFERENCES, CANDIDATES)
    assert runs[-1].kernels == {"buckets": 2}
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        PolarScorer(model, template, device="cpu", kernel="dense")


def test_a_model_that_cannot_take_segment_attention_is_an_error_with_the_fix(tiny_tokenizer_dir, tiny_qwen2_rm_dir):
    from transformers import AutoTokenizer

    from trl_polar.tiny import build_tiny_reward_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    sliding = build_tiny_reward_model(tokenizer, arch="qwen2", **config).eval()
    with pytest.raises(ValueError, match="no sliding window; use kernel='plain'"):
        PolarScorer(sliding, PolarTemplate(tokenizer), device="cpu", kernel="flex")
    # A backbone whose attention does not pass the layout through: an error, not a quiet switch to plain batches.
    model = _model(tiny_qwen2_rm_dir)
    scorer = PolarScorer(model, PolarTemplate.from_pretrained(tiny_qwen2_rm_dir), device="cpu")
    layer = model.model.layers[0].self_attn
    forward = layer.forward
    layer.forward = lambda *args, segment_layout=None, **kwargs: forward(*args, segment_layout=None, **kwargs)
    with pytest.raises(RuntimeError, match=r"failed under segment attention .*kernel='plain'"):
        scorer.score(PROMPTS, REFERENCES, CANDIDATES)
    assert scorer.uses_segment_attention, "nothing was switched off"
