"""The device-path choice: packed rows as one segment row, and on CUDA the flex kernel, exact against the plain
forward (scores and gradients, fp32 within 1e-5, bf16 within the plain bf16 forward's own measured error).

The CUDA tests skip here without a GPU; `benchmarks/gpu_check.sh` runs them on one. The kernel tests need only torch
and transformers (a GPU image may lack trl and datasets); the training tests skip without those. Every CUDA test
asserts which kernel ran, so a silent switch to another kernel fails it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from toy_data import toy_rows
from transformers import AutoModelForSequenceClassification

from trl_polar import segment_attention, segment_flex
from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward

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


def _training():
    """The trainer and its data, or a skip where trl or datasets is missing (a bare GPU image)."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl_polar import trainer as trainer_module
    from trl_polar.config import PolarConfig

    return datasets.Dataset, PolarConfig, trainer_module


def _config(tmp_path, **overrides):
    _, PolarConfig, _ = _training()
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


@pytest.fixture
def layouts(monkeypatch):
    """Every layout the trainer builds, to assert which kernel each ran."""
    _, _, trainer_module = _training()
    built = []

    class Recorded(SegmentLayout):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trainer_module, "SegmentLayout", Recorded)
    return built


def _train(tmp_path, model_dir, batching, use_cpu, rows=6, **overrides):
    Dataset, _, trainer_module = _training()
    ds = Dataset.from_list(toy_rows(rows, seed=3, messages=True))
    args = _config(tmp_path, batching=batching, use_cpu=use_cpu, **overrides)
    model = _load(model_dir, "cpu" if use_cpu else "cuda")
    trainer = trainer_module.PolarRewardTrainer(model=model, args=args, train_dataset=ds)
    if batching == "packed" and use_cpu:
        trainer.data_collator = dataclasses.replace(trainer.data_collator, segment_attention=True)
    return trainer


def _assert_same_training(tmp_path, model_dir, use_cpu, batchings):
    """Loss and every gradient of each batching equal those of TRL's padded layout."""
    results = {}
    for batching in ("padded", *batchings):
        results[batching] = _loss_and_grads(_train(tmp_path, model_dir, batching, use_cpu), range(6))
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
    Dataset, _, trainer_module = _training()
    ds = Dataset.from_list(toy_rows(2, seed=3))

    def collator(model, **overrides):
        args = _config(tmp_path, batching="packed", use_cpu=True, **overrides)
        return trainer_module.PolarRewardTrainer(model=model, args=args, train_dataset=ds).data_collator

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
# branches longer than a tile (whole tiles), lone sequences; rows of exactly 512 and 1024 tokens (whole tiles, no
# pad: the inputs would reach the kernel as transposed views without the contiguity fix).
ROWS = [
    ([37, 11, 1], [[5, 17, 1, 9], [3, 30], [2, 2]], [12, 1, 7]),
    ([300], [[400, 5, 129]], [130]),
    ([256], [[32, 512, 100, 64, 300, 48, 200, 90]], []),
    ([128], [[128, 256]], []),
    ([256], [[256, 128, 127, 1]], [256]),
]


def _flex_layout(segments):
    """A layout on the "auto" rule, which must pick flex on a CUDA machine with triton."""
    return SegmentLayout(segments, torch.device("cuda"), kernel="auto")


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@cuda
@pytest.mark.parametrize("shape", ROWS)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cuda_flex_scores_and_gradients_equal_full_sequences(arch, shape, request):
    model = _load(request.getfixturevalue(f"tiny_{arch}_rm_dir"), "cuda")
    backbone = model.model
    row, segments, last, full = _row(torch.Generator().manual_seed(0), model.config.vocab_size, *shape)
    layout = _flex_layout(segments)
    hidden = segment_forward(backbone, torch.tensor(row, device="cuda"), layout)
    assert layout.kernel_calls == {"flex": model.config.num_hidden_layers}
    hidden[last].sum().backward()
    row_grads = _grads(backbone)
    model.zero_grad()
    expected = [backbone(input_ids=torch.tensor([seq], device="cuda")).last_hidden_state[0, -1] for seq in full]
    torch.testing.assert_close(hidden[last], torch.stack(expected), atol=1e-5, rtol=1e-5)
    sum(e.sum() for e in expected).backward()
    for name, grad in row_grads.items():
        torch.testing.assert_close(grad, dict(backbone.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


@cuda
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_cuda_flex_under_gradient_checkpointing(tiny_qwen2_rm_dir, use_reentrant):
    """Checkpointing recomputes each layer's forward inside the backward, flex included: the same gradients."""
    model = _load(tiny_qwen2_rm_dir, "cuda")
    row, segments, last, _ = _row(torch.Generator().manual_seed(5), model.config.vocab_size, *ROWS[3])
    ids = torch.tensor(row, device="cuda")
    layouts = []

    def run():
        model.zero_grad()
        layouts.append(_flex_layout(segments))
        with segment_attention.use_segment_attention(model.config):
            segment_forward(model.model, ids, layouts[-1])[last].sum().backward()
        return _grads(model.model)

    model.train()
    plain = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = run()
    layers = model.config.num_hidden_layers
    # The forward runs each layer once; the backward recomputes each through flex again.
    assert layouts[0].kernel_calls == {"flex": layers} and layouts[1].kernel_calls == {"flex": 2 * layers}
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def _head_dim_128_models(tokenizer_dir):
    """A reward-model backbone with real models' head size (128; 2 heads, 1 KV head), fp32 and bf16 copies."""
    from transformers import AutoTokenizer

    from trl_polar.tiny import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(tokenizer, "qwen2", hidden_size=256, num_attention_heads=2, num_key_value_heads=1)
    config.num_labels = 1
    torch.manual_seed(0)
    model32 = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").cuda().eval()
    model16 = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    model16.load_state_dict(model32.state_dict())
    return model32, model16.to("cuda", torch.bfloat16)


@cuda
def test_cuda_flex_bf16_head_dim_128_within_the_plain_bf16_error(tiny_tokenizer_dir):
    """bf16 at the real head size (128) through flex is as close to the fp32 values as the plain bf16 forward is:
    the threshold is the plain bf16 path's own measured error, which must itself be non-zero (bf16 really ran)."""
    model32, model16 = _head_dim_128_models(tiny_tokenizer_dir)
    assert model16.config.hidden_size // model16.config.num_attention_heads == 128
    row, segments, last, full = _row(torch.Generator().manual_seed(1), model32.config.vocab_size, *ROWS[4])
    layout = _flex_layout(segments)
    with torch.inference_mode():
        flex = segment_forward(model16.model, torch.tensor(row, device="cuda"), layout)[last].float()
        exact, plain = [], []
        for seq in full:
            ids = torch.tensor([seq], device="cuda")
            exact.append(model32.model(input_ids=ids).last_hidden_state[0, -1])
            plain.append(model16.model(input_ids=ids).last_hidden_state[0, -1].float())
    assert layout.kernel_calls == {"flex": model16.config.num_hidden_layers}
    exact, plain = torch.stack(exact), torch.stack(plain)
    plain_error = (plain - exact).abs().max().item()
    assert 0 < plain_error < 0.1 * exact.abs().max().item()
    assert (flex - exact).abs().max().item() <= 2 * plain_error


@cuda
def test_cuda_compiles_one_graph_per_grad_mode_for_every_length(tiny_llama_rm_dir):
    """Rows of many lengths (multiples of 128 among them), inference then training: one compiled flex graph each.
    Dynamo starts empty, so the count does not depend on which tests ran before."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    segment_flex._compiled_flex.cache_clear()
    segment_flex._BACKWARD_COMPILED.clear()
    model = _load(tiny_llama_rm_dir, "cuda")
    generator = torch.Generator().manual_seed(2)
    shapes = (
        (20, [3, 9]),
        (200, [50, 70, 90]),
        (128, [128]),
        (333, [400]),
        (64, [1000, 2, 7]),
        (9, [1]),
        (256, [256]),
    )
    rows = [_row(generator, model.config.vocab_size, [prefix], [branches], [])[:2] for prefix, branches in shapes]
    assert {len(row) for row, _ in rows} >= {256, 512}
    start = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for row, segments in rows:
            layout = _flex_layout(segments)
            segment_forward(model.model, torch.tensor(row, device="cuda"), layout)
            assert layout.kernel_calls == {"flex": model.config.num_hidden_layers}
    assert counters["stats"]["unique_graphs"] - start == 1
    model.train()
    for row, segments in rows:
        layout = _flex_layout(segments)
        segment_forward(model.model, torch.tensor(row, device="cuda"), layout).sum().backward()
        assert layout.kernel_calls == {"flex": model.config.num_hidden_layers}
    assert counters["stats"]["unique_graphs"] - start == 2


@cuda
def test_cuda_scorer_runs_flex_and_sliding_window_models_score_plainly(tiny_tokenizer_dir, tiny_qwen2_rm_dir):
    from transformers import AutoTokenizer

    from trl_polar.scorer import PolarScorer
    from trl_polar.template import PolarTemplate
    from trl_polar.tiny import build_tiny_reward_model

    prompts, references = ["What is 2+2?"] * 4, ["4"] * 4
    candidates = ["The answer is 4.", "5", "four, I think", "It is 4 because 2 + 2 = 4."]
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir)
    fast = PolarScorer(_load(tiny_qwen2_rm_dir), template, device="cuda")
    plain = PolarScorer(_load(tiny_qwen2_rm_dir), template, device="cuda", kernel="plain")
    with fast.observe() as runs:
        got = fast.score(prompts, references, candidates)
    assert got == pytest.approx(plain.score(prompts, references, candidates), abs=1e-5)
    layers = fast.model.config.num_hidden_layers
    assert {mb.kind for mb in runs[-1].plan} == {"row"} and runs[-1].kernels == {"flex": layers * len(runs[-1].plan)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    sliding = build_tiny_reward_model(
        tokenizer, arch="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1
    )
    scorer = PolarScorer(sliding.eval(), PolarTemplate(tokenizer), device="cuda")
    with scorer.observe() as runs:
        scorer.score(prompts, references, candidates)
    assert not scorer.uses_segment_attention and {mb.kind for mb in runs[-1].plan} == {"plain"}
    assert runs[-1].kernels == {}


@cuda
def test_cuda_training_shared_prefix_and_packed_match_padded(tmp_path, tiny_qwen2_rm_dir, layouts):
    _assert_same_training(tmp_path, tiny_qwen2_rm_dir, use_cpu=False, batchings=("packed", "shared_prefix"))
    assert len(layouts) == 2 and all(layout.kernel_calls == {"flex": 2} for layout in layouts)


def _bf16_training(tmp_path, model_dir, batching):
    trainer = _train(tmp_path, model_dir, batching, use_cpu=False, bf16=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # what accelerate wraps the training forward in
        return _loss_and_grads(trainer, range(6))


@cuda
def test_cuda_bf16_mixed_precision_training_through_flex(tmp_path, tiny_qwen2_rm_dir, layouts):
    """bf16 autocast (the training default on GPUs), forward and backward through the compiled kernel: the flex
    row's loss and gradients are as close to the fp32 ones as the padded bf16 path's are (its measured error is the
    tolerance), and every gradient really moved (a zero gradient is as far off as the gradient itself)."""
    loss32, grads32, _ = _loss_and_grads(_train(tmp_path, tiny_qwen2_rm_dir, "padded", use_cpu=False), range(6))
    loss_pad, grads_pad, _ = _bf16_training(tmp_path, tiny_qwen2_rm_dir, "padded")
    loss, grads, _ = _bf16_training(tmp_path, tiny_qwen2_rm_dir, "shared_prefix")
    assert len(layouts) == 1 and layouts[0].kernel_calls == {"flex": 2}
    assert abs(loss - loss32) <= 2 * abs(loss_pad - loss32) + 1e-3
    assert grads.keys() == grads32.keys()
    for name, want in grads32.items():
        scale = want.abs().max().item()
        tolerance = 2 * (grads_pad[name] - want).abs().max().item() + 1e-6 * scale
        error = (grads[name] - want).abs().max().item()
        assert error <= tolerance, f"{name}: {error:.3g} > {tolerance:.3g}"
        assert scale > 0 and error < 0.5 * scale, f"{name}: the gradient did not move"
