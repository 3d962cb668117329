"""The reward adapters driven the way their callers drive them, against a real ``trl-polar serve`` on 127.0.0.1 where
a server is involved.

The callers' contracts, as read in their sources:

- verl 0.8.0.dev (volcengine/verl b178a3c, Jan 2026): the reward loop's ``naive`` manager calls
  ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **extra)`` once per response, awaiting it
  when ``inspect.iscoroutinefunction`` says so (the function arrives wrapped in ``functools.partial`` with
  ``custom_reward_function.reward_kwargs`` merged in), else in the event loop's default executor (threads). It adds
  ``num_turns`` and ``rollout_reward_scores`` to ``extra_info``, passes ``reward_router_address`` and
  ``reward_model_tokenizer`` only when verl runs a reward model, and takes a float or a dict whose ``score`` is the
  reward and whose other keys (the same for every sample) become ``reward_extra_info``.
- OpenRLHF 0.11.0 (OpenRLHF/OpenRLHF 3c3be62): one rollout per call. The prompt is tokenized without special
  tokens and, if too long, only its last ``max_prompt_length`` tokens are kept; the query is
  ``decode(prompt_ids + response_ids, skip_special_tokens=False)`` while ``prompts`` holds the full prompt. A reward
  file's ``reward_func([query], [prompt], [label])`` runs in a thread; an HTTP answer's ``rewards``, ``scores`` and
  ``extra_logs`` are read with ``.get`` (None ``rewards`` = no reward); any non-200 answer is retried, then dropped.

ms-swift's own loader and GRPO reward step run in ``tests/callers/test_ms_swift_contract.py``, against the release.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import json
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import ServerProcess  # noqa: E402

from trl_polar.failures import ItemFailure  # noqa: E402
from trl_polar.scorer import PolarScorer  # noqa: E402

PROMPT = "Question: what is the capital of France? Answer in one word, then explain briefly. Answer:"
REFERENCE = "Paris is the capital of France."
RESPONSES = [
    "<think>France, capital, that is Paris</think> Paris.",
    " Paris, the largest city of France.",
    "<think>hmm</think> Lyon.",
    " I do not know.",
]


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_qwen2_rm_dir):
    # No API key: OpenRLHF sends none, and verl's router forwards none.
    proc = ServerProcess(tiny_qwen2_rm_dir).wait_ready()
    yield proc
    proc.stop()


def _answers(texts):
    from trl_polar.rewards import strip_think

    return [strip_think(t) for t in texts]


# ------------------------------------------------------------------------------------------------------------ verl
def _verl_wrap(fn, reward_kwargs):
    """How verl's get_custom_reward_fn hands the function to the manager: a partial merging reward_kwargs."""

    def call(raw_fn, extra, **kwargs):
        return raw_fn(**{**kwargs, **extra})

    async def acall(raw_fn, extra, **kwargs):
        return await raw_fn(**{**kwargs, **extra})

    return functools.partial(acall if inspect.iscoroutinefunction(fn) else call, fn, reward_kwargs)


def _verl_extra_info(prompt, key="prompt"):
    # The manager adds these two to every sample's extra_info.
    return {key: prompt, "split": "train", "num_turns": None, "rollout_reward_scores": {}}


async def _naive_reward_loop(fn, samples, reward_kwargs):
    """verl's reward loop: one task per sample, each awaiting the function or running it in the default executor."""
    wrapped = _verl_wrap(fn, reward_kwargs)
    loop = asyncio.get_running_loop()

    async def one(sample):
        if inspect.iscoroutinefunction(wrapped):
            return await wrapped(**sample)
        return await loop.run_in_executor(None, lambda: wrapped(**sample))

    return await asyncio.gather(*[one(s) for s in samples])


def _load_like_verl(path):
    """verl's load_module for a file path: a module named after the path's hash, not put in sys.modules (verl >= 0.7
    also takes ``pkg://trl_polar.integrations.verl``, a plain import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(os.path.abspath(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_verl_reward_loop_scores_each_sample_and_batches_them(polar_env, scorer, name):
    from trl_polar.integrations import verl as by_package

    verl = _load_like_verl(by_package.__file__)
    fn = getattr(verl, name)
    assert inspect.iscoroutinefunction(_verl_wrap(fn, {})) is (name == "compute_score_async")
    prompts = [[{"role": "user", "content": PROMPT}], "Say hello in French."]
    samples = [
        {
            "data_source": "chat",
            "solution_str": response,
            "ground_truth": REFERENCE if i < 4 else "Bonjour",
            "extra_info": _verl_extra_info(prompts[0] if i < 4 else prompts[1], key="question"),
        }
        for i, response in enumerate([*RESPONSES, "Bonjour !"])
    ]
    coalescer = verl._coalescer(verl._settings({"prompt_key": "question"}))
    calls_before = sum(coalescer.batches.values())
    results = asyncio.run(_naive_reward_loop(fn, samples, {"prompt_key": "question"}))
    expected = scorer.score(
        [prompts[0]] * 4 + [prompts[1]], [REFERENCE] * 4 + ["Bonjour"], _answers(samples_text(samples))
    )
    assert [r["score"] for r in results] == pytest.approx(expected, abs=1e-5)
    assert all(set(r) == {"score", "polar_failed"} and r["polar_failed"] == 0.0 for r in results)
    # The five concurrent calls were scored in fewer scorer calls than samples.
    assert 1 <= sum(coalescer.batches.values()) - calls_before < len(samples)


def samples_text(samples):
    return [s["solution_str"] for s in samples]


def test_verl_failures_follow_the_policy(polar_env, scorer, monkeypatch):
    from trl_polar.integrations import verl

    sample = {
        "data_source": "chat",
        "solution_str": "Paris.",
        "ground_truth": "",
        "extra_info": _verl_extra_info(PROMPT),
    }
    with pytest.raises(ValueError, match=r"no reward_model.ground_truth"):
        verl.compute_score(**sample)
    with pytest.raises(ValueError, match=r"no extra_info\['question'\].*prompt_key"):
        verl.compute_score(**{**sample, "ground_truth": REFERENCE}, prompt_key="question")
    monkeypatch.setenv("TRL_POLAR_ON_ERROR", "none")
    before = verl._failed[0]
    # verl's rewards tensor has no missing value: 0.0, flagged in reward_extra_info, counted.
    assert verl.compute_score(**sample) == {"score": 0.0, "polar_failed": 1.0}
    assert asyncio.run(verl.compute_score_async(**sample)) == {"score": 0.0, "polar_failed": 1.0}
    assert verl._failed[0] == before + 2
    # One bad sample among concurrent ones (a reference list with nothing in it) spares the others of its batch.
    good = {**sample, "ground_truth": REFERENCE}
    batch = [good, {**sample, "ground_truth": []}, {**good, "solution_str": "Lyon."}]
    results = asyncio.run(_naive_reward_loop(verl.compute_score_async, batch, {}))
    expected = scorer.score([PROMPT] * 2, [REFERENCE] * 2, ["Paris.", "Lyon."])
    assert [results[0]["score"], results[2]["score"]] == pytest.approx(expected, abs=1e-5)
    assert [r["polar_failed"] for r in results] == [0.0, 1.0, 0.0] and results[1]["score"] == 0.0
    monkeypatch.setenv("TRL_POLAR_ON_ERROR", "skip")
    with pytest.raises(ValueError, match="on_error"):
        verl.compute_score(**sample)


def test_verl_batch_manager_honours_prompt_key(polar_env, scorer):
    from trl_polar.integrations import verl

    scores = verl.compute_score_batch(
        data_sources=["chat", "chat"],
        solution_strs=RESPONSES[:2],
        ground_truths=[REFERENCE, REFERENCE],
        extra_infos=[{"question": PROMPT}, {"question": PROMPT}],
        prompt_key="question",
    )
    assert scores == pytest.approx(scorer.score([PROMPT] * 2, [REFERENCE] * 2, _answers(RESPONSES[:2])), abs=1e-5)


def test_verl_scores_on_the_reward_router(polar_env, scorer, server, monkeypatch):
    """With verl's own reward-model servers (reward_router_address) and an engine backend, the samples go there."""
    from trl_polar.integrations import verl

    monkeypatch.setenv("TRL_POLAR_BACKEND", "lmdeploy")  # the engine shape this server answers on /pooling
    router = server.url.removeprefix("http://")
    sample = {"data_source": "chat", "solution_str": RESPONSES[0], "ground_truth": REFERENCE}
    result = verl.compute_score(**sample, extra_info=_verl_extra_info(PROMPT), reward_router_address=router)
    assert result["score"] == pytest.approx(scorer.score([PROMPT], [REFERENCE], _answers(RESPONSES[:1]))[0], abs=1e-4)
    requests = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/pooling"' in requests


def test_verl_reward_loop_on_trl_polar_serve(polar_env, scorer, server, monkeypatch):
    """With TRL_POLAR_URL the concurrent samples go to the server, in fewer requests than samples."""
    from trl_polar.integrations import verl

    monkeypatch.setenv("TRL_POLAR_URL", server.url)
    samples = [
        {"data_source": "chat", "solution_str": r, "ground_truth": REFERENCE, "extra_info": _verl_extra_info(PROMPT)}
        for r in RESPONSES
    ]

    def score_requests():
        text = httpx.get(server.url + "/metrics").text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('polar_requests_total{endpoint="/score"')
        )

    before = score_requests()
    results = asyncio.run(_naive_reward_loop(verl.compute_score_async, samples, {}))
    expected = scorer.score([PROMPT] * 4, [REFERENCE] * 4, _answers(RESPONSES))
    assert [r["score"] for r in results] == pytest.approx(expected, abs=1e-4)
    assert 1 <= score_requests() - before < len(samples)


# -------------------------------------------------------------------------------------------------------- OpenRLHF
def _openrlhf_rollout(tokenizer, prompt, response, max_prompt_tokens=None):
    """What OpenRLHF 0.11's executor builds: the prompt's ids (its last ones when too long) + the response's ids and
    EOS, decoded with special tokens kept."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None:
        prompt_ids = prompt_ids[-max_prompt_tokens:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)


def test_openrlhf_http_and_file_give_the_same_rewards(polar_env, scorer, server):
    from trl_polar.integrations import openrlhf

    tokenizer = scorer.template.tokenizer
    rollouts = []
    for i, response in enumerate(RESPONSES):
        cut = 12 if i % 2 else None  # every other prompt was cut from the front
        rollouts.append((_openrlhf_rollout(tokenizer, PROMPT, response, cut), PROMPT, REFERENCE))
    assert not rollouts[1][0].startswith(PROMPT[:20]) and PROMPT not in rollouts[1][0]

    async def over_http():
        async with httpx.AsyncClient(timeout=60) as http:
            calls = [
                http.post(server.url + "/get_reward", json={"query": [q], "prompts": [p], "labels": [label]})
                for q, p, label in rollouts
            ]
            return [r.json() for r in await asyncio.gather(*calls)]

    http_results = asyncio.run(over_http())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # OpenRLHF runs the file in threads
        file_results = list(pool.map(lambda r: openrlhf.reward_func([r[0]], [r[1]], [r[2]]), rollouts))

    # The cut prompts are scored against the full prompt, with the response after the kept tail (OpenRLHF's
    # decoded text, trimmed of the space the tokenizer put at the join), think removed.
    expected = scorer.score([PROMPT] * 4, [REFERENCE] * 4, [a.strip() for a in _answers(RESPONSES)])
    http_rewards = [r["rewards"][0] for r in http_results]
    file_rewards = [r["rewards"].item() for r in file_results]
    assert http_rewards == pytest.approx(expected, abs=1e-5)
    assert file_rewards == pytest.approx(http_rewards, abs=1e-5)
    assert all(r["scores"] == r["rewards"] and r["extra_logs"] == {"polar_failed": [0.0]} for r in http_results)
    assert all(torch.equal(r["extra_logs"]["polar_failed"], torch.tensor([0.0])) for r in file_results)


def test_openrlhf_failures_reach_the_user(polar_env, server, caplog, monkeypatch):
    """A rollout that cannot be read gets the same finite fallback reward and polar_failed=1 over HTTP and from the
    reward file (OpenRLHF stops on a missing reward), with the cause in `errors` and in the log."""
    from trl_polar.integrations import openrlhf

    bad = [
        ("Question: 2 + 2? Answer: 4</s>", "Question: 2 + 2? Answer:", "", "labels[0]", "is empty"),
        (
            "something else entirely, nothing of the prompt",
            "Question: 2 + 2? Answer:",
            "4",
            "query[0]",
            "does not hold",
        ),
    ]
    for query, prompt, label, field, says in bad:
        response = httpx.post(
            server.url + "/get_reward", json={"query": [query], "prompts": [prompt], "labels": [label]}
        )
        assert response.status_code == 200, response.text  # OpenRLHF drops the body of anything else
        body = response.json()
        assert body["rewards"] == [-10.0] and body["scores"] == [-10.0]  # TRL_POLAR_FAILURE_REWARD's default
        assert body["extra_logs"] == {"polar_failed": [1.0]}
        (error,) = body["errors"]
        assert error["index"] == 0 and error["field"] == field and says in error["message"]
        # The reward file: the same outcome, the message in the log (on_error defaults to "none" for OpenRLHF).
        with caplog.at_level("WARNING"):
            result = openrlhf.reward_func([query], [prompt], [label])
        assert result["rewards"].tolist() == body["rewards"] and result["scores"].tolist() == body["scores"]
        assert result["extra_logs"]["polar_failed"].tolist() == [1.0]
        assert says in caplog.text
    # Several rollouts in one request: the good one is scored, the bad one gets the fallback and is counted.
    mixed = {"query": [bad[0][0], bad[0][0]], "prompts": [bad[0][1]] * 2, "labels": ["4", ""]}
    body = httpx.post(server.url + "/get_reward", json=mixed).json()
    assert body["rewards"][0] != -10.0 and body["rewards"][1] == -10.0
    assert body["extra_logs"] == {"polar_failed": [0.0, 1.0]} and body["errors"][0]["index"] == 1
    file = openrlhf.reward_func(mixed["query"], mixed["prompts"], mixed["labels"])
    assert file["rewards"].tolist() == pytest.approx(body["rewards"], abs=1e-5)
    # The fallback is the user's to set.
    monkeypatch.setenv("TRL_POLAR_FAILURE_REWARD", "-3.5")
    assert openrlhf.reward_func(*[[x] for x in bad[0][:3]])["rewards"].tolist() == [-3.5]
    monkeypatch.setenv("TRL_POLAR_FAILURE_REWARD", "nan")
    with pytest.raises(ValueError, match="TRL_POLAR_FAILURE_REWARD"):
        openrlhf.reward_func(*[[x] for x in bad[0][:3]])


def test_openrlhf_file_raises_when_asked(polar_env, monkeypatch):
    from trl_polar.integrations import openrlhf

    monkeypatch.setenv("TRL_POLAR_ON_ERROR", "raise")
    with pytest.raises(ItemFailure, match=r"query\[0\].*does not hold") as info:
        openrlhf.reward_func(["unrelated text"], ["Question: 2 + 2? Answer:"], ["4"])
    assert info.value.field == "query[0]"
    with pytest.raises(ItemFailure, match=r"labels\[0\] is empty") as info:
        openrlhf.reward_func(["Question: 2 + 2? Answer: 4"], ["Question: 2 + 2? Answer:"], [""])
    assert info.value.field == "labels[0]"


def test_response_after_a_front_cut_prompt():
    from trl_polar.integrations.openrlhf import response_from_query

    prompt = "<|im_start|>user\nA long question about many things, ending here<|im_end|>\n<|im_start|>assistant\n"
    tail = prompt[30:]
    assert response_from_query(tail + "The answer.<|im_end|>", prompt) == "The answer."
    # A start token before the kept tail, and the response repeating the prompt's last words: the latest end wins.
    query = "<s>" + tail + "assistant\n is what I am.<|im_end|>"
    assert response_from_query(query, prompt) == "assistant\n is what I am."
    # A cut inside a multi-byte character decodes to a replacement character before the kept tail.
    assert response_from_query("\ufffd" + prompt[31:] + "Oui.</s>", prompt) == "Oui."
    with pytest.raises(ValueError, match="does not hold its prompt"):
        response_from_query("no overlap at all with it", prompt)


# ------------------------------------------------------------------------------------------------------------- TRL
class _Flaky:
    """A scorer that fails for one candidate text, and sleeps for another."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, prompts, references, candidates, wrapper="sft"):
        if "boom" in candidates:
            raise RuntimeError("model exploded")
        if "slow" in candidates:
            import time

            time.sleep(1.0)
        return self.inner.score(prompts, references, candidates)


def test_trl_reward_failure_policy(scorer):
    from trl_polar.rewards import PolarReward

    metrics = {}
    reward = PolarReward(_Flaky(scorer), on_error="none", score_timeout=0.5)
    out = reward(
        prompts=["p", "p"], completions=["fine", "boom"], reference=["r", "r"], log_metric=metrics.__setitem__
    )
    assert out == [None, None]  # the scorer failed the whole call: no row gets a made-up value
    assert metrics["polar_reward/failed_frac"] == 1.0
    out = reward(prompts=["p", "p"], completions=["slow", "x"], reference=["r", ""], log_metric=metrics.__setitem__)
    assert out == [None, None] and metrics["polar_reward/failed_frac"] == 0.5  # a timeout; and a missing reference
    assert metrics["polar_reward/missing_reference_frac"] == 0.5
    out = reward(prompts=["p"], completions=[{"bad": 1}], reference=["r"], log_metric=metrics.__setitem__)
    assert out == [None] and metrics["polar_reward/failed_frac"] == 1.0
    # A row the scorer itself refuses (a reference it cannot read) fails alone; the others are scored.
    out = PolarReward(scorer, on_error="none")(
        prompts=["What is 2 + 2?"] * 2,
        completions=["4", "4"],
        reference=["4", {"oops": 1}],
        log_metric=metrics.__setitem__,
    )
    assert out[0] == pytest.approx(scorer.score(["What is 2 + 2?"], ["4"], ["4"])[0], abs=1e-5) and out[1] is None
    assert metrics["polar_reward/failed_frac"] == 0.5
    strict = PolarReward(_Flaky(scorer), score_timeout=0.5)
    with pytest.raises(TimeoutError, match="score_timeout=0.5"):
        strict(prompts=["p"], completions=["slow"], reference=["r"])
    with pytest.raises(RuntimeError, match="model exploded"):
        strict(prompts=["p"], completions=["boom"], reference=["r"])


def test_trl_reward_defaults_strip_think_and_warns_on_cpu(tiny_qwen2_rm_dir, scorer, monkeypatch):
    import trl_polar.rewards as rewards

    assert rewards.PolarReward(scorer).strip_think is True
    monkeypatch.setattr(rewards, "_warned_cpu", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=r"score on CPU.*trl-polar serve.*url="):
        loaded = [rewards.PolarReward(tiny_qwen2_rm_dir).scorer]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded.append(rewards.PolarReward(tiny_qwen2_rm_dir).scorer)  # once per process
        loaded.append(rewards.PolarReward(tiny_qwen2_rm_dir, device="cpu").scorer)
    assert all(isinstance(s, PolarScorer) for s in loaded)


def test_client_failure_policy(scorer):
    from serving_helpers import free_port

    from trl_polar.serving.client import PolarClient, PolarClientError

    nowhere = f"http://127.0.0.1:{free_port()}"
    client = PolarClient(url=nowhere, max_retries=1, backoff=0.01, on_error="none")
    assert client.score(["p", "p"], ["r", "r"], ["a", "b"]) == [None, None]
    assert client.stats["failed_items"] == 2
    with pytest.raises(PolarClientError):
        PolarClient(url=nowhere, max_retries=0).score(["p"], ["r"], ["a"])
    with pytest.raises(ValueError, match="on_error"):
        PolarClient(url=nowhere, on_error="ignore")
    json.dumps(client.stats)


def test_score_timeout_on_a_slow_server():
    """A server slower than score_timeout: the items fail by the policy, on the sync and the async paths."""
    from fastapi import FastAPI
    from serving_helpers import ThreadServer

    from trl_polar.failures import ScoreTimeout
    from trl_polar.rewards import AsyncPolarReward
    from trl_polar.serving.client import PolarClient

    app = FastAPI()

    @app.post("/score")
    async def score(body: dict):
        await asyncio.sleep(1.5)
        return {"scores": [0.0] * len(body["items"])}

    with ThreadServer(app) as server:
        client = PolarClient(url=server.url, max_retries=0, score_timeout=0.3, on_error="none")
        assert client.score(["p"], ["r"], ["a"]) == [None] and client.stats["failed_items"] == 1
        with pytest.raises(ScoreTimeout, match="score_timeout=0.3"):
            PolarClient(url=server.url, max_retries=0, score_timeout=0.3).score(["p"], ["r"], ["a"])
        metrics = {}
        reward = AsyncPolarReward(url=server.url, on_error="none", score_timeout=0.3)
        out = asyncio.run(reward(prompts=["p"], completions=["a"], reference=["r"], log_metric=metrics.__setitem__))
        assert out == [None] and metrics["polar_reward/failed_frac"] == 1.0
        client.close()
