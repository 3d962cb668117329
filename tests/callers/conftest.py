"""Contract tests: the RL frameworks' own code, at pinned versions (``requirements/``), calling trl_polar.

Each caller runs in a subprocess whose ``sys.path`` holds the Ray stand-in, the caller's pinned install and the
shared light packages (`install.caller_path`); the installs are made on first use and reused (``make callers``
makes them ahead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import install  # noqa: E402

collect_ignore = ["standins", "install.py", "scenarios"]
DOC = HERE.parents[1] / "docs" / "rl.md"


class Caller:
    """One pinned caller: runs Python code (a script under ``scenarios/`` or a ``-m`` module) under its install."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = install.caller_path(name)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRL_POLAR_")}
        env.update(PYTHONPATH=os.pathsep.join(self.path), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.update(extra or {})
        return env

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
        return subprocess.run(
            [sys.executable, *args], env=self.env(env), capture_output=True, text=True, timeout=timeout
        )

    def scenario(self, script: str, payload: dict, env: dict[str, str] | None = None) -> dict:
        """Run ``scenarios/<script>`` with ``payload`` as JSON on stdin; its last stdout line is its JSON result."""
        done = subprocess.run(
            [sys.executable, str(HERE / "scenarios" / script)],
            input=json.dumps(payload),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{script} under {self.name} failed:\n{done.stderr[-4000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def caller():
    made: dict[str, Caller] = {}

    def get(name: str) -> Caller:
        if name not in made:
            made[name] = Caller(name)
        return made[name]

    return get
