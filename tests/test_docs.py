"""The documentation site builds without warnings, and the CLI reference matches the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    out = subprocess.run(
        [sys.executable, "-m", "typer", "trl_polar.cli", "utils", "docs", "--name", "trl-polar"],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT,
    )  # fmt: skip
    assert out.stdout.strip() == (ROOT / "docs" / "cli.md").read_text().strip(), (
        "docs/cli.md is out of date: run `make docs` (it regenerates it)."
    )


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("PolarTemplate", "PolarRewardTrainer", "PolarScorer", "PolarReward", "PolarClient"):
        assert name in api
