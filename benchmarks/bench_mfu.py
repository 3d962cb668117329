"""Model FLOPs utilisation for the scoring and training benchmarks: the model FLOPs the unique tokens need, per
second, over the device's dense bf16 peak.

The FLOPs count what an exact forward must do and nothing else: every projection and MLP once per unique token (a
shared prefix counts once, padding not at all) and, per layer, the attention of each token to the keys it sees (its
context and itself, the causal triangle counted exactly). Training counts 3x the forward (backward = 2x). A method
that pads, or repeats a prefix, does more work than this for the same result, so its MFU is lower: the figure
compares methods on the same useful work.

    >>> peak_bf16_flops("NVIDIA H100 80GB HBM3") / 1e12, peak_bf16_flops("NVIDIA A100-SXM4-80GB") / 1e12
    (989.0, 312.0)
    >>> peak_bf16_flops("cpu") is None
    True
"""

from __future__ import annotations

from collections.abc import Iterable

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in order against
# torch.cuda.get_device_name(): more specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, in FLOP/s; None for a device not in the table (MFU is then null)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def attention_pairs(segments: Iterable[tuple[int, int, int, int]]) -> int:
    """Query-key pairs a row's segments ``(start, length, context_start, context_length)`` need: each token sees its
    context and causally itself.

    >>> attention_pairs([(0, 3, 0, 0), (3, 2, 0, 3)])  # a 3-token prefix (6 pairs), a 2-token branch (2*3 + 3)
    15
    """
    return sum(length * context + length * (length + 1) // 2 for _, length, _, context in segments)


def model_flops(config, tokens: int, pairs: int, training: bool = False) -> float:
    """Model FLOPs of ``tokens`` unique tokens with ``pairs`` query-key pairs through a Llama/Qwen2-shaped config."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o; k, v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    per_token = 2 * layers * (projections + mlp) + 2 * hidden  # + the value head
    attention = 4 * layers * heads * head_dim * pairs  # q.k and p.v, 2 FLOPs per multiply-add
    return (3.0 if training else 1.0) * (per_token * tokens + attention)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """FLOPs per second over the peak, rounded; None where the peak is unknown (CPU, a GPU not in the table)."""
    if peak is None or seconds <= 0:
        return None
    return round(flops / seconds / peak, 4)


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x{torch.get_num_threads()} threads"
