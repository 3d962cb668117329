"""The commands of docs/rl.md as a shell runs them, and its compatibility table.

A ``bash`` block runs in bash with the programs it starts replaced by functions that record their arguments
(``python3 -m X``, ``swift``, ``ray job submit -- ...``), so ``$(python -c ...)``, variables and quoting are expanded
exactly as a user's shell expands them; nothing is trained or served.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "rl.md"
_STUBS = r"""
python3() { if [ "$1" = -m ]; then printf '%s\n' "@@ $2" "${@:3}" >> "$CAPTURE"; else python "$@"; fi; }
swift() { printf '%s\n' "@@ swift" "$@" >> "$CAPTURE"; }
ray() { while [ "$#" -gt 0 ] && [ "$1" != -- ]; do shift; done; shift; "$@"; }
trl-polar() { :; }
vllm() { :; }
accelerate() { :; }
"""


def section(heading: str, text: str | None = None) -> str:
    """The text under the first heading that starts with ``heading``, to the next heading of its level or above
    (lines inside code blocks are not headings)."""
    lines = (DOC.read_text(encoding="utf-8") if text is None else text).splitlines(keepends=True)
    fenced, level, out = False, None, []
    for line in lines:
        fenced ^= line.startswith("```")
        heading_level = len(line) - len(line.lstrip("#")) if line.startswith("#") and not fenced else 0
        if level is None:
            if heading_level and line[heading_level:].strip().startswith(heading):
                level = heading_level
            continue
        if heading_level and heading_level <= level:
            break
        out.append(line)
    assert level is not None, f"docs/rl.md has no heading starting {heading!r}"
    return "".join(out)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> dict[str, list[str]]:
    """{program: argv} of what ``block`` starts (``verl.trainer.main_ppo``, ``swift``, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        capture = os.path.join(tmp, "argv")
        env = {
            **os.environ,
            "CAPTURE": capture,
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        }
        env["HOME"] = "/home/user"
        done = subprocess.run(["bash", "-c", _STUBS + block], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"the documented block failed in bash:\n{done.stderr}"
        lines = Path(capture).read_text().splitlines() if os.path.exists(capture) else []
    out: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("@@ "):
            current = out.setdefault(line[3:], [])
        else:
            current.append(line)
    return out


def compat_rows() -> list[dict[str, str]]:
    """The rows of the table under "Tested callers": caller, versions (a list), entry point, command (a heading)."""
    rows = []
    for line in section("Tested callers").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("caller", "---"):
            continue
        caller, versions, entry, command = cells
        rows.append(
            {
                "caller": caller,
                "versions": [v.strip() for v in versions.split(",")],
                "entry": entry,
                "command": command,
            }
        )
    return rows
