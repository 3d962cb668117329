"""The scoring benchmark at a tiny size: its methods agree on the scores and it reports the keys the docs quote."""

from __future__ import annotations

import sys
from pathlib import Path

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
