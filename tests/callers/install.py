"""Install the RL frameworks that call trl_polar, at the pinned versions of ``requirements/*.txt``, each into its own
folder under ``.callers/`` (gitignored), without their heavy dependencies (``pip install --no-deps --target``).

``python tests/callers/install.py`` installs every requirements file; ``python tests/callers/install.py verl-0.9.1``
one. A folder whose ``.installed`` stamp matches its requirements file is reused, so repeated runs cost nothing;
pip's own cache keeps the downloads. `caller_path` is the ``sys.path`` a caller's code runs with: the Ray stand-in,
the caller, the shared light packages (``common.txt``), then the project.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements"
STANDINS = HERE / "standins"
CACHE = Path(os.environ.get("TRL_POLAR_CALLERS_DIR", ROOT / ".callers"))
COMMON = "common"
# Stand-ins a caller family needs beyond Ray: OpenRLHF imports vLLM and flash-attn (GPU packages) on its rollout path.
EXTRA_STANDINS = {"openrlhf": ["gpu"]}


def names() -> list[str]:
    """Every pinned caller, e.g. ``verl-0.9.1`` (the shared light packages excluded)."""
    return sorted(p.stem for p in REQUIREMENTS.glob("*.txt") if p.stem != COMMON)


def _pins(name: str) -> list[str]:
    lines = (REQUIREMENTS / f"{name}.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def install(name: str) -> Path:
    """The folder holding ``name``'s pinned packages, installed now unless already there."""
    pins = _pins(name)
    target = CACHE / name
    stamp = hashlib.sha256("\n".join(pins).encode()).hexdigest()
    if (target / ".installed").is_file() and (target / ".installed").read_text() == stamp:
        return target
    partial = CACHE / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial), *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing {name} ({' '.join(pins)}) failed:\n{done.stderr[-2000:]}")
    (partial / ".installed").write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # whole or absent: an interrupted install is never taken for a finished one
    return target


def caller_path(name: str) -> list[str]:
    """The ``sys.path`` entries (first first) under which ``name``'s own code runs, installing what is missing."""
    extra = [str(STANDINS / folder) for folder in EXTRA_STANDINS.get(name.rsplit("-", 1)[0], [])]
    return [str(STANDINS), *extra, str(install(name)), str(install(COMMON)), str(ROOT)]


def main(argv: list[str]) -> int:
    for name in [COMMON, *(argv or names())]:
        print(f"{name}: {install(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
