"""The device-path choice: packed rows as one segment row, and on CUDA the flex kernel, exact against the plain
forward (scores and gradients, fp32 within 1e-5, bf16 within the plain bf16 forward's own spread).

The CUDA tests skip here without a GPU; `benchmarks/gpu_check.sh` runs them on one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from toy_data import toy_rows
from transformers import AutoModelForSequenceClassification

from trl_polar import segment_attention
from trl_polar import trainer as trainer_module
from trl_polar.config import PolarConfig
from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward
from trl_polar.trainer import PolarRewardTrainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")

FAST = {
    "bf16": False,
    "report_to": "none",
    "gradient_checkpointing": False,
    "save_strategy": "no",
    "max_length": 1024,
    "max_response_length": 384,
    "per_device_train_batch_size": 4,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}


def _config(tmp_path, **overrides) -> PolarConfig:
    return PolarConfig(output_dir=str(tmp_path / "out"), **{**FAST, **overrides})


def _load(model_dir, device="cpu", dtype=torch.float32):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype)
    return model.to(device)


def _loss_and_grads(trainer, rows):
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, batch


def _assert_same_training(tmp_path, model_dir, use_cpu, batchings):
    """Loss and every gradient of each batching equal those of TRL's padded layout."""
    ds = Dataset.from_list(toy_rows(6, seed=3, messages=True))
    results = {}
    for batching in ("padded", *batchings):
        args = _config(tmp_path, batching=batching, use_cpu=use_cpu)
        trainer = PolarRewardTrainer(model=_load(model_dir), args=args, train_dataset=ds)
        if batching == "packed" and use_cpu:
            trainer.data_collator = dataclasses.replace(trainer.data_collator, segment_attention=True)
        results[batching] = _loss_and_grads(trainer, range(6))
    loss0, grads0, _ = results["padded"]
    for batching in batchings:
        loss, grads, batch = results[batching]
        assert batch["input_ids"].shape[0] == 1 and "segments" in batch, "one unpadded row with its segments"
        assert abs(loss - loss0) <= 1e-5, batching
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], atol=1e-5, rtol=0, msg=f"{batching}: {name}")


def test_packed_as_one_segment_row_gives_padded_loss_and_gradients(tmp_path, tiny_qwen2_rm_dir):
    """The layout CUDA training gives `packed` (one unpadded row with segments, no sharing), run here on CPU."""
    _assert_same_training(tmp_path, tiny_qwen2_rm_dir, use_cpu=True, batchings=("packed",))


def test_packed_takes_segments_only_where_flex_runs(tmp_path, tiny_qwen2_rm_dir, monkeypatch):
    ds = Dataset.from_list(toy_rows(2, seed=3))

    def collator(model, **overrides):
        args = _config(tmp_path, batching="packed", use_cpu=True, **overrides)
        return PolarRewardTrainer(model=model, args=args, train_dataset=ds).data_collator

    assert not collator(_load(tiny_qwen2_rm_dir)).segment_attention  # CPU: the model's own attention
    # What a CUDA device answers; the flex kernel itself runs in the CUDA tests below.
    monkeypatch.setattr(trainer_module, "flex_available", lambda device: True)
    assert collator(_load(tiny_qwen2_rm_dir)).segment_attention
    sliding = _load(tiny_qwen2_rm_dir)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert not collator(sliding).segment_attention  # flex has no sliding window: sdpa keeps the packed rows
    varlen = _load(tiny_qwen2_rm_dir)
    varlen.config._attn_implementation = "flash_attention_2"
    assert not collator(varlen).segment_attention  # a varlen kernel needs no mask for packed rows


# ------------------------------------------------------------------------------------------------------------ CUDA
def _row(generator, vocab, prefix_lengths, branch_lengths, alone_lengths):
    rand = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    row, segments, last, full = [], [], [], []
    for p, branches in zip(prefix_lengths, branch_lengths, strict=True):
        prefix, start = rand(p), len(row)
        segments.append(Segment(start, p))
        row += prefix
        for b in branches:
            branch = rand(b)
            segments.append(Segment(len(row), b, start, p))
            row += branch
            last.append(len(row) - 1)
            full.append(prefix + branch)
    for n in alone_lengths:
        seq = rand(n)
        segments.append(Segment(len(row), n))
        row += seq
        last.append(len(row) - 1)
        full.append(seq)
    return row, segments, last, full


# Several bucketings of one row: tiny segments inside one tile, tiles shared by many segments, a prefix and
# branches longer than a tile (whole tiles), lone sequences.
ROWS = [
    ([37, 11, 1], [[5, 17, 1, 9], [3, 30], [2, 2]], [12, 1, 7]),
    ([300], [[400, 5, 129]], [130]),
    ([256], [[32, 512, 100, 64, 300, 48, 200, 90]], []),
]


@cuda
@pytest.mark.parametrize("shape", ROWS)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_flex_scores_and_gradients_equal_full_sequences(arch, shape, request, monkeypatch):
    calls = []
    choose = segment_attention._choose_kernel
    monkeypatch.setattr(segment_attention, "_choose_kernel", lambda *a: calls.append(choose(*a)) or calls[-1])
    model = _load(request.getfixturevalue(f"tiny_{arch}_rm_dir"), "cuda")
    backbone = model.model
    row, segments, last, full = _row(torch.Generator().manual_seed(0), model.config.vocab_size, *shape)
    layout = SegmentLayout(segments, torch.device("cuda"))
    hidden = segment_forward(backbone, torch.tensor(row, device="cuda"), layout)
    assert calls == ["flex"] * model.config.num_hidden_layers
    hidden[last].sum().backward()
    row_grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = [backbone(input_ids=torch.tensor([seq], device="cuda")).last_hidden_state[0, -1] for seq in full]
    torch.testing.assert_close(hidden[last], torch.stack(expected), atol=1e-5, rtol=1e-5)
    sum(e.sum() for e in expected).backward()
    for name, grad in row_grads.items():
        torch.testing.assert_close(grad, dict(backbone.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


@cuda
def test_cuda_flex_bf16_within_the_plain_bf16_spread(tiny_qwen2_rm_dir):
    """bf16 through flex is as close to the fp32 values as the plain bf16 forward is."""
    model32 = _load(tiny_qwen2_rm_dir, "cuda")
    model16 = _load(tiny_qwen2_rm_dir, "cuda", torch.bfloat16)
    row, segments, last, full = _row(torch.Generator().manual_seed(1), model32.config.vocab_size, *ROWS[2])
    with torch.inference_mode():
        layout = SegmentLayout(segments, torch.device("cuda"))
        flex = segment_forward(model16.model, torch.tensor(row, device="cuda"), layout)[last].float()
        exact, plain = [], []
        for seq in full:
            ids = torch.tensor([seq], device="cuda")
            exact.append(model32.model(input_ids=ids).last_hidden_state[0, -1])
            plain.append(model16.model(input_ids=ids).last_hidden_state[0, -1].float())
    exact, plain = torch.stack(exact), torch.stack(plain)
    spread = (plain - exact).abs().max().item()
    assert (flex - exact).abs().max().item() <= 2 * spread + 1e-3


@cuda
def test_cuda_training_shared_prefix_and_packed_match_padded(tmp_path, tiny_qwen2_rm_dir):
    _assert_same_training(tmp_path, tiny_qwen2_rm_dir, use_cpu=False, batchings=("packed", "shared_prefix"))


@cuda
def test_cuda_bf16_mixed_precision_training_through_flex(tmp_path, tiny_qwen2_rm_dir):
    """bf16 autocast (the training default on GPUs): the flex row's loss and gradients stay as close to the padded
    bf16 ones as bf16 allows, forward and backward through the compiled kernel."""
    ds = Dataset.from_list(toy_rows(6, seed=3, messages=True))
    results = {}
    for batching in ("padded", "shared_prefix"):
        args = _config(tmp_path, batching=batching, use_cpu=False, bf16=True)
        trainer = PolarRewardTrainer(model=_load(tiny_qwen2_rm_dir), args=args, train_dataset=ds)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # what accelerate wraps the training forward in
            results[batching] = _loss_and_grads(trainer, range(6))
    (loss0, grads0, _), (loss, grads, _) = results["padded"], results["shared_prefix"]
    assert abs(loss - loss0) <= 2e-2
    for name in grads0:
        assert torch.isfinite(grads[name]).all()
        torch.testing.assert_close(grads[name], grads0[name], atol=5e-2, rtol=5e-2, msg=name)


@cuda
def test_cuda_recompilation_is_bounded(tiny_llama_rm_dir):
    """Rows of many lengths: at most two compiles of the flex kernel (static, then dynamic) per grad mode."""
    from torch._dynamo.utils import counters

    model = _load(tiny_llama_rm_dir, "cuda")
    before = counters["stats"]["unique_graphs"]
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for prefix, branches in ((20, [3, 9]), (200, [50, 70, 90]), (333, [400]), (64, [1000, 2, 7]), (9, [1])):
            row, segments, _, _ = _row(generator, model.config.vocab_size, [prefix], [branches], [])
            segment_forward(model.model, torch.tensor(row, device="cuda"), SegmentLayout(segments, model.device))
    assert counters["stats"]["unique_graphs"] - before <= 2


@cuda
def test_cuda_scorer_uses_flex_and_sliding_window_models_score_plainly(tiny_tokenizer_dir, tiny_qwen2_rm_dir):
    from transformers import AutoTokenizer

    from trl_polar.scorer import PolarScorer
    from trl_polar.template import PolarTemplate
    from trl_polar.tiny import build_tiny_reward_model

    prompts, references = ["What is 2+2?"] * 4, ["4"] * 4
    candidates = ["The answer is 4.", "5", "four, I think", "It is 4 because 2 + 2 = 4."]
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir)
    fast = PolarScorer(_load(tiny_qwen2_rm_dir), template, device="cuda")
    plain = PolarScorer(_load(tiny_qwen2_rm_dir), template, device="cuda")
    plain._segments = False
    assert fast.score(prompts, references, candidates) == pytest.approx(
        plain.score(prompts, references, candidates), abs=1e-5
    )
    assert fast.uses_segment_attention and {mb.kind for mb in fast.last_plan} == {"row"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sliding = build_tiny_reward_model(
        tokenizer, arch="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1
    )
    scorer = PolarScorer(sliding.eval(), PolarTemplate(tokenizer), device="cuda")
    scorer.score(prompts, references, candidates)
    assert not scorer.uses_segment_attention and {mb.kind for mb in scorer.last_plan} == {"plain"}
