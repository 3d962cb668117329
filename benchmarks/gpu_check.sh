#!/usr/bin/env bash
# One short run on one GPU (under 8 minutes): the CUDA equality tests, then the scoring and training benchmarks at
# POLAR-1.8B's shape (InternLM2: hidden 2048, 24 layers, 16 heads, 8 KV heads, MLP 8192, vocab 92544, as a Qwen2
# config) on POLAR-shaped data, in bf16. The logs go to $GPU_CHECK_DIR (default: a new temporary directory); the
# last line printed is one JSON object (format: docs/benchmarks.md, "GPU check").
#
#     bash benchmarks/gpu_check.sh                 # PYTHON=/path/to/python to pick the interpreter
#
# GPU_CHECK_SCORE_ARGS / GPU_CHECK_TRAIN_ARGS replace the benchmarks' flags (a CPU dry run at a tiny size uses them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SHAPE="--hidden 2048 --layers 24 --heads 16 --kv-heads 8 --intermediate 8192 --vocab 92544"
SCORE_ARGS=${GPU_CHECK_SCORE_ARGS:-"$SHAPE --device cuda --dtype bf16 --prompts 8 --repeats 2 --skip-memory"}
TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-"$SHAPE --dtype bf16 --rows 32 --batch 8 --steps 2"}
start=$(date +%s)

timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" --junitxml="$LOGS/tests.xml" \
    tests/test_device_paths.py tests/test_segment_attention.py >"$LOGS/tests.log" 2>&1
tests_rc=$?
# shellcheck disable=SC2086  # the flags are meant to split into words
timeout 140 "$PY" benchmarks/bench_score.py $SCORE_ARGS >"$LOGS/score.log" 2>&1
score_rc=$?
# shellcheck disable=SC2086
timeout 160 "$PY" benchmarks/bench_train.py $TRAIN_ARGS >"$LOGS/train.log" 2>&1
train_rc=$?

"$PY" - "$LOGS" "$tests_rc" "$score_rc" "$train_rc" "$(($(date +%s) - start))" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

logs, tests_rc, score_rc, train_rc, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])


def last_json(name):
    for line in reversed((logs / name).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


tests = {"rc": tests_rc, "passed": 0, "failed": 0, "skipped": 0}
try:
    suite = ET.parse(logs / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    tests.update(passed=int(suite.get("tests", 0)) - failed - skipped, failed=failed, skipped=skipped)
except (OSError, ET.ParseError, IndexError):
    pass
score, train = last_json("score.log"), last_json("train.log")


def at_least(result, path, target):
    value = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else value >= target


targets = {
    "tests_pass": tests_rc == 0 and tests["failed"] == 0 and tests["passed"] > 0,
    "score_3x_naive": at_least(score, ["speedup_vs_naive"], 3.0),
    "score_mfu_50": at_least(score, ["mfu", "polar"], 0.5),
    "train_2x_trl": at_least(train, ["speedup_vs_trl"], 2.0),
    "train_mfu_35": at_least(train, ["mfu", "shared_prefix"], 0.35),
}
gpu = (score or {}).get("gpu") or (train or {}).get("gpu")
summary = {
    "gpu_check": 1,
    "gpu": gpu,
    "seconds": seconds,
    "logs": str(logs),
    "tests": tests,
    "score": score if score is not None else {"rc": score_rc},
    "train": train if train is not None else {"rc": train_rc},
    "targets": targets,
}
print(json.dumps(summary))
PY
