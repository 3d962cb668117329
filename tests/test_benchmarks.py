"""The scoring benchmark at a tiny size: its methods agree on the scores and it reports the keys the docs quote."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_score_tiny_run_reports_equal_scores(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("bench_score", None)
    import bench_score

    args = "--hidden 32 --layers 1 --heads 2 --kv-heads 1 --intermediate 64 --prompts 3 --G 4 --prompt-tokens 20 "
    args += "--reference-tokens 30 --min-completion 4 --max-completion 30 --repeats 1 --memory-completions 16"
    result = bench_score.main(args.split())
    assert result["max_abs_diff_vs_naive"] < 1e-5
    assert result["completions"] == 12 and result["unique_tokens"] < result["tokens"]
    for key in ("speedup_vs_naive", "fraction_of_limit", "peak_memory_vs_naive", "forward_fraction_of_limit"):
        assert result[key] > 0, key
    # On CPU there is no bf16 peak to divide by: MFU is null, the model work and the shapes are still reported.
    assert result["gpu"].startswith("CPU") and result["mfu"]["polar"] is None and result["peak_tflops"] is None
    assert result["mfu_measured_peak"]["polar"] is None and result["measured_peak_tflops"] is None
    assert result["unique_tflop"] > 0 and result["first_call_seconds"] > 0
    assert result["shapes"]["hidden"] == 32 and result["shapes"]["G"] == 4


def test_model_flops_and_peaks(monkeypatch):
    """The MFU numerator counted by hand for a 1.8B-shaped config, and the peak table by GPU name."""
    from transformers import Qwen2Config

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_mfu

    config = Qwen2Config(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, intermediate_size=8192
    )
    # Per token and layer: q, o 2048x2048 each, k, v 2048x1024 each, MLP 3 x 2048x8192; 2 FLOPs a multiply-add.
    per_token = 2 * 24 * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 8192) + 2 * 2048
    pairs = bench_mfu.attention_pairs([(0, 256, 0, 0), (256, 64, 0, 256)])
    assert pairs == 256 * 257 // 2 + 64 * 256 + 64 * 65 // 2
    flops = bench_mfu.model_flops(config, 320, pairs)
    assert flops == per_token * 320 + 4 * 24 * 2048 * pairs
    assert bench_mfu.model_flops(config, 320, pairs, training=True) == 3 * flops
    assert per_token / 2 / 24 / 1e6 == pytest.approx(62.9, abs=0.1)  # 62.9M weights a layer: about 1.5B + embeddings
    # By the exact name: the NVL parts have their own (lower) peaks, and a name not in the table gets none.
    assert bench_mfu.peak_bf16_flops("NVIDIA H200") == 989e12
    assert bench_mfu.peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert bench_mfu.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_mfu.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_mfu.peak_bf16_flops("NVIDIA L40S") == 362e12
    assert bench_mfu.peak_bf16_flops("Tesla T4") is None and bench_mfu.peak_bf16_flops("NVIDIA H100") is None
    assert bench_mfu.device_peaks("cpu") == {"datasheet": None, "measured_matmul": None}
    assert bench_mfu.mfu(989e12, 2.0, 989e12) == 0.5 and bench_mfu.mfu(1.0, 1.0, None) is None
