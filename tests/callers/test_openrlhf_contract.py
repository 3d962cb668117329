"""OpenRLHF's own code (pinned releases, `requirements/openrlhf-*.txt`) parsing the documented flags and scoring
rollouts with trl_polar, a failed rollout among them. Stood in: Ray (in-process, `standins/ray`), vLLM's generation
(an engine returning the given response ids) and flash-attn (`standins/gpu`). Not run: the actor, critic and
reference models (DeepSpeed on GPUs), so ``make_experience``'s forward passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from doc_commands import bash_blocks, commands, compat_rows, section  # noqa: E402
from serving_helpers import ServerProcess  # noqa: E402

from trl_polar.rewards import strip_think  # noqa: E402
from trl_polar.scorer import PolarScorer  # noqa: E402

ROWS = [row for row in compat_rows() if row["caller"] == "OpenRLHF"]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
REFERENCE = "Paris is the capital of France."
ROLLOUTS = [
    {"prompt": PROMPT, "response": "Paris.", "label": ""},  # no label: fails, first in its micro-batch
    {"prompt": PROMPT, "response": "<think>hmm</think>Paris, on the Seine.", "label": REFERENCE},
    {"prompt": PROMPT, "response": "Lyon.", "label": REFERENCE},
    {"prompt": PROMPT, "response": "Marseille.", "label": ""},
]


@pytest.fixture(scope="module")
def server(tiny_qwen2_rm_dir):
    proc = ServerProcess(tiny_qwen2_rm_dir).wait_ready()
    yield proc
    proc.stop()


def _flags(command: str, server_url: str) -> list[str]:
    blocks = [b for b in bash_blocks(section(command)) if "openrlhf.cli.train_ppo_ray" in b]
    argv = [commands(b)["openrlhf.cli.train_ppo_ray"] for b in blocks]
    # The documented reward host is the test's server.
    return [[a.replace("http://rm-host:8000", server_url) for a in flags] for flags in argv]


@pytest.mark.parametrize("version", [v for row in ROWS for v in row["versions"]])
def test_openrlhf_scores_and_survives_a_failed_rollout(caller, server, tiny_qwen2_rm_dir, version):
    """Every documented command (HTTP to `trl-polar serve`, and the reward file) parsed by OpenRLHF, its executor
    scoring each rollout: the readable ones get PolarScorer's reward, the failed ones the same finite fallback with
    polar_failed=1 by either path, and OpenRLHF's micro-batch merge and make_experience's reward check go through."""
    (row,) = [r for r in ROWS if version in r["versions"]]
    env = {"TRL_POLAR_MODEL": tiny_qwen2_rm_dir, "TRL_POLAR_DEVICE": "cpu"}
    expected = PolarScorer(tiny_qwen2_rm_dir, device="cpu").score(
        [PROMPT] * 2, [REFERENCE] * 2, [strip_think(ROLLOUTS[1]["response"]), ROLLOUTS[2]["response"]]
    )
    payload = {"commands": _flags(row["command"], server.url), "rollouts": ROLLOUTS, "tokenizer": tiny_qwen2_rm_dir}
    results = caller(f"openrlhf-{version}").scenario("openrlhf_rollouts.py", payload, env)["results"]
    assert len(results) == 2  # the HTTP command and the reward-file command
    http, file = results
    assert http["remote_url"] == [server.url + "/get_reward"] and file["remote_url"][0].endswith("openrlhf.py")
    for out in results:
        assert out["label_key"] == "reference" and out["clip_range"] == [-10.0, 10.0]
        assert out["rewards_precomputed"]  # else make_experience: "reward_model_group is required ..."
        (batch,) = out["batches"]  # --rollout.micro_batch_size 8: the four rollouts merged, failed ones included
        assert batch["polar_failed"] == [1.0, 0.0, 0.0, 1.0]
        assert [batch["rewards"][0], batch["rewards"][3]] == [-10.0, -10.0]  # TRL_POLAR_FAILURE_REWARD's default
        assert batch["rewards"][1:3] == pytest.approx(expected, abs=1e-4)
        assert batch["scores"] == batch["rewards"]
