"""verl's own code (pinned releases, `requirements/verl-*.txt`) composing the documented commands and scoring with
trl_polar. Stood in: Ray (actors run in-process, `standins/ray`), and verl's vLLM reward-model servers (a
``trl-polar serve`` answers behind the router address in the engine's wire shape). Not run: generation, GPUs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from doc_commands import bash_blocks, commands, compat_rows, section  # noqa: E402

from trl_polar.rewards import strip_think  # noqa: E402
from trl_polar.scorer import PolarScorer  # noqa: E402

ROWS = [row for row in compat_rows() if row["caller"] == "verl"]
CASES = [(row["command"], version, row["entry"]) for row in ROWS for version in row["versions"]]
PROMPT = "Question: what is the capital of France? Answer in one word, then explain briefly. Answer:"
REFERENCE = "Paris is the capital of France."


def main_ppo_argv(command: str) -> list[str]:
    return commands(bash_blocks(section(command))[-1])["verl.trainer.main_ppo"]


def check_verl(caller, version, argv, env=None):
    return caller(f"verl-{version}").run(["-m", "trl_polar.cli", "check-verl", "--", *argv], env=env)


@pytest.mark.parametrize(("command", "version", "entry"), CASES)
def test_documented_command_makes_verl_call_trl_polar(caller, command, version, entry):
    """The documented command, composed by that verl's Hydra config (and main_ppo's key migration), makes verl's own
    loader return our function with the documented reward_kwargs."""
    done = check_verl(caller, version, main_ppo_argv(command), env={"TRL_POLAR_MODEL": "/models/polar-7b"})
    assert done.returncode == 0, done.stdout + done.stderr
    name = re.findall(r"`(compute_score\w*)`", entry)[0]
    assert f"verl {version}: reward manager" in done.stdout
    assert f"reward function: {name} from" in done.stdout
    assert re.search(r"defined in .*trl_polar/integrations/verl\.py", done.stdout)
    assert "reward_kwargs: {'prompt_key': 'prompt'}" in done.stdout
    assert "TRL_POLAR_URL': 'http://rm-host:8000" in done.stdout or "TRL_POLAR_MODEL" in done.stdout


def test_check_verl_refuses_what_verl_09_would_bypass(caller):
    """verl 0.9 starts with the 0.7-0.8 keys and scores with its default scorer: the check says so and what to set;
    it also refuses a manager verl 0.9 no longer has, a function that is not ours, and overrides verl refuses."""
    ours = ["reward.custom_reward_function.path=pkg://trl_polar.integrations.verl"]
    cases = [
        main_ppo_argv("verl 0.7–0.8"),
        ["reward.reward_manager.name=batch", *ours, "reward.custom_reward_function.name=compute_score_batch"],
        ["reward.custom_reward_function.path=pkg://json", "reward.custom_reward_function.name=dumps"],
        ["reward_model.use_reward_loop=True"],
    ]
    env = {"TRL_POLAR_URL": "http://rm-host:8000"}
    bypass, batch, other, refused = caller("verl-0.9.1").scenario("check_verl_cases.py", {"cases": cases}, env)[
        "results"
    ]
    assert not bypass["ok"] and "reward.custom_reward_function.path is empty" in bypass["report"]
    assert "this verl ignores custom_reward_function.path" in bypass["report"]
    assert not batch["ok"] and "verl refuses reward manager 'batch'" in batch["report"]
    assert not other["ok"] and "is not trl_polar's reward" in other["report"]
    assert "Could not override 'reward_model.use_reward_loop'" in refused["error"]


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


def _samples():
    responses = ["<think>France, capital</think> Paris.", " Paris, the largest city of France.", " Lyon.", " Paris."]
    truths = [REFERENCE, REFERENCE, REFERENCE, ""]  # the last has no reference: it fails by the policy
    return [
        {"prompt": PROMPT, "response": r, "ground_truth": t, "extra_info": {"question": PROMPT, "split": "train"}}
        for r, t in zip(responses, truths, strict=True)
    ]


@pytest.fixture(scope="module")
def reward_loop(caller, tiny_qwen2_rm_dir):
    """One verl 0.9.1 process, two runs: the RewardLoopManager with the in-process model (TRL_POLAR_ON_ERROR=none),
    then a RewardLoopWorker given a reward_router_address with a `trl-polar serve` behind it."""
    manager = {
        "env": {"TRL_POLAR_ON_ERROR": "none"},
        "overrides": [o for o in main_ppo_argv("verl 0.9") if "reward_kwargs.prompt_key" not in o]
        + [
            f"actor_rollout_ref.model.path={tiny_qwen2_rm_dir}",
            "reward.num_workers=2",
            "+reward.custom_reward_function.reward_kwargs.prompt_key=question",
        ],
        "samples": _samples(),
    }
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from serving_helpers import ServerProcess

    server = ServerProcess(tiny_qwen2_rm_dir).wait_ready()
    try:
        router = {
            "env": {"TRL_POLAR_BACKEND": "vllm"},
            "overrides": main_ppo_argv("verl 0.9")
            + [
                f"actor_rollout_ref.model.path={tiny_qwen2_rm_dir}",
                "reward.reward_model.enable=True",
                f"reward.reward_model.model_path={tiny_qwen2_rm_dir}",
                "reward.reward_model.rollout.name=vllm",
            ],
            "samples": [{**s, "extra_info": {"prompt": PROMPT}} for s in _samples()[:3]],
            "router": server.url.removeprefix("http://"),
        }
        env = {"TRL_POLAR_MODEL": tiny_qwen2_rm_dir, "TRL_POLAR_DEVICE": "cpu"}
        out = caller("verl-0.9.1").scenario("verl_reward_loop.py", {"runs": [manager, router]}, env)["results"]
        import httpx

        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    return out, metrics


def test_verl_reward_loop_manager_scores_with_polar(reward_loop, scorer):
    """verl 0.9.1's RewardLoopManager.compute_rm_score -> workers -> naive run_single -> compute_score_async: the
    rewards at the last response token equal PolarScorer's; a failed sample scores 0.0 with polar_failed=1."""
    out = reward_loop[0][0]
    expected = scorer.score([PROMPT] * 3, [REFERENCE] * 3, [strip_think(r) for r in out["responses"][:3]])
    assert out["rewards"][:3] == pytest.approx(expected, abs=1e-5)
    assert out["rewards"][3] == 0.0 and out["extra"]["polar_failed"] == [0.0, 0.0, 0.0, 1.0]


def test_verl_reward_router_scores_on_the_engine_behind_it(reward_loop, scorer):
    """verl's RewardLoopWorker with a reward_router_address (verl's reward-model pool): the adapter scores through
    it in vLLM's wire shape; a `trl-polar serve` stands in for verl's vLLM servers."""
    out, metrics = reward_loop[0][1], reward_loop[1]
    expected = scorer.score([PROMPT] * 3, [REFERENCE] * 3, [strip_think(r) for r in out["responses"]])
    assert out["rewards"] == pytest.approx(expected, abs=1e-4)
    assert 'endpoint="/pooling"' in metrics
