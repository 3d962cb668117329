"""docs/rl.md's table of tested callers and the pinned installs agree, so the table cannot drift from what runs."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import install  # noqa: E402
from doc_commands import DOC, bash_blocks, compat_rows, section  # noqa: E402

PACKAGES = {"verl": "verl", "OpenRLHF": "openrlhf", "ms-swift": "ms-swift"}
CONTRACT_TESTS = {
    "verl": "test_verl_contract.py",
    "OpenRLHF": "test_openrlhf_contract.py",
    "ms-swift": "test_ms_swift_contract.py",
}


def test_every_pinned_release_has_a_row_and_every_row_is_pinned():
    rows = compat_rows()
    in_table = {f"{PACKAGES[r['caller']]}-{v}" for r in rows if r["caller"] in PACKAGES for v in r["versions"]}
    assert in_table == set(install.names())
    for name in install.names():  # the pin is the version the table names
        package, version = name.rsplit("-", 1)
        assert f"{package}=={version}" in install._pins(name)
    (trl,) = [r for r in rows if r["caller"] == "TRL"]
    assert trl["versions"] == [importlib.metadata.version("trl")]


def test_every_row_names_a_documented_command_its_tests_run():
    for row in compat_rows():
        text = section(row["command"])  # the heading exists
        assert bash_blocks(text) or "```python" in text, f"{row['command']!r} documents no command"
        if row["caller"] in CONTRACT_TESTS:
            assert (Path(__file__).parent / CONTRACT_TESTS[row["caller"]]).is_file()


def test_failure_table_names_tests_that_exist():
    root = DOC.parents[1]
    table = DOC.read_text(encoding="utf-8").split("## Tested callers")[0]
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", table)
    assert len(named) >= 5
    for path, test in named:
        assert re.search(rf"^def {test}\(", (root / path).read_text(encoding="utf-8"), re.M), f"{path}::{test}"
