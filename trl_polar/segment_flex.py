"""Segment attention's FlexAttention kernel: one compiled call per row and layer, forward and backward.

The row's visibility becomes a `BlockMask` built from per-token key intervals (never from a ``[T, T]`` grid), its
length rounded up to whole tiles of `FLEX_BLOCK` and to at least `MIN_FLEX_BLOCKS` of them. The kernel is compiled
with dynamic shapes from the first call and without duck sizing, so one graph serves every row length: a compile per
dtype, grad mode and head shape, never one per length. Inputs reach it contiguous whatever the length, since a stride
change is a recompile too.

Dynamo has a recompile limit per function; past it, it would run flex eagerly, which builds the full ``T x T`` score
matrix (out of memory or very slow) without a word. The compiled call runs with that fallback turned into an error.
torch compiles the backward at the first ``.backward()``, outside any handler of the forward: the first call of each
signature with gradients therefore runs a small forward and backward first, so a backward that cannot compile fails
in the forward with the same `KernelError`.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# FlexAttention tile (queries x keys) and the multiple the row's attention length is rounded up to.
FLEX_BLOCK = 128
# A one-tile row would specialise the compiled kernel on its size (0/1 specialisation) and compile a second graph.
MIN_FLEX_BLOCKS = 2
# Compiled variants of the flex call a process may need: one per device, dtype, grad mode and head shape (never one per
# row length). Dynamo's default limit (8) is shared by every variant; past this one the call fails (see below).
FLEX_RECOMPILE_LIMIT = 32
# The uncompiled kernel builds the full score matrix: a reference for tests on tiny rows, refused above this length.
EAGER_FLEX_MAX_LENGTH = 2048


class KernelError(RuntimeError):
    """A segment-attention kernel failed; the message names the kernel, what failed and how to choose another."""


def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention can run compiled on ``device`` (CUDA with triton): what "auto" picks there.

    >>> flex_available(torch.device("cpu"))
    False
    """
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def padded_length(length: int) -> int:
    """The attention length flex runs for a row of ``length`` tokens.

    >>> padded_length(1), padded_length(256), padded_length(257)
    (256, 256, 384)
    """
    return max(MIN_FLEX_BLOCKS, -(-length // FLEX_BLOCK)) * FLEX_BLOCK


def flex_bounds(segments, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per token of the rounded-up row: its context ``[lo, hi)`` and where its own segment starts (it sees keys from
    there up to itself). Tokens no segment covers, and the tail, see only themselves."""
    padded = padded_length(length)
    own = torch.arange(padded)
    ctx_lo = torch.zeros(padded, dtype=torch.long)
    ctx_hi = torch.zeros(padded, dtype=torch.long)
    for s in segments:
        own[s.start : s.start + s.length] = s.start
        ctx_lo[s.start : s.start + s.length] = s.context_start
        ctx_hi[s.start : s.start + s.length] = s.context_start + s.context_length
    return tuple(t.to(device=device, dtype=torch.int32) for t in (ctx_lo, ctx_hi, own))


def flex_block_mask(segments, length: int, device: torch.device):
    """The FlexAttention block mask of a row of ``segments``."""
    from torch.nn.attention.flex_attention import BlockMask

    ctx_lo, ctx_hi, own = flex_bounds(segments, length, device)
    padded = own.shape[0]
    blocks = padded // FLEX_BLOCK

    def mask_mod(b, h, q, kv):
        return ((kv >= ctx_lo[q]) & (kv < ctx_hi[q])) | ((kv >= own[q]) & (kv <= q))

    # Tile (qb, kb) is needed when some query of qb sees some key of kb, and whole when every query of qb sees every
    # key of kb (then the kernel skips mask_mod).
    query = torch.arange(padded, device=device)[:, None]
    k0 = torch.arange(blocks, device=device)[None, :] * FLEX_BLOCK
    k1 = k0 + FLEX_BLOCK
    lo, hi, start = ctx_lo.long()[:, None], ctx_hi.long()[:, None], own.long()[:, None]
    end = query + 1
    touches = ((lo < k1) & (hi > k0) & (hi > lo)) | ((start < k1) & (end > k0))
    # A context that ends where the segment starts makes one interval [lo, q + 1).
    joined_lo = torch.where((hi == start) & (hi > lo), lo, start)
    covered = ((k0 >= lo) & (k1 <= hi)) | ((k0 >= joined_lo) & (k1 <= end))
    touches = touches.view(blocks, FLEX_BLOCK, blocks).any(dim=1)
    covered = covered.view(blocks, FLEX_BLOCK, blocks).all(dim=1)
    partial = touches & ~covered

    def indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = tiles.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None].contiguous()

    kv_num, kv_index = indices(partial)
    full_num, full_index = indices(covered)
    return BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(padded, padded)
    )


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _compile_settings() -> contextlib.AbstractContextManager:
    """`FLEX_RECOMPILE_LIMIT` as an error, no duck sizing (a row of as many tiles as there are heads must not tie the
    two sizes into one symbol and specialise the graph). Settings an older torch lacks are left as they are."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    for name in ("recompile_limit", "cache_size_limit"):  # the name since torch 2.7, and before
        if hasattr(dynamo_config, name):
            stack.enter_context(dynamo_config.patch(**{name: FLEX_RECOMPILE_LIMIT}))
            break
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        stack.enter_context(dynamo_config.patch(fail_on_recompile_limit_hit=True))
    if hasattr(fx_config, "use_duck_shape"):
        stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


# Signatures whose compiled backward has run once (see the module docstring); a failure is never recorded: it raises.
_BACKWARD_COMPILED: set[tuple] = set()


def _call(q, k, v, block_mask, scaling, compiled: bool) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    # The inputs already have the autocast dtype; tracing outside autocast keeps torch's compiled flex backward off
    # its mixed-precision lowering.
    with torch.autocast(q.device.type, enabled=False):
        if not compiled:
            return flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
        with _compile_settings():
            return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)


def _compile_backward(q, k, v, scaling) -> None:
    """A two-tile forward and backward of this signature (dtype, heads, head_dim, which inputs need gradients): the
    same dynamic graph the row runs, so its backward is compiled here, inside the forward's error handling."""
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[-1], scaling, *(t.requires_grad for t in (q, k, v)))
    if key in _BACKWARD_COMPILED:
        return
    length = MIN_FLEX_BLOCKS * FLEX_BLOCK
    probe = [
        torch.randn(1, t.shape[1], length, t.shape[-1], device=t.device, dtype=t.dtype).requires_grad_(t.requires_grad)
        for t in (q, k, v)
    ]
    # One segment over the whole probe, without context (flex_bounds reads only these four fields).
    whole = SimpleNamespace(start=0, length=length, context_start=0, context_length=0)
    mask = flex_block_mask([whole], length, q.device)
    # Identity saved-tensor hooks keep the probe's graph out of an enclosing activation checkpoint's hooks.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = _call(*probe, mask, scaling, compiled=True)
        torch.autograd.grad(out.sum(), [t for t in probe if t.requires_grad])
    _BACKWARD_COMPILED.add(key)


def flex_attention_row(layout, query, key, value, scaling, compiled: bool = True) -> torch.Tensor:
    """``[1, heads, T, head_dim]`` in, ``[1, T, heads, head_dim]`` out: one kernel call for the whole row."""
    name = "flex" if compiled else "flex_eager"
    block_mask = layout.flex
    length = query.shape[2]
    padded = block_mask.seq_lengths[0]
    if not compiled and padded > EAGER_FLEX_MAX_LENGTH:
        raise KernelError(
            f"The flex_eager kernel builds the full {padded}x{padded} score matrix; it is a reference for rows of at "
            f"most {EAGER_FLEX_MAX_LENGTH} tokens. Use kernel='flex' (compiled) or 'buckets'."
        )
    # Contiguous whatever the length: transformers hands over transposed views, and F.pad copies only when it pads.
    query, key, value = (F.pad(t, (0, 0, 0, padded - length)).contiguous() for t in (query, key, value))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    part = "backward" if needs_grad else "forward"
    try:
        if compiled and needs_grad:
            _compile_backward(query, key, value, scaling)
        part = "forward"
        out = _call(query, key, value, block_mask, scaling, compiled)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # compilation can fail in many ways (toolchain, head size, torch version)
        if "RecompileLimit" in type(err).__name__:
            err = RuntimeError(f"more than {FLEX_RECOMPILE_LIMIT} compiled variants; Dynamo would run flex eagerly")
        raise KernelError(
            f"The {name} kernel of segment attention failed in the {part} ({query.device.type}, {query.dtype}, "
            f"{query.shape[1]} heads of {query.shape[-1]}): {type(err).__name__}: {err}. Choose another kernel: "
            "TRL_POLAR_ATTENTION_KERNEL=buckets (training and scoring), or PolarScorer(..., kernel='plain')."
        ) from err
    return out[:, :, :length].transpose(1, 2)
