# One-command set-up on a fresh machine: `make test` and `make quickstart` create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that these machines carry locally; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# `make wheelhouse PY=3.12`: on a connected machine, the wheels an air-gapped GPU machine running that Python needs
# for `benchmarks/gpu_check.sh --wheelhouse wheelhouse` (trl_polar's own, its dependencies and pytest; never torch,
# triton or the CUDA libraries, which the GPU image keeps). PLATFORM is the target's wheel platform.
PY ?= 3.12
PLATFORM ?= manylinux_2_28_x86_64
WHEELHOUSE ?= wheelhouse

.PHONY: install callers test lint quickstart docs dist clean wheelhouse

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The RL frameworks that call trl_polar, at their pinned versions, into .callers/ (reused while the pins hold).
callers: install
	$(BIN)/python tests/callers/install.py

test: lint callers
	$(BIN)/pytest -m "not slow"

quickstart: install
	$(BIN)/trl-polar quickstart --out-dir runs/quickstart

docs: install
	$(BIN)/python -m typer trl_polar.cli utils docs --name trl-polar --output docs/cli.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

dist: install
	rm -rf dist && $(BIN)/python -m build && $(BIN)/twine check --strict dist/*

wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) .
	$(BIN)/python benchmarks/wheelhouse.py --dest $(WHEELHOUSE) --python-version $(PY) --platform $(PLATFORM) \
		$(WHEELHOUSE)/trl_polar-*.whl

clean:
	rm -rf $(VENV) .callers build dist *.egg-info .pytest_cache .ruff_cache site wheelhouse
