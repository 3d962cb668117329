"""Segment attention: one unpadded row of shared prefixes and their branches gives the full sequences' values."""

from __future__ import annotations

import warnings

import pytest
import torch

from trl_polar import segment_attention
from trl_polar.segment_attention import Segment, SegmentLayout, segment_forward


def _row(prefixes, branches, alone):
    """Lay out groups (a prefix, then its branches) and lone sequences; return the row, its segments, where each
    sequence's last token sits, and the full sequences themselves."""
    row, segments, last, full = [], [], [], []
    for prefix, group in zip(prefixes, branches, strict=True):
        start = len(row)
        segments.append(Segment(start, len(prefix)))
        row += prefix
        for branch in group:
            segments.append(Segment(len(row), len(branch), start, len(prefix)))
            row += branch
            last.append(len(row) - 1)
            full.append(prefix + branch)
    for seq in alone:
        segments.append(Segment(len(row), len(seq)))
        row += seq
        last.append(len(row) - 1)
        full.append(seq)
    return row, segments, last, full


def _random_ids(generator, vocab, *lengths):
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture
def eager_flex():
    """kernel="flex_eager" (FlexAttention without torch.compile) computes a dense reference: fast for tiny rows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.mark.parametrize(
    ("kernel", "waste"),
    [("buckets", 1.0), ("buckets", 1.3), ("buckets", 1000.0), ("split", 1.3), ("split", 1000.0), ("flex_eager", 1.3)],
)  # waste: a bucket per segment, the default, everything in two
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hidden_states_equal_full_sequences(arch, attn, kernel, waste, request, monkeypatch, eager_flex):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setattr(segment_attention, "MAX_PADDING_WASTE", waste)
    # Inference on CPU takes the log-sum-exp split; the buckets are what CPU training takes, flex what CUDA takes.
    path = request.getfixturevalue(f"tiny_{arch}_rm_dir")
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=attn).eval()
    backbone = model.model
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    # Prefixes of different lengths, branches from 1 token up, and lone sequences: every kind of padding in a bucket.
    prefixes = _random_ids(g, vocab, 37, 11, 1)
    branches = [_random_ids(g, vocab, 5, 17, 1, 9), _random_ids(g, vocab, 3, 30), _random_ids(g, vocab, 2, 2)]
    alone = _random_ids(g, vocab, 12, 1, 7)
    row, segments, last, full = _row(prefixes, branches, alone)
    layout = SegmentLayout(segments, torch.device("cpu"), kernel=kernel)
    if waste == 1000.0:
        assert len(layout.buckets) == 2  # one masked bucket of branches, one causal bucket of the rest
    assert layout.split is not None and len(layout.split[1]) == 3  # one context span per prefix
    with torch.inference_mode():
        hidden = segment_forward(backbone, torch.tensor(row), layout)
        for position, seq in zip(last, full, strict=True):
            expected = backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[position], expected, atol=1e-5, rtol=1e-5)
    # Every token of a prefix also equals the prefix run alone.
    with torch.inference_mode():
        alone_prefix = backbone(input_ids=torch.tensor([prefixes[0]])).last_hidden_state[0]
    torch.testing.assert_close(hidden[: len(prefixes[0])], alone_prefix, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == attn, "the model's own attention is restored after the forward"
    assert layout.kernel_calls == {kernel: model.config.num_hidden_layers}


def test_the_kernel_rule_and_the_users_choice(monkeypatch):
    """ "auto" picks by rule (CPU: the split for inference, the buckets for training or dropout); a named kernel, or
    TRL_POLAR_ATTENTION_KERNEL for layouts built without one, is what runs; a bad name is refused with the choices."""
    layout = SegmentLayout([Segment(0, 3), Segment(3, 2, 0, 3)], torch.device("cpu"))
    q = torch.zeros(1, 2, 5, 4)
    grad = q.clone().requires_grad_(True)
    assert segment_attention.choose_kernel(layout, q, q, q) == ("split", "auto: CPU inference")
    assert segment_attention.choose_kernel(layout, grad, grad, grad) == ("buckets", "auto: cpu training")
    assert segment_attention.choose_kernel(layout, q, q, q, dropout=0.1) == ("buckets", "auto: attention dropout")
    assert not segment_attention.flex_available(torch.device("cpu"))
    forced = SegmentLayout([Segment(0, 3), Segment(3, 2, 0, 3)], torch.device("cpu"), kernel="flex")
    assert segment_attention.choose_kernel(forced, grad, grad, grad) == ("flex", "chosen")
    monkeypatch.setenv("TRL_POLAR_ATTENTION_KERNEL", "buckets")
    assert SegmentLayout([Segment(0, 3)], torch.device("cpu")).kernel == "buckets"
    assert SegmentLayout([Segment(0, 3)], torch.device("cpu"), kernel="split").kernel == "split"
    monkeypatch.setenv("TRL_POLAR_ATTENTION_KERNEL", "dense")
    with pytest.raises(ValueError, match="TRL_POLAR_ATTENTION_KERNEL='dense'.*one of"):
        SegmentLayout([Segment(0, 3)], torch.device("cpu"))
    with pytest.raises(ValueError, match="kernel"):
        SegmentLayout([Segment(0, 3)], torch.device("cpu"), kernel="dense")


def _visible(segments, length):
    """The exact [T, T] visibility of a row, the slow obvious way (the tail past ``length`` sees only itself)."""
    visible = torch.zeros(length, length, dtype=torch.bool)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in segments:
        for i in range(s.start, s.start + s.length):
            visible[i, s.context_start : s.context_start + s.context_length] = True
            visible[i, s.start : i + 1] = True
            covered[i] = True
    return visible | torch.diag(~covered)


def _assert_flex_exact(layout):
    """What FlexAttention computes from the layout's block mask (whole tiles, plus tiles masked per element by
    mask_mod, nothing else) is exactly the row's visibility, and whole tiles are really whole. Returns the tiles."""
    mask = layout.flex
    padded = mask.seq_lengths[0]
    tiles = padded // segment_attention.FLEX_BLOCK
    partial_tiles, full_tiles = (torch.zeros(tiles, tiles, dtype=torch.bool) for _ in range(2))
    for found, num, index in (
        (partial_tiles, mask.kv_num_blocks, mask.kv_indices),
        (full_tiles, mask.full_kv_num_blocks, mask.full_kv_indices),
    ):
        for qb in range(tiles):
            found[qb, index[0, 0, qb, : num[0, 0, qb]].long()] = True
    assert not (partial_tiles & full_tiles).any()
    expand = lambda t: t.repeat_interleave(128, 0).repeat_interleave(128, 1)  # noqa: E731
    q, kv = torch.arange(padded)[:, None], torch.arange(padded)[None, :]
    visible = _visible(layout.segments, padded)
    computed = expand(full_tiles) | (expand(partial_tiles) & mask.mask_mod(0, 0, q, kv))
    torch.testing.assert_close(computed, visible, rtol=0, atol=0)
    assert visible[expand(full_tiles)].all()  # whole tiles take no mask_mod
    return partial_tiles, full_tiles


@pytest.mark.parametrize(
    "segments",
    [
        # A long prefix and long branches (whole tiles skip mask_mod), short branches, a lone sequence.
        [Segment(0, 300), Segment(300, 400, 0, 300), Segment(700, 5, 0, 300), Segment(705, 130)],
        # Branches of two prefixes interleaved, a gap no segment covers, one-token segments.
        [Segment(0, 9), Segment(9, 6), Segment(15, 4, 0, 9), Segment(19, 3, 9, 6), Segment(22, 1, 0, 9)]
        + [Segment(30, 1), Segment(31, 140, 30, 1)],
        # Exactly one tile.
        [Segment(0, 100), Segment(100, 28, 0, 100)],
    ],
)
def test_flex_block_mask_is_the_exact_visibility(segments):
    """What FlexAttention computes (whole tiles, plus tiles masked per element by mask_mod, nothing else) is exactly
    each token's context and causal self; whole tiles are really whole, and tiles nobody sees are skipped."""
    layout = SegmentLayout(segments, torch.device("cpu"), kernel="flex")
    padded = layout.flex.seq_lengths[0]
    block = segment_attention.FLEX_BLOCK
    assert padded == max(2 * block, -(-layout.length // block) * block)  # whole tiles, at least two
    partial_tiles, full_tiles = _assert_flex_exact(layout)
    if segments[0].length == 300:
        assert full_tiles.any() and not (partial_tiles | full_tiles).all()


def test_interleaved_branches_take_the_bucketed_path(tiny_qwen2_rm_dir):
    """Branches of two prefixes interleaved in the row: no contiguous run per context, so no split; still exact."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir).eval()
    g = torch.Generator().manual_seed(2)
    p1, p2, a, b, c = _random_ids(g, model.config.vocab_size, 9, 6, 4, 3, 5)
    row = p1 + p2 + a + b + c
    segments = [Segment(0, 9), Segment(9, 6), Segment(15, 4, 0, 9), Segment(19, 3, 9, 6), Segment(22, 5, 0, 9)]
    layout = SegmentLayout(segments, torch.device("cpu"))
    assert layout.split is None
    with pytest.raises(ValueError, match="contiguous run"):
        segment_forward(model.model, torch.tensor(row), SegmentLayout(segments, torch.device("cpu"), kernel="split"))
    with torch.inference_mode():
        hidden = segment_forward(model.model, torch.tensor(row), layout)
        for position, seq in ((18, p1 + a), (21, p2 + b), (26, p1 + c)):
            expected = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[position], expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_and_match(tiny_qwen2_rm_dir):
    """Nothing in the layout stops autograd: the row's loss gradients equal those of the full sequences."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir, attn_implementation="sdpa")
    backbone = model.model
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    row, segments, last, full = _row([_random_ids(g, vocab, 20)[0]], [_random_ids(g, vocab, 4, 9)], [])
    layout = SegmentLayout(segments, torch.device("cpu"))
    segment_forward(backbone, torch.tensor(row), layout)[last].sum().backward()
    row_grad = backbone.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    sum(backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1].sum() for seq in full).backward()
    torch.testing.assert_close(row_grad, backbone.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_layout_errors_and_positions():
    with pytest.raises(ValueError, match="at least one segment"):
        SegmentLayout([], torch.device("cpu"))
    with pytest.raises(ValueError, match="is empty"):
        SegmentLayout([Segment(0, 0)], torch.device("cpu"))
    layout = SegmentLayout([Segment(0, 4), Segment(4, 3, 0, 4), Segment(7, 2)], torch.device("cpu"))
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1]]


def test_attention_without_layout_says_how_to_call_it():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(TypeError, match="segment_layout=SegmentLayout"):
        segment_attention.segment_attention_forward(torch.nn.Module(), q, q, q, None)


def test_compiled_flex_on_cpu_is_exact_and_compiles_once_for_every_length(tiny_llama_rm_dir):
    """The fused kernel (torch.compile'd flex, C++ on CPU; forward only): rows of several lengths, exact multiples of
    the tile among them (no pad, so the inputs would reach the kernel as transposed views), give the full sequences'
    values from one compiled graph. Dynamo starts empty, so the count does not depend on what ran before."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForSequenceClassification

    from trl_polar import segment_flex

    torch._dynamo.reset()
    segment_flex._compiled_flex.cache_clear()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_rm_dir, attn_implementation="sdpa").eval()
    backbone = model.model
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    before, lengths = counters["stats"]["unique_graphs"], []
    for prefix, branches in ((200, (40, 16)), (20, (3, 9)), (300, (84,)), (150, (40, 90, 1))):
        row, segments, last, full = _row([_random_ids(g, vocab, prefix)[0]], [_random_ids(g, vocab, *branches)], [])
        lengths.append(len(row))
        layout = SegmentLayout(segments, torch.device("cpu"), kernel="flex")
        with torch.inference_mode():
            hidden = segment_forward(backbone, torch.tensor(row), layout)
            expected = [backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1] for seq in full]
        torch.testing.assert_close(hidden[last], torch.stack(expected), atol=1e-5, rtol=1e-5)
        assert layout.kernel_calls == {"flex": model.config.num_hidden_layers}
    assert {256, 384} <= set(lengths), "rows of exactly two and three tiles, which need no pad"
    assert counters["stats"]["unique_graphs"] - before == 1


def test_past_the_recompile_limit_flex_fails_instead_of_running_eagerly(monkeypatch):
    """Dynamo would run flex uncompiled (the full T x T scores) once a function has too many compiled variants: that
    is an error here, naming the kernel and the limit."""
    from trl_polar import segment_flex

    torch._dynamo.reset()
    segment_flex._compiled_flex.cache_clear()
    monkeypatch.setattr(segment_flex, "FLEX_RECOMPILE_LIMIT", 1)
    layout = SegmentLayout([Segment(0, 300)], torch.device("cpu"), kernel="flex")
    q = torch.randn(1, 2, 300, 16)
    with torch.inference_mode():
        segment_flex.flex_attention_row(layout, q, q, q, None)  # the one variant allowed
        with pytest.raises(segment_attention.KernelError, match="more than 1 compiled variants.*eagerly"):
            segment_flex.flex_attention_row(layout, *(q.double() for _ in range(3)), None)
    torch._dynamo.reset()


def test_a_failing_flex_kernel_is_an_error_naming_it_and_the_way_out(tiny_qwen2_rm_dir):
    """No fallback: flex with gradients on CPU (torch has no CPU flex backward) fails in the backward's compile,
    which runs inside the forward's error handling, with the kernel, the part and how to choose another named."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(4)
    row, segments, _, _ = _row([_random_ids(g, 500, 20)[0]], [_random_ids(g, 500, 4, 9)], [])
    layout = SegmentLayout(segments, torch.device("cpu"), kernel="flex")
    with pytest.raises(segment_attention.KernelError, match="flex kernel .* failed in the backward") as err:
        segment_forward(model.model, torch.tensor(row), layout)
    assert "TRL_POLAR_ATTENTION_KERNEL=buckets" in str(err.value)
    assert layout.kernel_calls == {"flex": 1}  # the first layer raised; nothing ran another kernel instead


def test_eager_flex_refuses_rows_it_would_blow_up():
    """Uncompiled flex materialises T x T scores: a reference for tiny rows, an error (not a crawl) past that."""
    q = torch.zeros(1, 2, 4000, 8)
    layout = SegmentLayout([Segment(0, 4000)], torch.device("cpu"), kernel="flex_eager")
    with pytest.raises(segment_attention.KernelError, match="full 4096x4096 score matrix.*kernel='flex'"):
        segment_attention.segment_attention_forward(torch.nn.Module(), q, q, q, None, segment_layout=layout)


@pytest.mark.parametrize("seed", range(4))
def test_flex_block_mask_of_packed_rows(seed):
    """Rows as the scorer and the collator lay them out (random groups and lone sequences): the tiles FlexAttention
    computes give exactly the visibility of the row."""
    from trl_polar.packing import group_units, lay_out

    g = torch.Generator().manual_seed(seed)
    sequences, units = [], []
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        prefix = _random_ids(g, 50, int(torch.randint(1, 200, (1,), generator=g)))[0]
        sizes = torch.randint(1, 150, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        members = range(len(sequences), len(sequences) + len(sizes))
        sequences += [prefix + branch for branch in _random_ids(g, 50, *sizes)]
        units += group_units(sequences, members)
    row = lay_out(sequences, units)
    _assert_flex_exact(SegmentLayout(row.segments, torch.device("cpu"), kernel="flex"))
