"""The GPU check's last line: one JSON object from the parts' logs, whatever finished (standard library only).

    python benchmarks/gpu_check_summary.py LOGS TOTAL_SECONDS DRY_RUN "name rc limit seconds" ...

Each part is ``ok`` (exit 0), ``failed`` (another exit code), ``timeout`` (killed at its limit: 124 or 137) or
``skipped`` (an earlier step it needs failed). A benchmark cut short still reports its last ``{"partial": ...}``
line. The object is also written to LOGS/summary.json.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMEOUT_CODES = (124, 137)


def part_status(rc: str) -> str:
    """
    >>> [part_status(rc) for rc in ("0", "1", "124", "137", "skipped")]
    ['ok', 'failed', 'timeout', 'timeout', 'skipped']
    """
    if rc == "skipped":
        return "skipped"
    code = int(rc)
    return "ok" if code == 0 else "timeout" if code in TIMEOUT_CODES else "failed"


def last_json(path: Path) -> dict | None:
    """The last line of a log that parses as a JSON object."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def count_tests(logs: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        suite = ET.parse(logs / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return counts
    suite = suite if suite.tag == "testsuite" else suite[0]
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    counts.update(passed=int(suite.get("tests", 0)) - failed - skipped, failed=failed, skipped=skipped)
    return counts


def at_least(result: dict | None, path: list[str], target: float) -> bool | None:
    value = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else value >= target


def summarize(logs: Path, total: float, dry_run: bool, parts: list[str]) -> dict:
    status = {}
    for entry in parts:
        name, rc, limit, seconds = entry.split()
        status[name] = {"status": part_status(rc), "seconds": round(float(seconds), 1), "limit_s": int(limit)}
    tests = {**status.get("tests", {"status": "not run"}), **count_tests(logs)}
    score, train = last_json(logs / "score.log"), last_json(logs / "train.log")
    install = (logs / "install.log").read_text(errors="replace").strip().splitlines() if "install" in status else []
    gpu = (score or {}).get("gpu") or (train or {}).get("gpu")
    targets = {
        "tests_pass": tests["status"] == "ok" and tests["failed"] == 0 and tests["passed"] > 0,
        "score_3x_naive": at_least(score, ["speedup_vs_naive"], 3.0),
        "score_mfu_50": at_least(score, ["mfu", "polar"], 0.5),
        "train_2x_trl": at_least(train, ["speedup_vs_trl"], 2.0),
        "train_mfu_35": at_least(train, ["mfu", "shared_prefix"], 0.35),
    }
    return {
        "gpu_check": 2,
        "dry_run": dry_run,
        "gpu": gpu,
        "seconds": round(total, 1),
        "parts": status,
        "installed": install[-1] if install and status["install"]["status"] == "ok" else None,
        "logs": str(logs),
        "tests": tests,
        "score": {**status.get("score", {}), **(score or {})},
        "train": {**status.get("train", {}), **(train or {})},
        "targets": targets,
    }


def main(argv: list[str]) -> None:
    logs, total, dry_run, parts = Path(argv[0]), float(argv[1]), argv[2] == "1", argv[3:]
    summary = summarize(logs, total, dry_run, parts)
    line = json.dumps(summary)
    (logs / "summary.json").write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
