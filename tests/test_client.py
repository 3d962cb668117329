"""PolarClient against real servers on 127.0.0.1: our server (subprocesses) and stand-ins for vLLM, SGLang, lmdeploy.

The stand-ins are small FastAPI apps in this process that answer exactly as each engine's server source writes its
response (commits in `engine_standin`) and score with the same tiny model. They test the client's request and
response handling for those shapes, never the engines themselves (those need a GPU); tests/test_engine_shapes.py
runs the engine backends against `trl-polar serve`'s engine shapes.
"""

import asyncio
import os
import pickle
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from serving_helpers import API_KEY, ThreadServer, free_port, start_servers  # noqa: E402

from trl_polar.rewards import PolarReward  # noqa: E402
from trl_polar.scorer import PolarScorer  # noqa: E402
from trl_polar.serving.client import PolarClient, PolarClientError  # noqa: E402

TOL = 1e-5
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number above five."}]


def make_items(n_groups: int, per_group: int):
    prompts, references, candidates = [], [], []
    for k in range(n_groups):
        prompt = MESSAGES if k == 0 else f"Question {k}: what is {k} + {k}? Explain the steps briefly."
        reference = "7" if k == 0 else f"{k} + {k} = {2 * k}."
        for j in range(per_group):
            prompts.append(prompt)
            references.append(reference)
            candidates.append(f"answer {j}: {2 * k + j % 2}")
    return prompts, references, candidates


def assert_close(got, expected):
    assert isinstance(got, list) and len(got) == len(expected)
    assert all(isinstance(g, float) for g in got)
    for g, e in zip(got, expected):
        assert abs(g - e) <= TOL, (got, expected)


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


@pytest.fixture(scope="module")
def replicas(tiny_qwen2_rm_dir):
    """Two `trl-polar serve` replicas with the same key; tests may kill the second one."""
    servers = start_servers(*[(tiny_qwen2_rm_dir, ("--api-key", API_KEY))] * 2)
    yield servers
    for server in servers:
        server.stop()


def test_client_matches_inprocess_scorer(replicas, scorer):
    prompts, references, candidates = make_items(4, 10)
    expected = scorer.score(prompts, references, candidates)
    client = PolarClient(url=replicas[0].url, api_key=API_KEY, chunk_size=7, max_concurrency=3)
    try:
        assert_close(client.score(prompts, references, candidates), expected)
        assert client.stats["requests"] == 6  # 40 items in chunks of 7
        assert_close(
            client.score(prompts[:5], references[:5], candidates[:5], wrapper="pretrain"),
            scorer.score(prompts[:5], references[:5], candidates[:5], wrapper="pretrain"),
        )
        assert client.score([], [], []) == []
        # One wrapper per item, as the Scorer protocol allows (`trl-polar score` passes a file's per-row wrappers).
        mixed = ["sft", "pretrain", "pretrain", "sft", "pretrain"]
        assert_close(
            client.score(prompts[:5], references[:5], candidates[:5], wrapper=mixed),
            scorer.score(prompts[:5], references[:5], candidates[:5], wrapper=mixed),
        )

        async def inside_a_running_loop():
            # TRL may call reward functions from async code: ascore awaits, and even the sync call works here.
            first = await client.ascore(prompts[:3], references[:3], candidates[:3])
            second = client.score(prompts[3:6], references[3:6], candidates[3:6])
            return first + second

        assert_close(asyncio.run(inside_a_running_loop()), expected[:6])
        # The client travels to other processes as its settings (PolarReward pickles its scorer).
        copy = pickle.loads(pickle.dumps(client))
        assert_close(copy.score(prompts[:4], references[:4], candidates[:4]), expected[:4])
        copy.close()
        # PolarReward takes the client as its scorer: TRL's keyword call, reference from the dataset column.
        reward = PolarReward(client)
        rewards = reward(prompts=prompts[:4], completions=candidates[:4], reference=references[:4])
        assert_close(rewards, expected[:4])
    finally:
        client.close()


def test_failover_when_a_replica_dies_mid_run(replicas, scorer):
    """Replica 2 is killed (SIGKILL) while the client is spreading chunks over both: every item still gets exactly
    one score, the right one, from the surviving replica."""
    survivor, victim = replicas
    prompts, references, candidates = make_items(6, 100)
    expected = scorer.score(prompts, references, candidates)
    client = PolarClient(
        urls=[survivor.url, victim.url], api_key=API_KEY, chunk_size=2, max_concurrency=4, backoff=0.05, cooldown=60
    )
    result: dict = {}

    def run():
        try:
            result["scores"] = client.score(prompts, references, candidates)
        except Exception as err:  # reported by the assertions below
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while client.stats["requests"] < 40 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    victim.stop(signal.SIGKILL)
    thread.join(timeout=120)
    client.close()
    assert not thread.is_alive(), "the client hung"
    assert "error" not in result, result.get("error")
    assert_close(result["scores"], expected)
    assert client.stats["failovers"] >= 1, client.stats
    assert victim.proc.returncode == -signal.SIGKILL


def test_unreachable_servers_raise_a_named_error_in_bounded_time():
    urls = [f"http://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    client = PolarClient(urls=urls, max_retries=3, backoff=0.05, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(PolarClientError) as info:
        client.score(["p"], ["r"], ["c"])
    client.close()
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "4 attempts" in message and "ConnectError" in message
    assert all(u.split("//")[-1] in message for u in urls)
    assert set(info.value.servers) == {"http://" + u.split("//")[-1] + "/score" for u in urls}


def test_refusals_are_not_retried(replicas):
    client = PolarClient(url=replicas[0].url, api_key="wrong-key", max_retries=5, backoff=0.05)
    with pytest.raises(PolarClientError) as info:
        client.score(["p"], ["r"], ["c"])
    client.close()
    assert info.value.status == 401
    assert client.stats["requests"] == 1
    assert "API key" in str(info.value) and replicas[0].url in str(info.value)


# ---------------------------------------------------------------------------------------------------- stand-ins
def engine_standin(kind: str, scorer: PolarScorer, seen: list) -> FastAPI:
    """Answers like `kind`'s server, envelope for envelope: tokenizes the texts as the engine would (BOS added) and
    scores with the tiny model. The shapes, as the engines' own servers write them:

    - vLLM 020638a6 (vllm/entrypoints/pooling/pooling/): ``id`` "pooling-<uuid>", ``data[i].data`` one row per prompt
      token (InternLM2's reward model pools every token), the score in the last row; ``usage`` with
      ``prompt_tokens_details`` null;
    - lmdeploy 1263d5cd (lmdeploy/serve/openai/endpoints/auxiliary.py): ``id`` "pool-<id>", ``data[i].data`` the
      score, ``usage`` from ``UsageInfo.build`` (``prompt_tokens_details`` {"cached_tokens": 0});
    - SGLang (http_server.py /classify, the tokenizer manager's embedding output): a list of ``{"embedding",
      "meta_info"}``, no ``index``.
    """
    app = FastAPI()
    lock = threading.Lock()

    def scores_for(texts):
        tokenizer = scorer.template.tokenizer
        ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
        with lock:
            return scorer.score_ids(ids), [len(x) for x in ids]

    @app.post("/pooling")
    async def pooling(request: Request):
        body = await request.json()
        seen.append(body)
        values, lengths = scores_for(body["input"])
        tokens = sum(lengths)
        if kind == "lmdeploy":
            data = [{"index": i, "object": "pooling", "data": v} for i, v in enumerate(values)]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                     "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": None}  # fmt: skip
            return {"id": "pool-8kGcN2", "object": "list", "created": 1700000000, "model": body.get("model", "m"),
                    "data": data, "usage": usage}  # fmt: skip
        # One row per token; the rows before the reward token hold the head's (meaningless) values there.
        data = [
            {"index": i, "object": "pooling", "data": [[-50.0 - j] for j in range(n - 1)] + [[v]]}
            for i, (v, n) in enumerate(zip(values, lengths))
        ]
        usage = {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        return {"id": "pooling-5f1d", "object": "list", "created": 1700000000, "model": "POLAR-7B", "data": data,
                "usage": usage}  # fmt: skip

    @app.post("/classify")
    async def classify(request: Request):
        body = await request.json()
        seen.append(body)
        values, lengths = scores_for(body["text"])
        meta = [{"id": f"{i:032x}", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": n,
                 "weight_version": "default", "e2e_latency": 0.01} for i, n in enumerate(lengths)]  # fmt: skip
        return [{"embedding": [v], "meta_info": m} for v, m in zip(values, meta)]

    return app


@pytest.fixture(scope="module")
def standin_scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")  # its own copy: the stand-ins score on their thread


@pytest.mark.parametrize("backend", ["vllm", "sglang", "lmdeploy"])
def test_engine_formats_against_standins(backend, scorer, standin_scorer, tiny_qwen2_rm_dir):
    prompts, references, candidates = make_items(2, 4)
    expected = scorer.score(prompts, references, candidates)
    seen: list = []
    with ThreadServer(engine_standin(backend, standin_scorer, seen)) as server:
        client = PolarClient(url=server.url, backend=backend, template=tiny_qwen2_rm_dir, chunk_size=3)
        scores = client.score(prompts, references, candidates)
        client.close()
    assert_close(scores, expected)
    assert len(seen) == 3
    texts = [t for body in seen for t in body["text" if backend == "sglang" else "input"]]
    # Chunks are sent concurrently, so they may arrive in any order.
    assert sorted(texts) == sorted(scorer.template.format(p, r, c) for p, r, c in zip(prompts, references, candidates))
    if backend == "sglang":
        assert all(body["model"] == os.path.basename(tiny_qwen2_rm_dir) for body in seen)


def test_engine_backends_need_the_template():
    with pytest.raises(ValueError, match="template"):
        PolarClient(url="http://127.0.0.1:1", backend="vllm")
    with pytest.raises(ValueError, match="backend"):
        PolarClient(url="http://127.0.0.1:1", backend="triton")


def faulty_server(state: dict) -> FastAPI:
    """A /score server that misbehaves in the way ``state["mode"]`` says."""
    app = FastAPI()

    @app.post("/score")
    async def score(request: Request):
        body = await request.json()
        n = len(body["items"])
        state["calls"] = state.get("calls", 0) + 1
        mode = state["mode"]
        if mode == "short":
            return {"scores": [0.5] * (n - 1)}
        if mode == "null":
            return {"scores": [None] * n}
        if mode == "not-json":
            return JSONResponse({"oops": True}, status_code=200, media_type="text/html")
        if mode == "busy-then-ok" and state["calls"] <= 2:
            return JSONResponse({"error": {"message": "queue full"}}, status_code=503, headers={"Retry-After": "0"})
        if mode == "slow":
            await asyncio.sleep(1)
        return {"scores": [1.0] * n}

    return app


@pytest.mark.parametrize(
    ("mode", "match"),
    [("short", "2 scores for 3 inputs"), ("null", "not a number"), ("not-json", "no `scores` list")],
)
def test_wrong_answers_raise_instead_of_returning_none(mode, match):
    state = {"mode": mode}
    with ThreadServer(faulty_server(state)) as server:
        client = PolarClient(url=server.url, max_retries=2, backoff=0.01)
        with pytest.raises(PolarClientError, match=match) as info:
            client.score(["p"] * 3, ["r"] * 3, ["a", "b", "c"])
        client.close()
    assert server.url in str(info.value)


def test_busy_server_is_retried_and_slow_server_times_out():
    state = {"mode": "busy-then-ok"}
    with ThreadServer(faulty_server(state)) as server:
        client = PolarClient(url=server.url, max_retries=3, backoff=0.01)
        assert client.score(["p"] * 2, ["r"] * 2, ["a", "b"]) == [1.0, 1.0]
        assert client.stats["retries"] == 2
        state["mode"] = "slow"
        slow = PolarClient(url=server.url, timeout=0.2, max_retries=1, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(PolarClientError, match="timed out"):
            slow.score(["p"], ["r"], ["a"])
        assert time.monotonic() - started < 2
        client.close()
        slow.close()


def test_polar_reward_scores_remotely_by_url(replicas, scorer):
    """PolarReward(urls=...) and its async variant, called the way TRL 1.16 calls reward functions."""
    from trl_polar.rewards import AsyncPolarReward

    prompts, references, candidates = make_items(2, 4)
    expected = scorer.score(prompts, references, candidates)
    urls = [server.url for server in replicas[:1]]
    reward = PolarReward(urls=urls, api_key=API_KEY, baseline=True)
    baselines = scorer.score(prompts, references, [r if isinstance(r, str) else "7" for r in references])
    got = reward(prompts=prompts, completions=candidates, reference=references)
    assert_close(got, [e - b for e, b in zip(expected, baselines)])
    async_reward = AsyncPolarReward(url=urls[0], api_key=API_KEY)
    assert asyncio.iscoroutinefunction(type(async_reward).__call__)
    logged = {}
    got = asyncio.run(
        async_reward(prompts=prompts, completions=candidates, reference=references, log_metric=logged.__setitem__)
    )
    assert_close(got, expected)
    assert logged and all(isinstance(v, float) for v in logged.values())
    with pytest.raises(ValueError, match="either a model"):
        PolarReward("some/model", url=urls[0])


def test_ppo_adapters_score_through_a_server(replicas, scorer, monkeypatch):
    """verl's batch reward function with TRL_POLAR_URL set: scores come from the server, equal to in-process."""
    import numpy as np

    from trl_polar.integrations import verl

    monkeypatch.setenv("TRL_POLAR_URL", ",".join(server.url for server in replicas[:1]))
    monkeypatch.setenv("TRL_POLAR_API_KEY", API_KEY)
    monkeypatch.delenv("TRL_POLAR_MODEL", raising=False)
    prompts = ["What is 2 + 2?", "Name a colour."]
    answers, truths = ["It is 4.", "Blue."], ["4", "Red"]
    extra = np.array([{"prompt": p} for p in prompts], dtype=object)
    got = verl.compute_score_batch(
        data_sources=np.array(["demo", "demo"], dtype=object), solution_strs=np.array(answers, dtype=object),
        ground_truths=np.array(truths, dtype=object), extra_infos=extra,
    )  # fmt: skip
    assert_close([float(x) for x in got], scorer.score(prompts, truths, answers))
