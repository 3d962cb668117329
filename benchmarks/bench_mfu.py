"""Model FLOPs utilisation for the scoring and training benchmarks: the model FLOPs the unique tokens need, per
second, over the device's dense bf16 peak: the data-sheet peak of the exact device, and the bf16 matmul rate measured
on the device itself (what the tensor cores deliver here, at this clock and power limit).

The FLOPs count what an exact forward must do and nothing else: every projection and MLP once per unique token (a
shared prefix counts once, padding not at all) and, per layer, the attention of each token to the keys it sees (its
context and itself, the causal triangle counted exactly). Training counts 3x the forward (backward = 2x). A method
that pads, or repeats a prefix, does more work than this for the same result, so its MFU is lower: the figure
compares methods on the same useful work.

    >>> peak_bf16_flops("NVIDIA H100 80GB HBM3") / 1e12, peak_bf16_flops("NVIDIA H200 NVL") / 1e12
    (989.0, 835.0)
    >>> peak_bf16_flops("NVIDIA H100") is None, peak_bf16_flops("cpu") is None
    (True, True)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, by the exact name
# torch.cuda.get_device_name() reports. A name not here (another variant, a renamed part) gets no data-sheet MFU
# rather than a neighbour's peak: an H200 NVL (835, 600 W) is not an H200 SXM (989, 700 W).
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L4": 121.0,
    "NVIDIA B200": 2250.0,
}


def peak_bf16_flops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU by its exact name, in FLOP/s; None for a name not in the table."""
    tflops = PEAK_BF16_TFLOPS.get(device_name.strip())
    return None if tflops is None else tflops * 1e12


def measured_bf16_flops(device, size: int = 8192, repeats: int = 20) -> float | None:
    """The best bf16 matmul rate of ``size`` x ``size`` squares on a CUDA ``device``, in FLOP/s (about 2 s on an
    H100); None elsewhere."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # clocks up, cuBLAS picks its kernel
        a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size**3 / best


def mfu_both(flops: float, seconds: float, peaks: dict) -> dict:
    """MFU against the data-sheet peak and the measured matmul peak.

    >>> mfu_both(5e14, 1.0, {"datasheet": 1e15, "measured_matmul": None})
    {'datasheet': 0.5, 'measured_matmul': None}
    """
    return {name: mfu(flops, seconds, peak) for name, peak in peaks.items()}


def device_peaks(device) -> dict:
    """Both peaks of ``device`` in FLOP/s (None where unknown or not a GPU)."""
    return {"datasheet": peak_bf16_flops(device_name(device)), "measured_matmul": measured_bf16_flops(device)}


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
