"""PolarReward: TRL's reward-callable protocol, references, think stripping, normalisations, logging."""

from __future__ import annotations

import math
import pickle
import statistics

import pytest
import torch

from trl_polar.rewards import PolarReward, strip_think
from trl_polar.scorer import PolarScorer

P1 = [{"role": "user", "content": "What is 2 + 2?"}]
P2 = [{"role": "user", "content": "Translate to French: good morning"}]


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


def _call(reward, prompts, completions, references, **extra):
    """Call the reward exactly as TRL 1.16's _calculate_rewards does: keyword arguments only."""
    logged = {}
    out = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2, 3] for _ in completions],
        trainer_state=None,
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: logged.setdefault(name, value),
        reference=references,
        **extra,
    )
    return out, logged


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def test_protocol_and_raw_scores(scorer):
    reward = PolarReward(scorer)
    assert reward.__name__ == "polar_reward"
    assert not isinstance(reward, torch.nn.Module)  # TRL would treat a module as a reward *model*
    prompts = [P1, P1, P2, P2]
    completions = [_assistant("4"), _assistant("five"), _assistant("bonjour"), _assistant("salut")]
    references = ["4", "4", "bonjour", "bonjour"]
    out, logged = _call(reward, prompts, completions, references, task=["math", "math", "mt", "mt"])
    expected = scorer.score(prompts, references, ["4", "five", "bonjour", "salut"])
    assert out == pytest.approx(expected, abs=1e-6)
    assert logged["polar_reward/raw_mean"] == pytest.approx(statistics.fmean(expected))
    assert logged["polar_reward/raw_min"] == pytest.approx(min(expected))
    assert logged["polar_reward/missing_reference_frac"] == 0.0
    assert {"polar_reward/raw_std", "polar_reward/raw_max", "polar_reward/seconds"} <= set(logged)
    # String (standard) rows give the same numbers as the flattened conversation.
    out_str, _ = _call(reward, ["What is 2 + 2?"] * 2, ["4", "five"], ["4", "4"])
    assert out_str == pytest.approx(expected[:2], abs=1e-6)


def test_missing_references(scorer):
    prompts = ["What is 2 + 2?"] * 4
    completions = ["4", "5", "6", "7"]
    references = ["4", None, "", float("nan")]
    out, logged = _call(PolarReward(scorer), prompts, completions, references)
    assert out[1:] == [None, None, None] and isinstance(out[0], float)
    assert logged["polar_reward/missing_reference_frac"] == pytest.approx(0.75)
    out, logged = _call(PolarReward(scorer), prompts[:1], completions[:1], [None])
    assert out == [None] and "polar_reward/raw_mean" not in logged
    with pytest.raises(ValueError, match=r"`reference\[1\]` is empty: the row at index 1 .* lacks a reference\. Fill"):
        _call(PolarReward(scorer, on_missing_reference="error"), prompts, completions, references)
    with pytest.raises(ValueError, match=r"needs the dataset column 'gold'.*reference_column"):
        _call(PolarReward(scorer, reference_column="gold"), prompts, completions, references)


def test_reference_lists_aggregate(scorer):
    prompts = ["What is 2 + 2?"] * 2
    completions = ["4", "The answer is five"]
    refs = ["4", "The answer is 4."]
    per_ref = [scorer.score(prompts, [r, r], completions) for r in refs]
    for aggregate, combine in (("mean", statistics.fmean), ("max", max), ("min", min)):
        out, _ = _call(PolarReward(scorer, aggregate=aggregate), prompts, completions, [refs, refs])
        assert out == pytest.approx([combine(s[i] for s in per_ref) for i in range(2)], abs=1e-6)
    # A message-list reference is one reference, not a list of them.
    out, _ = _call(PolarReward(scorer), prompts[:1], completions[:1], [_assistant("4")])
    assert out == pytest.approx(per_ref[0][:1], abs=1e-6)


def test_strip_think(scorer):
    assert strip_think("<think>a\nb</think>\nAnswer: 4") == "Answer: 4"
    assert strip_think("still thinking <think>no end") == "still thinking"
    assert strip_think("<think>x</think>one<think>y</think> two") == "one two"
    reward = PolarReward(scorer, strip_think=True)
    out, _ = _call(reward, ["What is 2 + 2?"], [_assistant("<think>2+2=4</think>The answer is 4.")], ["4"])
    assert out == pytest.approx(scorer.score(["What is 2 + 2?"], ["4"], ["The answer is 4."]), abs=1e-6)


def test_normalisations(scorer):
    prompts = [P1, P1, P1, P2, P2, P2]
    texts = ["4", "five", "The answer is 4.", "bonjour", "salut", "good morning"]
    references = ["4"] * 3 + ["bonjour"] * 3
    raw = scorer.score(prompts, references, texts)
    completions = [_assistant(t) for t in texts]

    base = scorer.score(prompts, references, references)
    out, logged = _call(PolarReward(scorer, baseline=True), prompts, completions, references)
    assert out == pytest.approx([r - b for r, b in zip(raw, base, strict=True)], abs=1e-5)
    assert logged["polar_reward/raw_mean"] == pytest.approx(statistics.fmean(raw), abs=1e-6)  # raw stays raw
    copy, _ = _call(PolarReward(scorer, baseline=True), [P1], [_assistant("4")], ["4"])
    assert copy[0] == pytest.approx(0.0, abs=1e-6)  # a copy of the reference scores exactly 0

    def z(values):
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        return [(v - mean) / (std + 1e-6) for v in values]

    out, _ = _call(PolarReward(scorer, normalize="group"), prompts, completions, references)
    assert out == pytest.approx(z(raw[:3]) + z(raw[3:]), abs=1e-5)
    out, _ = _call(PolarReward(scorer, normalize="batch"), prompts, completions, references)
    assert out == pytest.approx(z(raw), abs=1e-5)

    lo, hi = sorted(raw)[1], sorted(raw)[-2]
    out, _ = _call(PolarReward(scorer, clip=(lo, hi)), prompts, completions, references)
    assert out == pytest.approx([min(max(r, lo), hi) for r in raw], abs=1e-6)
    out, _ = _call(PolarReward(scorer, sigmoid_scale=2.0), prompts, completions, references)
    assert out == pytest.approx([1 / (1 + math.exp(-r / 2.0)) for r in raw], abs=1e-6)
    # Order: normalise, then clip, then sigmoid.
    out, _ = _call(
        PolarReward(scorer, normalize="batch", clip=1.0, sigmoid_scale=1.0), prompts, completions, references
    )
    assert out == pytest.approx([1 / (1 + math.exp(-min(max(v, -1.0), 1.0))) for v in z(raw)], abs=1e-5)


def test_invalid_options(scorer):
    with pytest.raises(ValueError, match="normalize"):
        PolarReward(scorer, normalize="global")
    with pytest.raises(ValueError, match="aggregate"):
        PolarReward(scorer, aggregate="median")
    with pytest.raises(ValueError, match="clip"):
        PolarReward(scorer, clip=(3, 1))
    with pytest.raises(ValueError, match="TRL_POLAR_MODEL"):
        PolarReward(None)


class LengthGapScorer:
    """A second, real scoring backend (as a remote client will be): minus the length gap to the reference."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, references, candidates):
        self.calls.append(len(candidates))
        return [-abs(len(c) - len(r)) for r, c in zip(references, candidates, strict=True)]


def test_any_scorer_object_plugs_in():
    backend = LengthGapScorer()
    reward = PolarReward(backend, baseline=True, name="gap")
    out, logged = _call(reward, ["q", "q"], ["abcd", "ab"], ["abc", "abc"])
    assert out == [-1.0, -1.0] and backend.calls == [3]  # candidates and the one baseline in a single call
    assert "gap/raw_mean" in logged and reward.__name__ == "gap"


def test_lazy_path_and_pickle(tiny_qwen2_rm_dir, scorer):
    reward = PolarReward(tiny_qwen2_rm_dir, device="cpu", max_tokens_per_batch=1024)
    assert reward._scorer is None  # nothing loaded until the first call, on the rank that calls
    out, _ = _call(reward, ["What is 2 + 2?"], ["4"], ["4"])
    assert out == pytest.approx(scorer.score(["What is 2 + 2?"], ["4"], ["4"]), abs=1e-6)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone._scorer is None and clone.reference_column == "reference"
    assert clone(prompts=["What is 2 + 2?"], completions=["4"], reference=["4"]) == pytest.approx(out, abs=1e-6)


def test_completions_as_content_parts_score_as_their_text(scorer):
    reward = PolarReward(scorer)
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc"}}]}
    out, _ = _call(reward, [P1, P1], [parts, [tool_call, *parts]], ["4", "4"])
    assert out == pytest.approx(scorer.score([P1], ["4"], ["4"]) * 2, abs=1e-6)


def test_the_reward_cuts_a_long_completion_as_training_did(tmp_path, tiny_qwen2_rm_dir):
    """A checkpoint that does not record its cut side is scored with the start of a long completion kept ("right"),
    as POLAR was trained (xtuner's client copy defaults to "left"; see test_template.py for the decision)."""
    import json
    import shutil

    from trl_polar.template import PolarTemplate

    model_dir = tmp_path / "rm"
    shutil.copytree(tiny_qwen2_rm_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["polar_template"].pop("response_cut_side", None)
    config["polar_template"]["max_response_length"] = 8
    (model_dir / "config.json").write_text(json.dumps(config))
    long = "The answer is 4 because two and two make four, " + "and that is all there is to say " * 4
    rewards = PolarReward(str(model_dir), device="cpu")(prompts=["2+2?"], completions=[long], reference=["4"])
    scorer = PolarScorer(str(model_dir), device="cpu")
    tokenizer = scorer.template.tokenizer
    expected = {}
    for side in ("right", "left"):
        template = PolarTemplate(tokenizer, max_length=16384, max_response_length=8, response_cut_side=side)
        expected[side] = PolarScorer(scorer.model, template, device="cpu").score(["2+2?"], ["4"], [long])[0]
    assert rewards[0] == pytest.approx(expected["right"], abs=1e-6)
    assert abs(expected["right"] - expected["left"]) > 1e-3  # the two sides score differently here


def test_reward_model_loads_whole_while_a_zero3_run_is_registered(tiny_qwen2_rm_dir):
    # Under ZeRO-3 TrainingArguments registers a DeepSpeed config that makes transformers partition every model it
    # loads; the reward model is loaded outside it (tests/test_grpo_multiprocess.py runs the real 2-rank ZeRO-3 case).
    # HfDeepSpeedConfig needs deepspeed installed; without it a half-built config would stay registered process-wide.
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from trl_polar.rewards import PolarReward

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        reward = PolarReward(tiny_qwen2_rm_dir, device="cpu")
        embedding = reward.scorer.model.get_input_embeddings().weight
        assert embedding.dim() == 2 and embedding.shape[0] > 0
        assert is_deepspeed_zero3_enabled(), "the run's DeepSpeed config must be registered again afterwards"
    finally:
        del config
