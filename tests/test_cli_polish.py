"""Small things a newcomer meets: `format --tokenizer` with `--model`, `convert` without a tokenizer, one default
token budget, every docs page reachable."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from trl_polar import PolarTemplate

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trl_polar.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_format_reads_with_the_given_tokenizer_and_the_models_template(tiny_qwen2_rm_dir, shared_fixtures):
    other = str(shared_fixtures / "bpe_tokenizer_with_bos")
    row = ["--prompt", "What is two plus two?", "--reference", "Four.", "--candidate", "It is four.", "--json"]
    own = json.loads(run_cli("format", "--model", tiny_qwen2_rm_dir, *row).stdout)
    out = run_cli("format", "--model", tiny_qwen2_rm_dir, "--tokenizer", other, *row)
    assert out.returncode == 0, out.stderr
    given = json.loads(out.stdout)
    template = PolarTemplate.from_pretrained(tiny_qwen2_rm_dir, tokenizer=AutoTokenizer.from_pretrained(other))
    expected = template.build("What is two plus two?", "Four.", "It is four.")
    assert given["num_tokens"] == len(expected.input_ids) != own["num_tokens"]
    assert given["max_length"] == own["max_length"]  # the model's recorded template


def test_convert_without_tokenizer_files_names_the_flag(tmp_path, shared_fixtures):
    out = run_cli("convert", str(shared_fixtures / "internlm2_reward_tiny"), str(tmp_path / "polar"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"Error: {shared_fixtures / 'internlm2_reward_tiny'} has no tokenizer files: pass --tokenizer with the "
        "checkpoint's tokenizer (a directory or hub name, e.g. internlm/POLAR-7B)."
    ]
    assert not (tmp_path / "polar").exists()


def test_one_default_token_budget_across_the_cli():
    text = (ROOT / "docs" / "cli.md").read_text()
    defaults = set(re.findall(r"`--max-tokens-per-batch <int>`: [^\n]*?\[default: (\d+)\]", text))
    assert defaults == {"16384"}


def test_every_docs_page_is_linked_from_the_index_and_the_nav():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    index = (ROOT / "docs" / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    assert pages - {"index.md"} <= linked, f"docs/index.md does not link {sorted(pages - {'index.md'} - linked)}"

    def nav_pages(node) -> set[str]:
        if isinstance(node, str):
            return {node}
        items = node.values() if isinstance(node, dict) else node
        return set().union(*(nav_pages(item) for item in items))

    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert pages <= nav, f"mkdocs.yml's nav lacks {sorted(pages - nav)}"
