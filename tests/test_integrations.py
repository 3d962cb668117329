"""The verl and OpenRLHF adapters, loaded by file path and called exactly as those engines call them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

import trl_polar.integrations as integrations
from trl_polar.scorer import PolarScorer


def _load_by_path(module, name):
    """How verl (custom_reward_function.path) and OpenRLHF (--remote_rm_url x.py) import a reward file."""
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


def test_verl_batch_manager_call(polar_env, scorer):
    from trl_polar.integrations import verl

    module = _load_by_path(verl, "custom_module")
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], "Translate to French: good morning"]
    # verl's BatchRewardManager: keyword lists, numpy object arrays from the parquet's non-tensor batch.
    scores = module.compute_score_batch(
        data_sources=np.array(["math", "mt"], dtype=object),
        solution_strs=["<think>2 plus 2</think>The answer is 4.", "bonjour"],
        ground_truths=["4", "bonjour"],
        extra_infos=np.array(
            [{"prompt": np.array(prompts[0], dtype=object), "split": "train"}, {"prompt": prompts[1]}], dtype=object
        ),
        reward_router_address=None,
    )
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(scorer.score(prompts, ["4", "bonjour"], ["The answer is 4.", "bonjour"]), abs=1e-6)

    with pytest.raises(ValueError, match=r"Row 1 \(data_source='mt'\) has no extra_info\['prompt'\]"):
        module.compute_score_batch(["math", "mt"], ["a", "b"], ["4", "x"], [{"prompt": "p"}, {}])
    with pytest.raises(ValueError, match=r"Row 0 has no reward_model.ground_truth"):
        module.compute_score_batch(["math"], ["a"], [None], [{"prompt": "p"}])


def test_openrlhf_reward_func_call(polar_env, scorer):
    from trl_polar.integrations import openrlhf

    module = _load_by_path(openrlhf, "reward_func")
    templated = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    query = "<s>" + templated + "<think>hmm</think>The answer is 4.<|im_end|></s>"
    # OpenRLHF's executor: positional lists, one sample per call.
    result = module.reward_func([query], [templated], ["4"])
    assert set(result) == {"rewards", "scores", "extra_logs"}
    assert isinstance(result["rewards"], torch.Tensor) and result["rewards"].shape == (1,)
    assert result["extra_logs"]["polar_failed"].tolist() == [0.0]
    expected = scorer.score([templated], ["4"], ["The answer is 4."])
    assert result["rewards"].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(result["scores"], result["rewards"])

    # A JSON label brings the plain prompt, which replaces the chat-templated one.
    label = json.dumps({"reference": "4", "prompt": "What is 2 + 2?"})
    result = module.reward_func([query, query], [templated, templated], [label, "4"])
    expected = scorer.score(["What is 2 + 2?", templated], ["4", "4"], ["The answer is 4."] * 2)
    assert result["rewards"].tolist() == pytest.approx(expected, abs=1e-6)
    # OpenRLHF has no "no reward" state: a bad sample gets the finite fallback, counted, by default.
    result = module.reward_func([query], [templated], [""])
    assert result["rewards"].tolist() == [-10.0] and result["extra_logs"]["polar_failed"].tolist() == [1.0]


def test_response_from_query():
    from trl_polar.integrations.openrlhf import response_from_query

    assert response_from_query("<s>Q: hi A: hello world</s>", "Q: hi A:") == "hello world"
    with pytest.raises(ValueError, match="does not hold its prompt"):  # no guessing from a common prefix
        response_from_query("Q:  hi A: x<|eot_id|>", "Q: hi A:")


def test_config_file_and_env(tmp_path, polar_env, monkeypatch):
    config = tmp_path / "polar.yaml"
    config.write_text("max_tokens: 2048\nstrip_think: false\nclip: '-5,1'\nbaseline: false\n", encoding="utf-8")
    monkeypatch.setenv("TRL_POLAR_CONFIG", str(config))
    monkeypatch.setenv("TRL_POLAR_BASELINE", "1")  # the variable wins over the file
    settings = integrations.settings()
    assert settings.max_tokens == 2048 and settings.strip_think is False and settings.baseline is True
    assert integrations.settings() is settings  # parsed once while the variables stay the same
    reward = integrations.get_reward()
    assert reward.clip == (-5.0, 1.0) and reward.baseline and reward.scorer.max_tokens_per_batch == 2048
    assert integrations.get_reward() is reward  # one model per process and setting
    config.write_text("temperature: 1\n", encoding="utf-8")
    monkeypatch.setenv("TRL_POLAR_BASELINE", "true")  # another set of variables: read again
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        integrations.settings()
    monkeypatch.delenv("TRL_POLAR_CONFIG")
    monkeypatch.setenv("TRL_POLAR_MAX_TOKENS", "lots")
    with pytest.raises(ValueError, match="TRL_POLAR_MAX_TOKENS .*valid integer"):
        integrations.settings()
    monkeypatch.setenv("TRL_POLAR_MAX_TOKENS", "64")
    monkeypatch.setenv("TRL_POLAR_STRIP_THINK", "maybe")
    with pytest.raises(ValueError, match="TRL_POLAR_STRIP_THINK .*valid boolean"):
        integrations.settings()
    monkeypatch.setenv("TRL_POLAR_STRIP_THINK", "off")
    monkeypatch.setenv("TRL_POLAR_ON_ERROR", "skip")
    with pytest.raises(ValueError, match="TRL_POLAR_ON_ERROR .*on_error"):
        integrations.settings()
    monkeypatch.delenv("TRL_POLAR_ON_ERROR")
    assert integrations.settings().strip_think is False
    monkeypatch.delenv("TRL_POLAR_MODEL")
    with pytest.raises(ValueError, match="set TRL_POLAR_MODEL"):
        integrations.settings()


def test_openrlhf_extraction_names_the_sample():
    """The one reading of OpenRLHF samples, shared by the reward file and the server's /get_reward."""
    from trl_polar.integrations.openrlhf import OpenRLHFInputError, extract_items

    label = json.dumps({"reference": "r", "prompt": "hi"})
    assert extract_items(["<s>Q: hi A: yo</s>", "Q: x A: z"], ["Q: hi A:", "Q: x A:"], [label, "ref"]) == (
        ["hi", "Q: x A:"],
        ["r", "ref"],
        ["yo", "z"],
    )
    with pytest.raises(OpenRLHFInputError, match=r"`labels\[1\]` must be a string") as info:
        extract_items(["q", "q"], ["q", "q"], ["ok", 3])
    assert info.value.field == "labels[1]"
    with pytest.raises(OpenRLHFInputError, match=r"query\[0\].*does not hold its prompt") as info:
        extract_items(["unrelated"], ["Q: x A:"], ["ref"])
    assert info.value.field == "query[0]"
    with pytest.raises(OpenRLHFInputError, match="match one to one") as info:
        extract_items(["q"], [], [])
    assert info.value.field == "labels"
