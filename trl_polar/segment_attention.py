"""Shared-prefix attention over one flat, unpadded row of segments.

A micro-batch of POLAR items becomes one row: each (prompt, reference) prefix once, then every candidate's own
tokens, with no padding. Each segment attends to an optional *context* span earlier in the row (its group's prefix)
and causally to itself; its position ids continue from the context. The projections and MLPs, most of a
transformer's work, run over the unique tokens only; only attention knows about the sharing, and it computes for
every token exactly what the full sequence ``context + segment`` would.

Attention is computed per *bucket*: segments of similar shape gathered into one padded batch (queries, and keys and
values of context + segment), one ``scaled_dot_product_attention`` call per bucket and layer, with a mask for the
context slots. The gather indices and masks are built once per row and reused by every layer. Inference on CPU
takes an exact shortcut (`SegmentLayout.split`): each segment causally over itself, plus one unmasked call per
context for all the tokens that read it, merged by their log-sum-exps; the prefix's keys are read in place instead
of being copied per candidate.

The model's own layers do the rest: the row goes through the backbone with ``segment_layout=layout``, a keyword
transformers passes through every layer to the attention function, while `use_segment_attention` points the config
at this module's attention function for the duration of the forward. transformers builds no mask for an attention
function it has no mask function for, so no dense mask is ever made.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .segment_flex import FLEX_BLOCK, KernelError, flex_attention_row, flex_available, flex_block_mask

__all__ = [
    "ATTENTION_NAME",
    "FLEX_BLOCK",
    "KERNELS",
    "KERNEL_ENV",
    "KernelError",
    "Segment",
    "SegmentLayout",
    "choose_kernel",
    "flex_available",
    "has_sliding_window",
    "segment_attention_forward",
    "segment_forward",
    "use_segment_attention",
]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "polar_segments"
# Kernels of `segment_attention_forward`. "auto" chooses by rule (`choose_kernel`): flex on CUDA with triton; on CPU
# the log-sum-exp split for inference, the buckets for training. "flex_eager" is flex uncompiled: a dense reference
# for tests on tiny rows.
KERNELS = ("auto", "flex", "buckets", "split", "flex_eager")
# The environment variable that chooses the kernel of every layout built without one (the trainer's, the scorer's).
KERNEL_ENV = "TRL_POLAR_ATTENTION_KERNEL"
# A bucket takes another segment while its padded attention area stays within this factor of the real one: more
# buckets mean more (smaller) kernel calls, fewer mean more wasted attention on padding.
MAX_PADDING_WASTE = 1.3
# Query-key pairs per bucket: bounds its mask and, with the query length, its gathered keys and values.
MAX_BUCKET_AREA = 1 << 24


@dataclass(frozen=True)
class Segment:
    """``length`` tokens at ``start`` of the row, attending to ``context_length`` tokens at ``context_start`` first.

    Example:

    >>> Segment(start=10, length=4, context_start=0, context_length=10).positions()
    [10, 11, 12, 13]
    """

    start: int
    length: int
    context_start: int = 0
    context_length: int = 0

    def positions(self) -> list[int]:
        return list(range(self.context_length, self.context_length + self.length))

    @property
    def area(self) -> int:
        """Query-key pairs the segment really needs (its own causal triangle counted whole, as kernels do)."""
        return self.length * (self.context_length + self.length)


@dataclass
class _Bucket:
    rows: int
    q_len: int
    kv_len: int
    q_index: torch.Tensor  # [rows * q_len] row positions of the queries (pads point at a real token)
    kv_index: torch.Tensor  # [rows * kv_len] row positions of context + own keys
    mask: torch.Tensor | None  # [rows, 1, q_len, kv_len] bool, None for plain causal segments
    out_src: torch.Tensor  # which padded query slots are real
    out_rows: torch.Tensor  # their row positions


class SegmentLayout:
    """The attention plan of one row: position ids and the buckets, on ``device``.

    ``kernel`` picks what computes it: "auto" chooses by `choose_kernel`'s rule; "flex", "buckets", "split" force
    one. Without ``kernel``, the environment variable ``TRL_POLAR_ATTENTION_KERNEL`` chooses (default "auto"). A
    kernel that fails raises `KernelError`; nothing falls back to another kernel. ``kernel_calls`` counts the kernels
    that ran, per attention call (one per layer and forward): what tests and benchmarks check.

    A prefix of 3 tokens and two 2-token candidates after it: the prefix gets a plain causal bucket, the candidates
    share one masked bucket (keys: the 3 context slots, then their own 2).

    Example:

    >>> layout = SegmentLayout([Segment(0, 3), Segment(3, 2, 0, 3), Segment(5, 2, 0, 3)], torch.device("cpu"))
    >>> layout.position_ids.tolist()
    [[0, 1, 2, 3, 4, 3, 4]]
    >>> causal, masked = layout.buckets
    >>> (causal.rows, causal.kv_len), (masked.rows, masked.kv_len)
    ((1, 3), (2, 5))
    """

    def __init__(self, segments: Sequence[Segment], device: torch.device, kernel: str | None = None) -> None:
        if kernel is None:
            kernel = os.environ.get(KERNEL_ENV, "").strip() or "auto"
            if kernel not in KERNELS:
                raise ValueError(f"{KERNEL_ENV}={kernel!r} is not a kernel; set it to one of {list(KERNELS)}.")
        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {list(KERNELS)}, got {kernel!r}.")
        self.kernel = kernel
        self.kernel_calls: collections.Counter[str] = collections.Counter()
        if not segments:
            raise ValueError("A segment layout needs at least one segment.")
        self.segments = list(segments)
        self.length = max(s.start + s.length for s in self.segments)
        positions = [0] * self.length
        for s in self.segments:
            if s.length <= 0:
                raise ValueError(f"Segment {s} is empty; every segment needs at least one token.")
            positions[s.start : s.start + s.length] = s.positions()
        self.position_ids = torch.tensor([positions], dtype=torch.long, device=device)
        self.device = device

    @functools.cached_property
    def buckets(self) -> list[_Bucket]:
        """Each segment's attention to its context and itself, bucketed (context slots masked per row)."""
        chunks = _bucketize(self.segments)
        return [_build_bucket([self.segments[i] for i in chunk], self.device) for chunk in chunks]

    @functools.cached_property
    def split(self) -> tuple[list[_Bucket], list[tuple[int, int, int, int]]] | None:
        """The same attention in two parts merged by log-sum-exp: every segment causally over itself (mask-free
        buckets), and per context one unmasked call of all the tokens that attend to it, which must then be one
        contiguous run ``(context_start, context_end, run_start, run_end)``. None where they are not."""
        runs: dict[tuple[int, int], list[Segment]] = {}
        for s in self.segments:
            if s.context_length:
                runs.setdefault((s.context_start, s.context_length), []).append(s)
        spans = []
        for (start, length), members in runs.items():
            members.sort(key=lambda s: s.start)
            first, last = members[0].start, members[-1].start + members[-1].length
            if sum(s.length for s in members) != last - first:
                return None
            spans.append((start, start + length, first, last))
        alone = [Segment(s.start, s.length) for s in self.segments]
        return [_build_bucket([alone[i] for i in chunk], self.device) for chunk in _bucketize(alone)], spans

    @functools.cached_property
    def flex(self):
        """The FlexAttention block mask of the row, its length rounded up to whole tiles (`padded_length`)."""
        return flex_block_mask(self.segments, self.length, self.device)


def _bucketize(segments: list[Segment]) -> Iterator[list[int]]:
    """Greedy buckets of similar segments: segments without context apart (they need no mask), longest first."""
    order = sorted(
        range(len(segments)),
        key=lambda i: (segments[i].context_length > 0, -segments[i].length, -segments[i].context_length),
    )
    chunk: list[int] = []
    real = 0
    q_len = kv_ctx = 0
    for i in order:
        s = segments[i]
        if chunk:
            same_kind = (s.context_length > 0) == (segments[chunk[0]].context_length > 0)
            ctx = max(kv_ctx, s.context_length)
            padded = (len(chunk) + 1) * q_len * (ctx + q_len)
            if same_kind and padded <= MAX_PADDING_WASTE * (real + s.area) and padded <= MAX_BUCKET_AREA:
                chunk.append(i)
                real += s.area
                kv_ctx = ctx
                continue
            yield chunk
        chunk, real, q_len, kv_ctx = [i], s.area, s.length, s.context_length
    if chunk:
        yield chunk


def _build_bucket(segments: list[Segment], device: torch.device) -> _Bucket:
    rows = len(segments)
    q_len = max(s.length for s in segments)
    ctx = max(s.context_length for s in segments)
    kv_len = ctx + q_len
    starts = torch.tensor([s.start for s in segments])[:, None]
    lengths = torch.tensor([s.length for s in segments])[:, None]
    steps = torch.arange(q_len)[None, :]
    real_q = steps < lengths  # [rows, q_len]
    q_index = torch.where(real_q, starts + steps, starts)
    if ctx:
        ctx_starts = torch.tensor([s.context_start for s in segments])[:, None]
        ctx_lengths = torch.tensor([s.context_length for s in segments])[:, None]
        slots = torch.arange(ctx)[None, :]
        real_ctx = slots < ctx_lengths
        kv_index = torch.cat([torch.where(real_ctx, ctx_starts + slots, starts), q_index], dim=1)
        causal = steps[:, :, None] >= steps[:, None, :]  # [1, q_len, q_len]: own key j visible from query i >= j
        own = causal & real_q[:, None, :]
        mask = torch.cat([real_ctx[:, None, :].expand(-1, q_len, -1), own], dim=2)[:, None]
        mask = mask.to(device)
    else:
        # Right padding after each segment's real tokens: causal attention keeps the pads out of real queries.
        kv_index, mask = q_index, None
    flat_real = real_q.reshape(-1)
    return _Bucket(
        rows=rows,
        q_len=q_len,
        kv_len=kv_len,
        q_index=q_index.reshape(-1).to(device),
        kv_index=kv_index.reshape(-1).to(device),
        mask=mask,
        out_src=flat_real.nonzero().squeeze(1).to(device),
        out_rows=q_index.reshape(-1)[flat_real].to(device),
    )


def has_sliding_window(config) -> bool:
    """Whether a model config has sliding-window layers, which segment attention does not implement.

    >>> from transformers import Qwen2Config
    >>> has_sliding_window(Qwen2Config(num_hidden_layers=2)), has_sliding_window(
    ...     Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    ... )
    (False, True)
    """
    return "sliding_attention" in (getattr(config, "layer_types", None) or ())


def choose_kernel(layout: SegmentLayout, *tensors: torch.Tensor, dropout: float = 0.0) -> tuple[str, str]:
    """The kernel a layout runs for these queries (keys, values), and why: the layout's choice, else the "auto"
    rule (flex on CUDA with triton and no dropout; the split for CPU inference where each context's readers form one
    run; else the buckets).

    >>> layout = SegmentLayout([Segment(0, 3), Segment(3, 2, 0, 3)], torch.device("cpu"), kernel="auto")
    >>> choose_kernel(layout, torch.zeros(1, 2, 5, 4))
    ('split', 'auto: CPU inference')
    """
    if layout.kernel != "auto":
        return layout.kernel, "chosen"
    # FlexAttention has no attention dropout; a model that trains with it takes the buckets.
    device = tensors[0].device
    if dropout:
        return "buckets", "auto: attention dropout"
    if flex_available(device):
        return "flex", "auto: CUDA with triton"
    if _can_split(*tensors) and layout.split is not None:
        return "split", "auto: CPU inference"
    grad = any(t.requires_grad for t in tensors)
    return "buckets", f"auto: {device.type} {'training' if grad else 'inference'}"


@functools.cache
def _log_choice(kernel: str, reason: str, device: str) -> None:
    logger.info("Segment attention runs the %s kernel on %s (%s).", kernel, device, reason)


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_layout: SegmentLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query/key/value of one row ``[1, heads, T, head_dim]`` and the row's
    layout (a keyword the model passes through from its forward); returns ``[1, T, heads, head_dim]`` as every
    transformers attention function does."""
    layout = segment_layout
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"{ATTENTION_NAME} attention needs `segment_layout=SegmentLayout(...)`, got {layout!r}.")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{ATTENTION_NAME} attention does not implement sliding windows; score such models plainly.")
    heads, head_dim = query.shape[1], query.shape[-1]
    kv_heads = key.shape[1]
    kernel, reason = choose_kernel(layout, query, key, value, dropout=dropout)
    _log_choice(kernel, reason, query.device.type)
    layout.kernel_calls[kernel] += 1
    if kernel in ("flex", "flex_eager"):
        if dropout:
            raise ValueError(f"The flex kernel of {ATTENTION_NAME} attention has no dropout; use kernel='buckets'.")
        out = flex_attention_row(layout, *_autocast(query, key, value), scaling, compiled=kernel == "flex")
        return out, None
    q, k, v = (t[0].transpose(0, 1) for t in _autocast(query, key, value))  # [T, heads, head_dim]
    if kernel == "split":
        if layout.split is None or not _can_split(query, key, value):  # a kernel chosen by name
            raise ValueError(
                "The split kernel needs CPU inference and one contiguous run of tokens per context; use 'buckets'."
            )
        return _split_attention(layout, q, k, v, scaling)[None], None
    out = torch.empty_like(q)
    for b in layout.buckets:
        qb = q.index_select(0, b.q_index).view(b.rows, b.q_len, heads, head_dim).transpose(1, 2)
        kb = k.index_select(0, b.kv_index).view(b.rows, b.kv_len, kv_heads, head_dim).transpose(1, 2)
        vb = v.index_select(0, b.kv_index).view(b.rows, b.kv_len, kv_heads, head_dim).transpose(1, 2)
        ob = F.scaled_dot_product_attention(
            qb,
            kb,
            vb,
            attn_mask=b.mask,
            dropout_p=dropout,
            is_causal=b.mask is None,
            scale=scaling,
            enable_gqa=heads != kv_heads,
        )
        ob = ob.transpose(1, 2).reshape(b.rows * b.q_len, heads, head_dim)
        out.index_copy_(0, b.out_rows, ob.index_select(0, b.out_src))
    return out[None], None


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Under autocast, rotary embeddings leave queries and keys in float32 beside bfloat16 values; sdpa's autocast
    # rule casts all three to the autocast dtype, and the gathers, copies and the CPU kernel here need them equal.
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _can_split(*tensors: torch.Tensor) -> bool:
    # The CPU flash kernel returns the log-sum-exp the merge needs; it has no gradient for it, so training (and
    # devices whose kernels were not checked here) take the bucketed path.
    return all(t.device.type == "cpu" and not t.requires_grad for t in tensors)


def _split_attention(
    layout: SegmentLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention of ``[T, heads, head_dim]`` queries as (self part) + (context part), merged exactly by their
    log-sum-exps. The context part reads the prefix's keys in place, with no per-candidate copy, padding or mask."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    buckets, spans = layout.split
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for b in buckets:
        qb = q.index_select(0, b.q_index).view(b.rows, b.q_len, heads, head_dim).transpose(1, 2)
        kb = k.index_select(0, b.kv_index).view(b.rows, b.kv_len, kv_heads, head_dim).transpose(1, 2)
        vb = v.index_select(0, b.kv_index).view(b.rows, b.kv_len, kv_heads, head_dim).transpose(1, 2)
        if rep > 1:
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        ob, lb = flash(qb, kb, vb, is_causal=True, scale=scaling)
        out.index_copy_(0, b.out_rows, ob.transpose(1, 2).reshape(-1, heads, head_dim).index_select(0, b.out_src))
        lse.index_copy_(0, b.out_rows, lb.transpose(1, 2).reshape(-1, heads).float().index_select(0, b.out_src))
    for context_start, context_end, start, end in spans:
        n = end - start
        # Grouped-query heads fold into extra query rows of their shared key/value head (no repeat of the keys).
        qf = q[start:end].reshape(n, kv_heads, rep, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, rep * n, -1)
        kc = k[context_start:context_end].transpose(0, 1)[None]
        vc = v[context_start:context_end].transpose(0, 1)[None]
        oc, lc = flash(qf, kc, vc, scale=scaling)
        oc = oc[0].reshape(kv_heads, rep, n, head_dim).permute(2, 0, 1, 3).reshape(n, heads, head_dim)
        lc = lc[0].reshape(kv_heads, rep, n).permute(2, 0, 1).reshape(n, heads).float()
        # softmax over both parts = own + (context - own) * share of the context's mass, share = sigmoid(lse gap).
        share = torch.sigmoid(lc - lse[start:end])[..., None]
        if out.dtype == torch.float32:
            out[start:end].lerp_(oc, share)
        else:
            out[start:end] = out[start:end].float().lerp_(oc.float(), share).to(out.dtype)
    return out


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, segment_attention_forward)


@contextlib.contextmanager
def use_segment_attention(config) -> Iterator[None]:
    """Route the model's attention through `segment_attention_forward` while the block runs.

    The switch is on the config the attention layers read, so the caller must keep other forwards of the same
    model out of the block (PolarScorer holds its lock).
    """
    _register()
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


def segment_forward(backbone: torch.nn.Module, input_ids: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """The backbone's last hidden states ``[T, hidden]`` for one flat row laid out by ``layout``."""
    with use_segment_attention(backbone.config):
        out = backbone(
            input_ids=input_ids[None], position_ids=layout.position_ids, use_cache=False, segment_layout=layout
        )
    return out.last_hidden_state[0]
