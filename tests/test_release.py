"""Release readiness: the sdist and wheel build, pass `twine check`, and the wheel carries the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_build_and_twine_check(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("twine")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    wheel = next(tmp_path.glob("trl_polar-*.whl"))
    sdist = next(tmp_path.glob("trl_polar-*.tar.gz"))
    out = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "trl_polar/py.typed",
        "trl_polar/template.py",
        "trl_polar/data/synthesis/store.py",
        "trl_polar/serving/app.py",
        "trl_polar/cli/__main__.py",
    } <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: trl~=1.16.0" in text and "Provides-Extra: serve" in text
    assert (
        "trl-polar = trl_polar.cli:main"
        in zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
