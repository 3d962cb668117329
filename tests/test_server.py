"""The reward server, run as a real subprocess on 127.0.0.1 and driven over real HTTP.

Scores from every endpoint must equal in-process `PolarScorer` scores for the same items; the server must answer
every request exactly once under load, refuse bad requests with the right status and a message naming the field,
shed load with 503 when its queue is full, and finish admitted requests when asked to shut down.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving_helpers import API_KEY, HOST, RawHTTP, start_servers  # noqa: E402

from trl_polar.batching import BatcherClosed, WindowBatcher  # noqa: E402
from trl_polar.scorer import PolarScorer  # noqa: E402
from trl_polar.serving.service import Job, score_jobs  # noqa: E402
from trl_polar.template import PolarTemplate, flatten  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_LIMIT = 256 * 1024
TOL = 1e-5

PROMPTS = [
    "What is 2 + 2? Explain the answer step by step so that a child can follow it.",
    "Translate to French: good morning, my friend. Keep the greeting informal.",
    [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Name a prime number larger than five."},
    ],
]
REFERENCES = ["The answer is 4: two plus two makes four.", "Bonjour, mon ami.", "7 is a prime larger than five."]
CANDIDATES = [
    ["4", "The answer is 4.", "five", "2 + 2 = 4 because adding two twice gives four."],
    ["Bonjour mon ami !", "Good morning", "Salut, l'ami.", "bonjour"],
    ["7", "11 is prime.", "9", "The number 13."],
]


def triples():
    out = []
    for p, r, cands in zip(PROMPTS, REFERENCES, CANDIDATES):
        out += [(p, r, c) for c in cands]
    return out


@pytest.fixture(scope="module")
def servers(tiny_qwen2_rm_dir):
    """The main server (API key, a small body limit) and a server with a queue of 2, a long batch window and a short
    body timeout."""
    main, small = start_servers(
        (tiny_qwen2_rm_dir, ("--api-key", API_KEY, "--max-body-bytes", str(BODY_LIMIT))),
        (
            tiny_qwen2_rm_dir,
            ("--max-queue", "2", "--batch-window-ms", "400", "--max-tokens-per-batch", "65536", "--body-timeout", "4"),
        ),
    )
    yield {"main": main, "small": small}
    main.stop()
    small.stop()


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def assert_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert abs(g - e) <= TOL, (got, expected)


def test_every_endpoint_matches_inprocess_scorer(servers, scorer):
    url = servers["main"].url
    items = triples()
    prompts, refs, cands = zip(*items)
    expected = scorer.score(list(prompts), list(refs), list(cands))
    template = scorer.template
    texts = [template.format(p, r, c) for p, r, c in items]
    # OpenRLHF sends prompt + response decoded with special tokens; the label is the reference.
    plain = [flatten(p) for p in prompts]
    queries = [f"<s>{p} {c}</s>" for p, c in zip(plain, cands)]
    expected_openrlhf = scorer.score(plain, list(refs), [c.strip() for c in cands])

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as http:
            whole = http.post(
                url + "/score", json={"items": [dict(zip(("prompt", "reference", "candidate"), t)) for t in items]}
            )
            # One request per item, all at once: the server batches them together (prefixes shared across requests).
            single = [
                http.post(url + "/score", json={"id": i, "items": [{"prompt": p, "reference": r, "output": c}]})
                for i, (p, r, c) in enumerate(items)
            ]
            pooling = http.post(url + "/pooling", json={"model": "polar", "input": texts})
            openrlhf = http.post(url + "/get_reward", json={"query": queries, "prompts": plain, "labels": list(refs)})
            classify = http.post(url + "/classify", json={"model": "polar", "text": texts})  # SGLang's shape
            return await asyncio.gather(whole, pooling, openrlhf, classify, *single)

    before = metrics(url)
    whole, pooling, openrlhf, classify, *single = asyncio.run(run())
    after = metrics(url)

    assert whole.status_code == 200, whole.text
    assert whole.json()["truncated"] == 0
    assert_close(whole.json()["scores"], expected)
    for i, response in enumerate(single):
        assert response.status_code == 200, response.text
        assert response.json()["id"] == i
        assert_close(response.json()["scores"], [expected[i]])
    assert pooling.status_code == 200, pooling.text
    body = pooling.json()
    assert body["object"] == "list" and body["model"] == "polar"
    assert [d["index"] for d in body["data"]] == list(range(len(items)))
    assert_close([d["data"] for d in body["data"]], expected)
    assert body["usage"]["prompt_tokens"] == sum(len(template.encode(*t)) for t in items)
    assert openrlhf.status_code == 200, openrlhf.text
    assert_close(openrlhf.json()["rewards"], expected_openrlhf)
    assert openrlhf.json()["scores"] == openrlhf.json()["rewards"]
    assert classify.status_code == 200, classify.text
    assert_close([r["embedding"][0] for r in classify.json()], expected)

    requests = len(single) + 4
    batches = after["polar_batches_total"] - before["polar_batches_total"]
    assert (
        after['polar_requests_total{endpoint="/score",status="200"}']
        - before.get('polar_requests_total{endpoint="/score",status="200"}', 0)
        == len(single) + 1
    )
    # Dynamic batching: concurrent requests were scored together, in fewer scorer calls than requests.
    assert batches < requests
    alone = 'polar_batch_requests_bucket{le="1.0"}'
    assert after[alone] - before.get(alone, 0) < batches


def test_score_options_and_wrappers_follow_the_template(servers, scorer):
    url = servers["main"].url
    long_candidate = "two plus two is four, and that is all there is to say about it " * 3
    items = [
        {"prompt": PROMPTS[0], "reference": REFERENCES[0], "candidate": long_candidate},
        {"prompt": PROMPTS[0], "reference": REFERENCES[0], "candidate": "4", "wrapper": "pretrain"},
    ]
    response = httpx.post(url + "/score", headers=AUTH, json={"items": items, "options": {"max_response_length": 8}})
    assert response.status_code == 200, response.text
    variant = PolarTemplate(scorer.template.tokenizer, **{**scorer.template.to_dict(), "max_response_length": 8})
    ids = [variant.encode(i["prompt"], i["reference"], i["candidate"], i.get("wrapper", "sft")) for i in items]
    assert_close(response.json()["scores"], scorer.score_ids(ids))
    assert response.json()["truncated"] == 2  # the reference and the long candidate lost tokens


def test_load_2000_requests_from_32_clients(servers, scorer):
    """Every request answered exactly once, matched to its request by id and by its scores."""
    url = servers["main"].url
    pool = [(PROMPTS[k], REFERENCES[k]) for k in range(3)] + [("Say hello in Portuguese, politely.", "Olá!")]
    items = [(p, r, f"candidate {j} for prompt {k}") for k, (p, r) in enumerate(pool) for j in range(16)]
    expected = scorer.score(*map(list, zip(*items)))
    rng = random.Random(0)
    n_requests, n_clients = 2000, 32
    requests = [(rid, [rng.randrange(len(items)) for _ in range(rng.randint(1, 3))]) for rid in range(n_requests)]
    answers: dict[int, list] = {}
    before = metrics(url)

    async def run():
        todo = iter(requests)

        async def client():
            # RawHTTP, not httpx: on 2 shared cores httpx's per-request CPU would starve the server under test.
            http = RawHTTP(HOST, servers["main"].port, AUTH)
            for rid, chosen in todo:
                body = {
                    "id": rid,
                    "items": [dict(zip(("prompt", "reference", "candidate"), items[i])) for i in chosen],
                }
                status, payload = await http.post("/score", json.dumps(body).encode())
                assert status == 200, payload
                answer = json.loads(payload)
                answers.setdefault(answer["id"], []).append((chosen, answer["scores"]))
            await http.close()

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(n_clients))), timeout=120)

    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    after = metrics(url)

    assert sorted(answers) == list(range(n_requests)), "lost or unknown request ids"
    for rid, chosen in requests:
        assert len(answers[rid]) == 1, f"request {rid} answered {len(answers[rid])} times"
        got_chosen, scores = answers[rid][0]
        assert got_chosen == chosen
        assert_close(scores, [expected[i] for i in chosen])
    key = 'polar_requests_total{endpoint="/score",status="200"}'
    assert after[key] - before[key] == n_requests  # the server saw each request once: no duplicates
    batches = after["polar_batches_total"] - before["polar_batches_total"]
    assert batches < n_requests
    print(f"\n{n_requests} requests from {n_clients} clients in {elapsed:.1f} s, {batches:.0f} batches")


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/score", b'{"items": [', 400, "body"),
        ("/score", b"\xff\xfe not utf-8", 400, "body"),
        ("/score", b"[" * 50000 + b"]" * 50000, 400, "body"),
        ("/score", b"", 400, None),
        ("/score", b'["items"]', 422, "body"),
        ("/score", b'{"itemz": []}', 422, "itemz"),
        ("/score", b'{"items": {"prompt": "p"}}', 422, "items"),
        ("/score", b'{"items": [{"prompt": "p", "reference": "r"}]}', 422, "items[0].candidate"),
        ("/score", b'{"items": [{"prompt": "p", "reference": "r", "candidate": "c"}, 5]}', 422, "items[1]"),
        ("/score", b'{"items": [{"prompt": "p", "reference": 3, "candidate": "c"}]}', 422, "items[0].reference"),
        ("/score", b'{"items": [{"prompt": [{"role": "user"}], "reference": "r", "candidate": "c"}]}', 422,
         "items[0].prompt"),
        ("/score", b'{"items": [{"prompt": "p", "reference": "r", "candidate": "c", "wrapper": "chat"}]}', 422,
         "items[0].wrapper"),
        ("/score", b'{"items": [], "options": {"temperature": 1}}', 422, "options.temperature"),
        ("/score", b'{"items": [], "options": {"max_length": -3}}', 422, "options.max_length"),
        ("/score", b'{"items": [{"prompt": "p", "reference": "r", "candidate": "c"}], "options": {"max_length": 5}}',
         422, "items[0]"),
        ("/pooling", b'{"inputs": ["x"]}', 422, "input"),
        ("/pooling", b'{"input": [3.5]}', 422, "input[0]"),
        ("/pooling", b'{"input": ["no reward token here"]}', 422, "input[0]"),
        ("/pooling", b'{"input": [[1, 2, 99999999]]}', 422, "input[0]"),
        ("/classify", b'{"text": "one text"}', 422, "text"),
        ("/classify", b'{"text": ["no reward token here"]}', 422, "text[0]"),
        ("/get_reward", b'{"query": ["q"], "prompts": ["q"]}', 422, "labels"),
        ("/get_reward", b'{"query": ["q a"], "prompts": ["q", "r"], "labels": ["l"]}', 422, "labels"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_naming_the_field(servers, path, body, status, field):
    url = servers["main"].url
    response = httpx.post(url + path, headers={**AUTH, "Content-Type": "application/json"}, content=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if field is not None:
        assert error["field"] == field, error
    # The server is still up and still right.
    ok = httpx.post(
        url + "/score", headers=AUTH, json={"items": [{"prompt": "p", "reference": "r", "candidate": "c"}]}
    )
    assert ok.status_code == 200


def test_wrong_method_and_unknown_path(servers):
    url = servers["main"].url
    wrong_method = httpx.get(url + "/score", headers=AUTH)
    assert wrong_method.status_code == 405
    unknown = httpx.post(url + "/nothing", headers=AUTH, json={})
    assert unknown.status_code == 404
    # Both in the documented error envelope, saying what to do instead.
    assert wrong_method.json()["error"]["code"] == 405 and "POST" in wrong_method.json()["error"]["message"]
    assert wrong_method.headers["allow"] == "POST"
    assert unknown.json()["error"] == {
        "message": unknown.json()["error"]["message"], "type": "not_found", "code": 404,
    }  # fmt: skip
    assert "/score" in unknown.json()["error"]["message"] and "/nothing" in unknown.json()["error"]["message"]


ITEM = b'{"prompt": "p", "reference": "r", "candidate": "c"}'


@pytest.mark.parametrize(
    ("body", "status", "field", "says"),
    [
        (b'{"items": [{"prompt": "\\ud800", "reference": "r", "candidate": "c"}]}', 422, "items[0].prompt",
         "surrogate"),
        (b'{"items": [{"prompt": [{"role": "user", "content": "a\\udfff"}], "reference": "r", "candidate": "c"}]}',
         422, "items[0].prompt[0].content", "surrogate"),
        (b'{"id": "\\ud800", "items": [' + ITEM + b"]}", 422, "id", "surrogate"),
        (b'{"id": NaN, "items": [' + ITEM + b"]}", 400, "body", "NaN"),
        (b'{"id": -Infinity, "items": [' + ITEM + b"]}", 400, "body", "Infinity"),
        (b'{"id": 1e999, "items": [' + ITEM + b"]}", 422, "id", "finite"),
        (b'{"items": [' + ITEM + b'], "options": {"max_length": 1000000000}}', 422, "options.max_length",
         "max_length=16384"),
        (b'{"items": [' + ITEM + b'], "options": {"max_response_length": 4097}}', 422,
         "options.max_response_length", "max_response_length=4096"),
    ],
)  # fmt: skip
def test_hostile_values_are_refused_before_any_work(servers, body, status, field, says):
    """Text no tokenizer can take, ids no JSON answer can carry, and limits above the server's: 4xx, nothing scored."""
    url = servers["main"].url
    before = metrics(url)["polar_batches_total"]
    response = httpx.post(url + "/score", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and says in error["message"], error
    assert metrics(url)["polar_batches_total"] == before
    for path, payload in (
        ("/pooling", b'{"input": ["x\\ud800"]}'),
        ("/get_reward", b'{"query": ["q"], "prompts": ["q"], "labels": ["\\udc00"]}'),
    ):
        response = httpx.post(url + path, headers={**AUTH, "Content-Type": "application/json"}, content=payload)
        assert response.status_code == 422 and "surrogate" in response.json()["error"]["message"]
    # Options may lower the limits (the item is then cut to fit).
    lower = {
        "items": [{"prompt": "p", "reference": "r " * 50, "candidate": "c"}],
        "options": {"max_response_length": 8},
    }
    response = httpx.post(url + "/score", headers=AUTH, json=lower)
    assert response.status_code == 200 and response.json()["truncated"] == 1


def wait_for_health(url: str, done, timeout: float = 60.0):
    """The first /health answer (or None once the server is gone) that ``done`` accepts: waiting on the server's
    state, not on the clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url + "/health", timeout=5)
            health = (answer.status_code, answer.json())
        except httpx.TransportError:
            health = None
        if done(health):
            return health
        time.sleep(0.01)
    raise AssertionError(f"/health never reached the state waited for; last: {health}")


def test_slow_senders_cannot_lock_others_out(servers, scorer):
    """Four clients send headers and 11 bytes of a body, then stall: while their bodies are arriving they hold no
    place in the queue of 2, normal clients are answered, and each stalled one gets 408 once --body-timeout has
    passed."""
    import socket

    server = servers["small"]
    item = {"prompt": PROMPTS[0], "reference": REFERENCES[0], "candidate": "4"}
    expected = scorer.score([PROMPTS[0]], [REFERENCES[0]], ["4"])
    head = f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    slow = []
    for _ in range(4):
        sock = socket.create_connection((HOST, server.port), timeout=30)
        sock.sendall(head.encode() + b'{"items": [')
        slow.append(sock)
    try:
        # One snapshot: the four are inside the server, reading their bodies, and none of them is admitted.
        _, health = wait_for_health(server.url, lambda h: h is not None and h[1]["receiving"] == 4)
        assert health["in_flight"] == 0

        async def normal():
            async with httpx.AsyncClient(timeout=30) as http:
                return await asyncio.gather(
                    *(http.post(server.url + "/score", json={"items": [item]}) for _ in range(2))
                )

        for response in asyncio.run(normal()):  # as many as the queue holds
            assert response.status_code == 200, response.text
            assert_close(response.json()["scores"], expected)
        for sock in slow:
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            status_line, _, rest = answer.partition(b"\r\n")
            assert b" 408 " in status_line, answer
            error = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == 408 and error["field"] == "body" and "--body-timeout" in error["message"]
    finally:
        for sock in slow:
            sock.close()
    health = httpx.get(server.url + "/health").json()
    assert health["in_flight"] == 0 and health["receiving"] == 0


def test_an_empty_api_key_is_refused_at_start(tiny_qwen2_rm_dir):
    import subprocess
    import sys

    from serving_helpers import REPO

    for args, env in ((["--api-key", ""], {}), ([], {"TRL_POLAR_API_KEY": ""})):
        cmd = [sys.executable, "-m", "trl_polar.cli", "serve", "--model", tiny_qwen2_rm_dir, "--port", "1", *args]
        environ = {k: v for k, v in os.environ.items() if k != "TRL_POLAR_API_KEY"}
        out = subprocess.run(cmd, cwd=REPO, env={**environ, **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "empty" in last and "without authentication" in last, out.stderr
        assert "Traceback" not in out.stderr


def test_oversized_body_gets_413(servers):
    url = servers["main"].url
    big = json.dumps({"items": [{"prompt": "p" * (BODY_LIMIT + 10), "reference": "r", "candidate": "c"}]}).encode()
    declared = httpx.post(url + "/score", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert declared.status_code == 413
    assert "chunk_size" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: the server must count what streams in
        for at in range(0, len(big), 16384):
            yield big[at : at + 16384]

    streamed = httpx.post(url + "/score", headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert streamed.status_code == 413
    assert httpx.get(url + "/health").status_code == 200


def test_api_key_is_required(servers):
    url = servers["main"].url
    body = {"items": [{"prompt": "p", "reference": "r", "candidate": "c"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"}, {"X-API-Key": ""}):
        response = httpx.post(url + "/score", headers=headers, json=body)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert "api_key" in response.json()["error"]["message"]
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.post(url + "/score", headers={"X-API-Key": API_KEY}, json=body).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # liveness probes need no key


def test_full_queue_answers_503_with_retry_after(servers, scorer):
    url = servers["small"].url  # at most 2 requests in flight; each waits 400 ms for company
    item = {"prompt": PROMPTS[0], "reference": REFERENCES[0], "candidate": "4"}
    expected = scorer.score([PROMPTS[0]], [REFERENCES[0]], ["4"])

    async def run():
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(http.post(url + "/score", json={"items": [item]}) for _ in range(10)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert "--max-queue" in r.json()["error"]["message"]
        else:
            assert_close(r.json()["scores"], expected)
    again = httpx.post(url + "/score", json={"items": [item]}, timeout=30)
    assert again.status_code == 200


def test_batcher_isolates_a_failing_request(scorer):
    """A request that breaks the model fails alone; the requests batched with it still get their scores."""
    template = scorer.template
    good = [template.encode(p, r, c) for p, r, c in triples()[:4]]
    expected = scorer.score_ids(good)
    broken = [[len(template.tokenizer) + 1000, template.reward_token_id]]  # an id past the embedding table
    batches = []

    def score(jobs):
        batches.append(len(jobs))
        return score_jobs(scorer, jobs)

    batcher = WindowBatcher(score, window_s=0.2, budget=10**6, cost=lambda job: job.tokens)
    try:
        futures = [batcher.submit(Job([ids], [None])) for ids in good] + [batcher.submit(Job(broken, [None]))]
        *answers, failure = [f.exception(timeout=60) or f.result() for f in futures]
        assert isinstance(failure, Exception)
        assert_close([a[0] for a in answers], expected)
        assert batches[0] == 5 and batches[1:] == [1] * 5  # together, then each alone
        assert_close(batcher.submit(Job(good[:1], [None])).result(timeout=60), expected[:1])
    finally:
        batcher.close(timeout=10)
    with pytest.raises(BatcherClosed):
        batcher.submit(Job(good[:1], [None]))


def test_serve_command_registers_with_typer():
    import typer
    from typer.testing import CliRunner

    from trl_polar.cli.serve import serve_command

    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in (
        "--model",
        "--host",
        "--port",
        "--api-key",
        "--max-tokens-per-batch",
        "--max-queue",
        "--max-body-bytes",
    ):
        assert option in result.output
    # The settings are checked before the model loads, one line naming the option.
    bad = CliRunner().invoke(app, ["serve", "--model", "m", "--max-queue", "0", "--pooling-shape", "tgi"])
    assert isinstance(bad.exception, ValueError)
    assert str(bad.exception) == (
        "--max-queue: Input should be greater than 0 (got 0). --pooling-shape: Input should be 'lmdeploy' or 'vllm' "
        "(got 'tgi')."
    )


def test_graceful_shutdown_finishes_admitted_requests(servers, scorer):
    """SIGTERM: the two admitted requests (waiting in the 400 ms batch window) are answered; new ones are refused."""
    server = servers["small"]
    url = server.url
    item = {"prompt": PROMPTS[1], "reference": REFERENCES[1], "candidate": "bonjour"}
    expected = scorer.score([PROMPTS[1]], [REFERENCES[1]], ["bonjour"])

    async def run():
        async with httpx.AsyncClient(timeout=30) as http:
            admitted = [asyncio.ensure_future(http.post(url + "/score", json={"items": [item]})) for _ in range(2)]
            # Signal once both are admitted (or, on a slow machine, already answered), ...
            await asyncio.to_thread(
                wait_for_health, url, lambda h: h[1]["in_flight"] == 2 or all(f.done() for f in admitted)
            )
            server.proc.send_signal(signal.SIGTERM)
            # ... and ask again once the server has taken the signal in (draining, or no longer listening).
            await asyncio.to_thread(wait_for_health, url, lambda h: h is None or h[0] == 503)
            async with httpx.AsyncClient(timeout=5) as fresh:
                try:
                    late = (await fresh.post(url + "/score", json={"items": [item]})).status_code
                except httpx.TransportError:
                    late = "refused"
            return await asyncio.gather(*admitted), late

    answers, late = asyncio.run(run())
    for response in answers:
        assert response.status_code == 200, response.text
        assert_close(response.json()["scores"], expected)
    assert late in (503, "refused")
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


def test_every_endpoint_and_engine_shape_matches_the_openapi_schema(servers, scorer):
    """Example requests and answers of every endpoint, and every engine shape the client sends and reads, conform
    to the schema the server publishes at /openapi.json (generated from the wire models)."""
    from serving_helpers import schema_problems

    from trl_polar.serving.backends import BACKENDS, parse_scores

    url = servers["main"].url
    spec = httpx.get(url + "/openapi.json", timeout=10).json()
    assert httpx.get(url + "/docs", timeout=10).status_code == 200
    schemas = spec["components"]["schemas"]

    def body_schema(path):
        return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    def answer_schema(path, status=200, method="post"):
        return spec["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]

    def conforms(value, schema):
        problems = schema_problems(value, schema, spec)
        assert not problems, (value, problems)

    template = scorer.template
    messages = [{"role": "user", "content": PROMPTS[0]}]
    texts = [template.format(PROMPTS[0], REFERENCES[0], c) for c in CANDIDATES[0][:2]]
    requests = {
        "/score": {
            "id": 17,
            "items": [
                {"prompt": PROMPTS[0], "reference": REFERENCES[0], "candidate": "4"},
                {"prompt": messages, "reference": REFERENCES[0], "output": "5", "wrapper": "pretrain"},
            ],
            "options": {"wrapper": "sft", "max_response_length": 2048, "response_cut_side": "left"},
        },
        "/pooling": {"model": "polar", "input": texts},  # lmdeploy's shape, as the official client sends it
        "/classify": {"model": "polar", "text": texts},  # SGLang's
        "/get_reward": {"query": [f"<s>{PROMPTS[1]} bonjour</s>"], "prompts": [PROMPTS[1]], "labels": [REFERENCES[1]]},
    }
    # vLLM's pooling request: one text, or token ids.
    vllm = [{"input": texts[0]}, {"input": template.encode(PROMPTS[0], REFERENCES[0], "4")}]
    for path, body in [*requests.items(), *(("/pooling", b) for b in vllm)]:
        conforms(body, body_schema(path))
        response = httpx.post(url + path, headers=AUTH, json=body, timeout=30)
        assert response.status_code == 200, response.text
        conforms(response.json(), answer_schema(path))
    health = httpx.get(url + "/health", timeout=10)
    conforms(health.json(), answer_schema("/health", method="get"))
    refused = httpx.post(url + "/score", headers=AUTH, json={"items": [{"prompt": "p"}]}, timeout=10)
    assert refused.status_code == 422
    conforms(refused.json(), answer_schema("/score", 422))
    unauthorized = httpx.post(url + "/score", json=requests["/score"], timeout=10)
    conforms(unauthorized.json(), answer_schema("/score", 401))

    # What PolarClient sends to each engine, and the answers it reads from them.
    endpoint_of = {"trl-polar": "/score", "lmdeploy": "/pooling", "vllm": "/pooling", "sglang": "/classify"}
    for name, backend in BACKENDS.items():
        assert backend.endpoint == endpoint_of[name]
        items = [backend.item(template, PROMPTS[0], REFERENCES[0], c, "sft") for c in ("4", "5")]
        conforms(backend.request(items, "polar", "sft"), body_schema(backend.endpoint))
    # The engines' answers as their servers write them (vLLM 020638a6, lmdeploy 1263d5cd, SGLang's /classify).
    answers = {
        "trl-polar": {"scores": [0.5, -1.0], "truncated": 0, "id": "a"},
        "lmdeploy": {"id": "pool-8kGc", "object": "list", "created": 1700000000, "model": "POLAR-7B",
                     "data": [{"index": 0, "object": "pooling", "data": 0.5},
                              {"index": 1, "object": "pooling", "data": -1.0}],
                     "usage": {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0,
                               "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": None}},
        "vllm": {"id": "pooling-5f1d", "object": "list", "created": 1700000000, "model": "POLAR-7B",
                 "data": [{"index": 0, "object": "pooling", "data": [[-50.0], [-49.0], [0.5]]},
                          {"index": 1, "object": "pooling", "data": [[-50.0], [-1.0]]}],
                 "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0,
                           "prompt_tokens_details": None}},
        "sglang": [{"embedding": [0.5], "meta_info": {"id": "a1", "finish_reason": {"type": "length", "length": 0},
                                                      "prompt_tokens": 3, "weight_version": "default"}},
                   {"embedding": [-1.0], "meta_info": {"id": "b2", "finish_reason": {"type": "length", "length": 0},
                                                       "prompt_tokens": 2, "weight_version": "default"}}],
    }  # fmt: skip
    for name, answer in answers.items():
        conforms(answer, answer_schema(BACKENDS[name].endpoint))
        assert parse_scores(name, answer, 2) == [0.5, -1.0]
    # Every endpoint with a body publishes an example of it, and the example conforms.
    posts = [path for path, methods in spec["paths"].items() if "post" in methods]
    assert sorted(posts) == sorted(["/score", "/pooling", "/classify", "/tokenize", "/v1/encode", "/get_reward"])
    for path in posts:
        examples = schemas[body_schema(path)["$ref"].rsplit("/", 1)[-1]]["examples"]
        assert examples, path
        for example in examples:
            conforms(example, body_schema(path))
    # The schema refuses what the server refuses, and names every field of the wire models.
    assert schema_problems({"items": [{"prompt": "p", "reference": "r"}]}, body_schema("/score"), spec)
    assert schema_problems({"items": [], "options": {"max_length": 0}}, body_schema("/score"), spec)
    from trl_polar.serving import protocol

    for model in (*protocol.REQUEST_MODELS, *protocol.RESPONSE_MODELS, protocol.ScoreItem, protocol.ScoreOptions):
        if hasattr(model, "model_fields") and "root" not in model.model_fields:
            assert set(model.model_fields) <= set(schemas[model.__name__]["properties"]), model.__name__
