"""ms-swift 4.6.0's own code parsing the documented command, loading the POLAR plugin and calling it in its GRPO
reward step. Stood in: nothing on this path (the GRPO trainer itself pins trl < 1.0 and is not run; generation and
GPUs are not used)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from doc_commands import bash_blocks, commands, compat_rows, section  # noqa: E402

from trl_polar.rewards import strip_think
from trl_polar.scorer import PolarScorer

PROMPT = "Question: what is the capital of France? Answer in one word, then explain briefly. Answer:"
REFERENCE = "Paris is the capital of France."
COMPLETIONS = ["<think>capital</think> Paris.", " Lyon, I think.", " Paris, the largest city.", " Marseille."]


def _rows(solutions, column="solution"):
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": completion},
            ],
            "extra": {column: solution},
        }
        for completion, solution in zip(COMPLETIONS, solutions, strict=True)
    ]


VERSIONS = [v for row in compat_rows() if row["caller"] == "ms-swift" for v in row["versions"]]


@pytest.mark.parametrize("version", VERSIONS)
def test_ms_swift_grpo_scores_per_row_under_the_failure_policy(caller, tiny_qwen2_rm_dir, version):
    env = {"TRL_POLAR_MODEL": tiny_qwen2_rm_dir, "TRL_POLAR_DEVICE": "cpu"}
    with_gap = [REFERENCE, "", REFERENCE, REFERENCE]  # row 1 has an empty reference
    cases = [
        {"env": {"TRL_POLAR_ON_ERROR": "none"}, "rows": _rows(with_gap)},
        {"env": {}, "rows": _rows(with_gap)},  # the default policy, raise
        {"env": {"TRL_POLAR_REFERENCE_COLUMN": "answer"}, "rows": _rows([REFERENCE] * 4, column="answer")},
        {"env": {}, "rows": _rows([REFERENCE] * 4, column="answer")},
    ]
    (block,) = bash_blocks(section("GRPO in ms-swift"))
    argv = commands(block)["swift"]
    out = caller(f"ms-swift-{version}").scenario("ms_swift_grpo_rewards.py", {"cases": cases, "argv": argv}, env)
    # The documented command, parsed by ms-swift: every flag known, the plugin file ours, the reward named polar.
    import trl_polar.integrations.ms_swift as plugin

    assert out["parsed"]["command"] == "rlhf" and out["parsed"]["rlhf_type"] == "grpo"
    assert out["parsed"]["remaining"] == [] and out["parsed"]["reward_funcs"] == ["polar"]
    assert out["parsed"]["external_plugins"] == [plugin.PLUGIN]
    scored, raised, renamed, missing = out["results"]
    system_and_user = _rows([REFERENCE] * 4)[0]["messages"][:2]
    expected = PolarScorer(tiny_qwen2_rm_dir, device="cpu").score(
        [system_and_user] * 4, [REFERENCE] * 4, [strip_think(c) for c in COMPLETIONS]
    )
    polar = [row[0] for row in scored["rewards"]]
    assert polar[1] is None  # NaN in ms-swift: its own "no reward" for that row alone
    assert [polar[0], polar[2], polar[3]] == pytest.approx([expected[0], expected[2], expected[3]], abs=1e-5)
    assert all(row[1] is not None for row in scored["rewards"])  # ms-swift's own reward beside it, untouched
    assert "row 1 has no reference in column 'solution'" in raised["error"]
    assert "TRL_POLAR_ON_ERROR=none" in raised["error"] and "TRL_POLAR_REFERENCE_COLUMN" in raised["error"]
    assert [row[0] for row in renamed["rewards"]] == pytest.approx(expected, abs=1e-5)
    assert "dataset column 'solution'" in missing["error"] and "TRL_POLAR_REFERENCE_COLUMN" in missing["error"]


def test_plugin_is_alone_in_its_folder():
    """ms-swift puts the plugin's folder first on sys.path: nothing else there may shadow a module."""
    import trl_polar.integrations.ms_swift as plugin

    folder = os.path.dirname(plugin.PLUGIN)
    assert sorted(set(os.listdir(folder)) - {"__pycache__"}) == [os.path.basename(plugin.PLUGIN)]
