#!/usr/bin/env bash
# One short run on one GPU, at most 8 minutes from a cold compile cache: the CUDA tests (every one asserts the kernel
# that ran), then the scoring and training benchmarks at POLAR-1.8B's shape (InternLM2: hidden 2048, 24 layers, 16
# heads, 8 KV heads, MLP 8192, vocab 92544, as a Qwen2 config) on POLAR-shaped data, in bf16. Each part runs under its
# own time limit; the last line printed is one JSON object, also when a part failed or timed out (each part's status
# and seconds, and what finished). Format: docs/benchmarks.md, "GPU check".
#
#     bash benchmarks/gpu_check.sh --wheelhouse DIR --logs DIR   # an air-gapped GPU machine (docs/installation.md)
#     bash benchmarks/gpu_check.sh                                # trl_polar's dependencies already installed
#     bash benchmarks/gpu_check.sh --dry-run                      # the whole logic on CPU at toy size (the suite)
#
# --wheelhouse DIR: make a fresh venv in the logs directory that sees this Python's packages (the machine's torch,
#   which is never replaced), install trl_polar and what the check needs from DIR with --no-index (make wheelhouse
#   builds DIR on a connected machine), and run every part with it.
# --logs DIR: where the logs, the venv and summary.json go (default $GPU_CHECK_DIR, else a new temporary directory).
# --python PATH: the interpreter (default $PYTHON, else python3, else python).
# --parts LIST: which of tests,score,train to run (default all).
# --dry-run: toy sizes; without --wheelhouse, a wheelhouse of the local checkout's wheel is built first.
# GPU_CHECK_SCORE_ARGS / GPU_CHECK_TRAIN_ARGS / GPU_CHECK_TEST_ARGS (and GPU_CHECK_TEST_K) replace a part's arguments;
# GPU_CHECK_TIMEOUT_<PART> (INSTALL, TESTS, SCORE, TRAIN) its limit in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELHOUSE="" LOGS=${GPU_CHECK_DIR:-} PY=${PYTHON:-} DRY=0 PARTS="tests,score,train"
while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --logs) LOGS=${2:?--logs needs a directory}; shift 2 ;;
        --python) PY=${2:?--python needs a path}; shift 2 ;;
        --parts) PARTS=${2:?--parts needs a list}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1'; see --help." >&2; exit 2 ;;
    esac
done
PY=${PY:-$(command -v python3 || command -v python || true)}
[ -n "$PY" ] || { echo "gpu_check.sh: no python3 or python on PATH; pass --python PATH." >&2; exit 2; }
LOGS=${LOGS:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd)
[ -z "$WHEELHOUSE" ] || WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd) || { echo "gpu_check.sh: no such wheelhouse." >&2; exit 2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

SHAPE="--hidden 2048 --layers 24 --heads 16 --kv-heads 8 --intermediate 8192 --vocab 92544"
TINY="--hidden 32 --layers 1 --heads 2 --kv-heads 1"
if [ "$DRY" = 1 ]; then
    # The CUDA tests collect and skip (proving they import without a GPU), one CPU test runs.
    TEST_ARGS=${GPU_CHECK_TEST_ARGS:-"tests/test_device_paths.py tests/test_segment_attention.py"}
    TEST_K=${GPU_CHECK_TEST_K:-"cuda or kernel_rule"}
    SCORE_ARGS=${GPU_CHECK_SCORE_ARGS:-"$TINY --intermediate 64 --prompts 2 --G 4 --prompt-tokens 20 \
        --reference-tokens 30 --min-completion 4 --max-completion 30 --repeats 1 --skip-memory"}
    TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-"$TINY --rows 2 --batch 1 --steps 1 --warmup 1 --methods shared_prefix"}
    LIMITS="wheel=120 install=120 tests=120 score=120 train=300"
else
    TEST_ARGS=${GPU_CHECK_TEST_ARGS:-"tests/test_device_paths.py tests/test_segment_attention.py"}
    TEST_K=${GPU_CHECK_TEST_K:-}
    SCORE_ARGS=${GPU_CHECK_SCORE_ARGS:-"$SHAPE --device cuda --dtype bf16 --prompts 8 --repeats 2 --skip-memory"}
    TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-"$SHAPE --dtype bf16 --rows 24 --batch 8 --steps 2 --warmup 1"}
    # 470 s in all: the budget of one 8-minute run, the install from local wheels included.
    LIMITS="wheel=60 install=45 tests=165 score=110 train=150"
fi

limit_of() {  # a part's limit: GPU_CHECK_TIMEOUT_<PART>, else the default above
    local var="GPU_CHECK_TIMEOUT_${1^^}" pair
    for pair in $LIMITS; do [ "${pair%%=*}" = "$1" ] && echo "${!var:-${pair#*=}}"; done
}

RESULTS=()
run_part() {  # name command...: run under the part's limit, log to $LOGS/name.log, record "name rc limit seconds"
    local name=$1 limit start rc
    shift
    limit=$(limit_of "$name")
    start=${EPOCHREALTIME:-$(date +%s)}
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    RESULTS+=("$name $rc $limit $(awk "BEGIN {print ${EPOCHREALTIME:-$(date +%s)} - $start}")")
    return $rc
}

install_from_wheelhouse() {  # a venv that sees $PY's packages (torch among them), trl_polar and the rest from wheels
    local venv=$LOGS/venv site wheel
    rm -rf "$venv"
    "$PY" -m venv --system-site-packages --without-pip "$venv" || return 1
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    # $PY may itself be a venv or a conda env: its own site directories are not the "system" ones of the new venv.
    "$PY" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
        >"$site/_gpu_check_base.pth" || return 1
    # Whatever torch and triton the machine carries stay as they are: pinned to themselves.
    "$PY" -c 'import importlib.metadata as m
for name in ("torch", "triton", "pytorch-triton"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass' >"$LOGS/constraints.txt" || return 1
    wheel=$(ls "$WHEELHOUSE"/trl_polar-*.whl 2>/dev/null | sort -V | tail -n 1)
    [ -n "$wheel" ] || { echo "no trl_polar wheel in $WHEELHOUSE; build it with: make wheelhouse" >&2; return 1; }
    local pip=("$PY" -m pip --python "$venv/bin/python" install --no-index --find-links "$WHEELHOUSE" -c "$LOGS/constraints.txt")
    # The wheel itself into the venv even where another trl_polar is visible, then what it and the tests need.
    "${pip[@]}" --no-deps --ignore-installed "$wheel" && "${pip[@]}" "$wheel" pytest || return 1
    "$venv/bin/python" -P -c 'import torch, trl_polar, transformers
print(f"trl_polar {trl_polar.__version__} from {trl_polar.__file__}; torch {torch.__version__}; transformers {transformers.__version__}")'
}

start_all=${EPOCHREALTIME:-$(date +%s)}
RUNPY=$PY
INSTALLED=1
if [ "$DRY" = 1 ] && [ -z "$WHEELHOUSE" ]; then
    WHEELHOUSE=$LOGS/wheelhouse
    rm -rf "$WHEELHOUSE"
    run_part wheel "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -w "$WHEELHOUSE" "$REPO" || INSTALLED=0
fi
if [ -n "$WHEELHOUSE" ]; then
    export -f install_from_wheelhouse
    export PY LOGS WHEELHOUSE
    [ "$INSTALLED" = 1 ] && run_part install bash -c install_from_wheelhouse || INSTALLED=0
    RUNPY=$LOGS/venv/bin/python
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

for part in tests score train; do
    if [[ ",$PARTS," != *",$part,"* ]]; then
        continue
    elif [ "$INSTALLED" = 0 ]; then
        RESULTS+=("$part skipped 0 0")
        continue
    fi
    case $part in
        # -P: the checkout is not on sys.path, so the tests import the installed trl_polar.
        # shellcheck disable=SC2086  # the arguments are meant to split into words
        tests) run_part tests "$RUNPY" -P -m pytest -q -p no:cacheprovider -m "not slow" \
            --junitxml="$LOGS/tests.xml" ${TEST_K:+-k "$TEST_K"} $TEST_ARGS ;;
        # shellcheck disable=SC2086
        score) run_part score "$RUNPY" benchmarks/bench_score.py $SCORE_ARGS ;;
        # shellcheck disable=SC2086
        train) run_part train "$RUNPY" benchmarks/bench_train.py $TRAIN_ARGS ;;
    esac
done
total=$(awk "BEGIN {print ${EPOCHREALTIME:-$(date +%s)} - $start_all}")

"$PY" "$REPO/benchmarks/gpu_check_summary.py" "$LOGS" "$total" "$DRY" "${RESULTS[@]}"
