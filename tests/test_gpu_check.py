"""The GPU check's logic on CPU: an install from a wheelhouse into a fresh venv with no index (on top of the torch
this machine has), the parts at toy size, and the one JSON line, also when a part times out.

What needs a GPU (the CUDA tests, the real sizes and their figures) runs only on one; see docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _check(tmp_path, *args, **env):
    """Run gpu_check.sh; its last stdout line parsed, and the whole output for messages."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("GPU_CHECK_")}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--python", sys.executable, "--logs", str(tmp_path), *args],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dry_run_installs_from_a_wheelhouse_without_an_index_and_reports_every_part(tmp_path):
    """The local checkout's wheel is the wheelhouse; the venv sees this interpreter's torch (never reinstalled) and
    imports trl_polar from the installed wheel; tests, scoring and training run at toy size; one JSON line ends it."""
    import torch

    summary = _check(tmp_path, "--dry-run")
    assert summary["dry_run"] is True and summary["gpu"].startswith("CPU")
    assert {name: part["status"] for name, part in summary["parts"].items()} == dict.fromkeys(
        ("wheel", "install", "tests", "score", "train"), "ok"
    )
    assert all(0 < part["seconds"] <= part["limit_s"] for part in summary["parts"].values())
    assert f"from {tmp_path}/venv/" in summary["installed"] and f"torch {torch.__version__};" in summary["installed"]
    install_log = (tmp_path / "install.log").read_text()
    assert "Looking in indexes" not in install_log  # --no-index: nothing was looked up
    assert (tmp_path / "constraints.txt").read_text().startswith(f"torch=={torch.__version__}")
    # The CUDA tests collect without a GPU and skip; the CPU test ran.
    assert summary["tests"]["passed"] >= 1 and summary["tests"]["failed"] == 0 and summary["tests"]["skipped"] >= 10
    assert summary["score"]["max_abs_diff_vs_naive"] < 1e-5 and summary["score"]["mfu"]["polar"] is None
    train = summary["train"]
    assert train["seconds_per_step"]["shared_prefix"] > 0 and train["graphs_compiled_while_timing"] == {
        "shared_prefix": 0
    }
    assert train["timed_tokens"]["unique"] < train["timed_tokens"]["real"]
    assert summary["targets"]["tests_pass"] is True and summary["targets"]["train_mfu_35"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_part_that_times_out_still_ends_with_the_json_line(tmp_path):
    """A part killed at its limit: the line still comes, with that part's status and time, and the rest as run."""
    summary = _check(
        tmp_path,
        "--parts",
        "train",
        GPU_CHECK_TIMEOUT_TRAIN="2",
        GPU_CHECK_TRAIN_ARGS="--hidden 32 --layers 1 --heads 2 --kv-heads 1 --rows 2 --batch 1 --steps 1",
    )
    assert summary["parts"]["train"]["status"] == "timeout" and summary["parts"]["train"]["limit_s"] == 2
    assert 2 <= summary["parts"]["train"]["seconds"] < 15
    assert set(summary["parts"]) == {"train"} and summary["targets"]["train_2x_trl"] is None


def test_a_benchmark_cut_short_reports_what_finished(tmp_path):
    """The summary of a run whose training was killed after its first method: that method's partial figures."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check_summary
    finally:
        sys.path.remove(str(BENCHMARKS))
    partial = {"partial": True, "speedup_vs_trl": None, "mfu": {"shared_prefix": 0.41}, "gpu": "NVIDIA H200"}
    (tmp_path / "train.log").write_text("loading\n" + json.dumps(partial) + "\nTraceback (most recent call last):\n")
    summary = gpu_check_summary.summarize(tmp_path, 200.0, False, ["tests 1 165 3.5", "train 124 150 150.2"])
    assert summary["parts"]["train"] == {"status": "timeout", "seconds": 150.2, "limit_s": 150}
    assert summary["train"]["partial"] is True and summary["train"]["mfu"] == {"shared_prefix": 0.41}
    assert summary["targets"]["train_mfu_35"] is True and summary["targets"]["train_2x_trl"] is None
    assert summary["tests"]["status"] == "failed" and summary["targets"]["tests_pass"] is False
    assert summary["gpu"] == "NVIDIA H200"


def test_the_cuda_tests_and_the_benchmarks_import_without_trl_and_datasets(tmp_path):
    """A GPU image may lack trl and datasets: the device tests still collect (their training tests skip) and the
    benchmarks import. Both packages are shadowed here by modules that are not found."""
    for name in ("trl", "datasets"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('No module named {name}', name='{name}')"
        )
    repo = BENCHMARKS.parent
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"}
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*collect, str(repo / "tests" / "test_device_paths.py")], env=env, capture_output=True, text=True, timeout=300
    )
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and re.fullmatch(r"\d+ tests collected in .*", last), done.stdout  # no errors
    assert "test_cuda_flex_scores_and_gradients_equal_full_sequences" in done.stdout
    script = "import bench_train, bench_score, trl_polar.scorer\nimport sys\nassert 'trl' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
