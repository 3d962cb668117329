"""Download, on a connected machine, the wheels the GPU check installs on an air-gapped one (`make wheelhouse`).

The target's Python and platform are named, not taken from this machine: pip resolves trl_polar's wheel and pytest
for them (``--python-version``, ``--platform``, binary wheels only), then downloads the result without the stack a GPU
image carries and must keep (torch, triton, the CUDA libraries): `gpu_check.sh --wheelhouse DIR` installs on top of
the machine's own torch and never replaces it.

    python benchmarks/wheelhouse.py --dest wheelhouse --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 wheelhouse/trl_polar-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# What a GPU image brings and the check must not replace: torch and what is built for its CUDA.
PROVIDED = ("torch", "triton", "pytorch-triton")
PROVIDED_PREFIXES = ("nvidia-", "cuda-")
EXTRA = ("pytest",)  # what the check itself runs, beyond trl_polar's dependencies


def wanted(report: dict) -> list[str]:
    """``name==version`` pins of a pip install report, less the GPU image's own stack and local files.

    >>> wanted({"install": [
    ...     {"metadata": {"name": "torch", "version": "2.11.0"}, "download_info": {"url": "https://x/torch.whl"}},
    ...     {"metadata": {"name": "nvidia-cublas-cu13", "version": "13.0"}, "download_info": {"url": "https://x"}},
    ...     {"metadata": {"name": "trl-polar", "version": "0.1.0"}, "download_info": {"url": "file:///w/t.whl"}},
    ...     {"metadata": {"name": "datasets", "version": "4.8.0"}, "download_info": {"url": "https://x/d.whl"}},
    ... ]})
    ['datasets==4.8.0']
    """
    pins = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        canonical = name.lower().replace("_", "-")
        if canonical in PROVIDED or canonical.startswith(PROVIDED_PREFIXES):
            continue
        if item["download_info"]["url"].startswith("file:"):
            continue  # trl_polar's own wheel is already in the wheelhouse
        pins.append(f"{name}=={version}")
    return sorted(pins)


def platforms(platform: str) -> list[str]:
    """A glibc platform and every older one its machines also run (pip takes the named tags only): a
    manylinux_2_28 machine installs manylinux_2_17 (manylinux2014) wheels too.

    >>> platforms("manylinux_2_20_x86_64")
    ['manylinux_2_20_x86_64', 'manylinux_2_19_x86_64', 'manylinux_2_18_x86_64', 'manylinux_2_17_x86_64', \
'manylinux2014_x86_64']
    >>> platforms("macosx_14_0_arm64")
    ['macosx_14_0_arm64']
    """
    parts = platform.split("_", 3)
    if parts[0] != "manylinux" or len(parts) != 4 or not (parts[1] + parts[2]).isdigit():
        return [platform]
    major, minor, arch = int(parts[1]), int(parts[2]), parts[3]
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)] if major == 2 else [platform]
    return tags + ([f"manylinux2014_{arch}"] if major == 2 and minor >= 17 else [])


def _target(args) -> list[str]:
    flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", args.python_version]
    for platform in args.platform:
        for tag in platforms(platform):
            flags += ["--platform", tag]
    return flags


def resolve(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
            + ["--report", str(report), "--target", str(Path(tmp) / "target"), *_target(args)]
            + [str(args.wheel), *EXTRA],
            check=True,
        )
        return wanted(json.loads(report.read_text()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="trl_polar's wheel (built by make wheelhouse)")
    parser.add_argument("--dest", type=Path, required=True, help="the wheelhouse directory")
    parser.add_argument("--python-version", required=True, help="the GPU machine's Python, e.g. 3.12")
    parser.add_argument(
        "--platform", action="append", help="its wheel platform, repeatable (default manylinux_2_28_x86_64)"
    )
    args = parser.parse_args(argv)
    args.platform = args.platform or ["manylinux_2_28_x86_64"]
    if not args.wheel.is_file():
        parser.error(f"{args.wheel}: no such wheel; build it with `pip wheel --no-deps -w DIR .`")
    pins = resolve(args)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(args.dest), *_target(args), *pins],
        check=True,
    )
    print(f"{len(pins)} wheels for Python {args.python_version} ({', '.join(args.platform)}) in {args.dest}")


if __name__ == "__main__":
    main()
