"""`trl-polar serve` as a drop-in for the engines: the official POLAR client in each of its three modes, and each
engine's own request and response shapes, against real servers on 127.0.0.1.

The official client is ``RewardModelClient`` in InternLM/POLAR (``src/polar/reward_func.py``, read at commit
80626f39, 2025-09-23; default ``server_type="sglang"``). What it sends and how it reads the answer, as facts:

- every mode posts the texts ``_encode`` builds (`PolarTemplate.format` reproduces them byte for byte) with
  ``requests.post(url, json=..., proxies={"http": None, "https": None}, timeout=30)``;
- ``sglang``:   ``POST /classify {"model": <last part of the model path>, "text": [...]}``, reads
  ``[e["embedding"][0] for e in res.json()]``;
- ``vllm``:     ``POST /pooling {"input": [...]}``, reads ``[e["data"][-1][0] for e in res.json()["data"]]``;
- ``lmdeploy``: ``POST /pooling {"input": [...]}``, reads ``[e["data"] for e in res.json()["data"]]``;
- any exception while reading is printed and retried, and after 8 tries the client returns None.

The engines' own answers, read from their servers' source:

- vLLM 020638a6 (``vllm/entrypoints/pooling/pooling/``): ``{"id": "pooling-<id>", "object": "list", "created",
  "model": <served name>, "data": [{"index", "object": "pooling", "data": [[v1], ..., [vn]]}], "usage":
  {"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}``; InternLM2's reward
  model pools every token (``pooler_for_token_classify``), one value each, the score the last;
- lmdeploy 1263d5cd (``lmdeploy/serve/openai/endpoints/auxiliary.py``): ``{"id": "pool-<id>", "object": "list",
  "created", "model": <request's or served name>, "data": [{"index", "object": "pooling", "data": <score>}],
  "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0},
  "completion_tokens_details": null}}``;
- SGLang (``http_server.py`` ``/classify`` -> the tokenizer manager's embedding output): one
  ``{"embedding": [v], "meta_info": {"id", "finish_reason", "prompt_tokens", ...}}`` per text (no ``index``), a
  bare object when ``text`` is one string.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

import torch  # noqa: E402
from serving_helpers import start_servers  # noqa: E402

from trl_polar.scorer import PolarScorer  # noqa: E402
from trl_polar.serving.client import PolarClient  # noqa: E402
from trl_polar.serving.parity import check_engine, compare_ids, diagnose  # noqa: E402

TOL = 1e-5
NO_PROXY = {"http": None, "https": None}

# The official client's data format: message lists, "output" for the candidate.
PROMPT = [{"role": "user", "content": "What is the capital of China?"}]
REFERENCE = [{"role": "assistant", "content": "Beijing."}]
OUTPUTS = [
    [{"role": "assistant", "content": "Beijing."}],
    [{"role": "assistant", "content": "Shanghai."}],
    "The capital of China is Beijing, a city in the north.",
]


@pytest.fixture(scope="module")
def servers(tiny_qwen2_rm_dir, tmp_path_factory):
    """The default server (/pooling in lmdeploy's shape), one started with --pooling-shape vllm, and one serving a
    copy of the model whose tokenizer adds no BOS (a deliberately wrong deployment, for check-engine)."""
    no_bos = tmp_path_factory.mktemp("no_bos") / "model"
    shutil.copytree(tiny_qwen2_rm_dir, no_bos)
    tokenizer_json = json.loads((no_bos / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = None  # the template step that prepends BOS
    (no_bos / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    default, vllm, wrong = start_servers(
        (tiny_qwen2_rm_dir, ()), (tiny_qwen2_rm_dir, ("--pooling-shape", "vllm")), (str(no_bos), ())
    )
    yield {"default": default, "vllm": vllm, "no_bos": wrong}
    for server in (default, vllm, wrong):
        server.stop()


@pytest.fixture(scope="module")
def scorer(tiny_qwen2_rm_dir):
    return PolarScorer(tiny_qwen2_rm_dir, device="cpu")


@pytest.fixture(scope="module")
def expected(scorer):
    return scorer.score([PROMPT] * len(OUTPUTS), [REFERENCE] * len(OUTPUTS), OUTPUTS)


def official_texts(scorer):
    """What the official client's ``encode`` sends: the reward-token text last, ``<|reward|>`` between the halves."""
    texts = [scorer.template.format(PROMPT, REFERENCE, o, "sft") for o in OUTPUTS]
    for text in texts:
        assert text.endswith("[UNUSED_TOKEN_130]") and text.count("<|reward|>") == 1
    return texts


def assert_close(got, expected):
    assert isinstance(got, list) and len(got) == len(expected), got
    for g, e in zip(got, expected):
        assert abs(g - e) <= TOL, (got, expected)


def test_official_client_sglang_mode(servers, scorer, expected, tiny_qwen2_rm_dir):
    model_name = tiny_qwen2_rm_dir.split("/")[-1]  # the client's rm_name
    res = requests.post(
        f"{servers['default'].url}/classify",
        json={"model": model_name, "text": official_texts(scorer)},
        proxies=NO_PROXY,
        timeout=30,
    )
    assert res.status_code == 200, res.text
    assert_close([e["embedding"][0] for e in res.json()], expected)
    # Every result as SGLang writes it: no index, the prompt's token count in meta_info.
    for e, text in zip(res.json(), official_texts(scorer)):
        assert set(e) == {"embedding", "meta_info"} and len(e["embedding"]) == 1
        assert set(e["meta_info"]) == {"id", "finish_reason", "prompt_tokens", "weight_version", "e2e_latency"}
        assert e["meta_info"]["prompt_tokens"] == len(scorer.template.tokenizer(text)["input_ids"])
        assert e["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert len({e["meta_info"]["id"] for e in res.json()}) == len(OUTPUTS)


def test_official_client_lmdeploy_mode(servers, scorer, expected, tiny_qwen2_rm_dir):
    texts = official_texts(scorer)
    res = requests.post(f"{servers['default'].url}/pooling", json={"input": texts}, proxies=NO_PROXY, timeout=30)
    assert res.status_code == 200, res.text
    body = res.json()
    assert_close([e["data"] for e in body["data"]], expected)
    # lmdeploy's envelope, field for field.
    tokens = sum(len(scorer.template.tokenizer(t)["input_ids"]) for t in texts)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("pool-") and body["object"] == "list" and isinstance(body["created"], int)
    assert body["model"] == tiny_qwen2_rm_dir.rstrip("/").split("/")[-1]  # the served name: no model was sent
    assert body["data"][0] == {"index": 0, "object": "pooling", "data": body["data"][0]["data"]}
    assert [e["index"] for e in body["data"]] == [0, 1, 2]
    assert body["usage"] == {
        "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": None,
    }  # fmt: skip
    # lmdeploy echoes the request's model name.
    named = requests.post(f"{servers['default'].url}/pooling", json={"model": "POLAR-7B", "input": texts[:1]})
    assert named.json()["model"] == "POLAR-7B"


def test_official_client_vllm_mode(servers, scorer, expected, tiny_qwen2_rm_dir):
    texts = official_texts(scorer)
    res = requests.post(f"{servers['vllm'].url}/pooling", json={"input": texts}, proxies=NO_PROXY, timeout=30)
    assert res.status_code == 200, res.text
    body = res.json()
    assert_close([e["data"][-1][0] for e in body["data"]], expected)
    tokens = sum(len(scorer.template.tokenizer(t)["input_ids"]) for t in texts)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("pooling-") and body["object"] == "list"
    assert body["model"] == tiny_qwen2_rm_dir.rstrip("/").split("/")[-1]  # vLLM answers with its served name
    assert [set(e) for e in body["data"]] == [{"index", "object", "data"}] * 3
    assert [e["object"] for e in body["data"]] == ["pooling"] * 3
    assert all(len(e["data"]) == 1 and len(e["data"][-1]) == 1 for e in body["data"])  # [[score]]
    assert body["usage"] == {
        "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None,
    }  # fmt: skip


def test_pooling_shape_follows_vllm_only_fields(servers, scorer, expected):
    """A request with a field only vLLM's pooling API has is a vLLM client's: it gets vLLM's shape on any server."""
    texts = official_texts(scorer)
    for field, value in [("task", "token_classify"), ("add_special_tokens", True), ("request_id", "r1")]:
        res = httpx.post(f"{servers['default'].url}/pooling", json={"input": texts, field: value}, timeout=30)
        assert res.status_code == 200, res.text
        assert res.json()["id"].startswith("pooling-")
        assert_close([e["data"][-1][0] for e in res.json()["data"]], expected)
    # lmdeploy's own fields (shared with vLLM) keep the server's shape.
    res = httpx.post(
        f"{servers['default'].url}/pooling", json={"input": texts, "encoding_format": "float", "user": "u"}, timeout=30
    )
    assert_close([e["data"] for e in res.json()["data"]], expected)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"use_activation": True}, "use_activation", "raw score"),
        ({"add_special_tokens": False}, "add_special_tokens", "BOS"),
        ({"truncate_prompt_tokens": 8}, "truncate_prompt_tokens", "reward token"),
        ({"encoding_format": "base64"}, "encoding_format", "float"),
        ({"dimensions": 1}, "dimensions", "one value"),
    ],
)
def test_pooling_fields_that_would_change_the_score_are_refused(servers, scorer, body, field, says):
    res = httpx.post(
        f"{servers['default'].url}/pooling", json={"input": official_texts(scorer)[:1], **body}, timeout=30
    )
    assert res.status_code == 422, res.text
    assert res.json()["error"]["field"] == field and says in res.json()["error"]["message"]


def test_classify_one_text_ids_and_tokenize(servers, scorer, expected):
    url = servers["default"].url
    text = official_texts(scorer)[0]
    ids = scorer.template.tokenizer(text)["input_ids"]
    # One string in: SGLang answers with one bare object.
    single = httpx.post(url + "/classify", json={"text": text}, timeout=30).json()
    assert set(single) == {"embedding", "meta_info"} and abs(single["embedding"][0] - expected[0]) <= TOL
    # Token ids (SGLang's input_ids): the same score.
    by_ids = httpx.post(url + "/classify", json={"input_ids": [ids, ids]}, timeout=30).json()
    assert_close([e["embedding"][0] for e in by_ids], expected[:1] * 2)
    both = httpx.post(url + "/classify", json={"text": [text], "input_ids": [ids]}, timeout=30)
    assert both.status_code == 422 and "either" in both.json()["error"]["message"]
    # vLLM's /tokenize: the ids /pooling scores, BOS included.
    tok = httpx.post(url + "/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids) and tok["max_model_len"] == scorer.template.max_length
    assert tok["token_strs"] == scorer.template.tokenizer.convert_ids_to_tokens(ids)
    assert tok["tokens"][0] == scorer.template.tokenizer.bos_token_id
    assert tok["tokens"][-1] == scorer.template.reward_token_id
    # lmdeploy's /v1/encode: the same ids; one text -> one list, several -> one list each.
    enc = httpx.post(url + "/v1/encode", json={"input": text}, timeout=30).json()
    assert enc == {"input_ids": ids, "length": len(ids)}
    enc = httpx.post(url + "/v1/encode", json={"input": [text, text], "add_bos": False}, timeout=30).json()
    assert enc == {"input_ids": [ids[1:], ids[1:]], "length": [len(ids) - 1] * 2}


@pytest.mark.parametrize(("backend", "server"), [("vllm", "vllm"), ("vllm", "default"), ("lmdeploy", "default"),
                                                 ("sglang", "default")])  # fmt: skip
def test_polar_client_engine_backends_against_the_server(servers, scorer, backend, server, tiny_qwen2_rm_dir):
    """PolarClient's engine backends read the server's engine shapes (whichever /pooling shape it answers in)."""
    prompts = [PROMPT, PROMPT, "Name a prime number above five."]
    references = [REFERENCE, REFERENCE, "7"]
    candidates = [OUTPUTS[0], OUTPUTS[1], "11"]
    client = PolarClient(url=servers[server].url, backend=backend, template=tiny_qwen2_rm_dir, chunk_size=2)
    scores = client.score(prompts, references, candidates)
    client.close()
    assert_close(scores, scorer.score(prompts, references, candidates))


# ---------------------------------------------------------------------------------------------------- check-engine
ROWS = [
    {"prompt": PROMPT, "reference": REFERENCE, "output": OUTPUTS[0]},
    {"prompt": PROMPT, "reference": REFERENCE, "output": OUTPUTS[1]},
    {"prompt": "Name a prime number above five.", "reference": "7", "output": "11", "wrapper": "pretrain"},
    {"prompt": "Translate to French: good morning.", "reference": "Bonjour.", "output": "Bonsoir."},
    {"prompt": "What is 2 + 2?", "reference": "4", "output": "The answer is 5."},
]


def rows_file(tmp_path, rows=ROWS):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_check_engine(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "trl_polar.cli", "check-engine", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def row_columns(rows=ROWS):
    return [r["prompt"] for r in rows], [r["reference"] for r in rows], [r["output"] for r in rows]


@pytest.mark.parametrize(("backend", "server"), [("trl-polar", "default"), ("lmdeploy", "default"),
                                                 ("sglang", "default"), ("vllm", "vllm")])  # fmt: skip
def test_check_engine_agrees_with_the_same_model(servers, backend, server, tiny_qwen2_rm_dir):
    wrappers = [r.get("wrapper", "sft") for r in ROWS]
    check = check_engine(servers[server].url, backend, tiny_qwen2_rm_dir, *row_columns(), wrappers, device="cpu")
    assert check.agrees and check.max_difference <= TOL and check.causes == []
    lines = check.report().splitlines()
    assert lines[0] == f"5 rows scored by {backend} at {servers[server].url} and in process."
    assert lines[1].startswith("largest difference: ") and lines[2] == "The engine agrees with the in-process scores."


def test_check_engine_names_another_model(servers, tiny_qwen2_rm_dir, tiny_llama_rm_dir, tmp_path):
    """The command as a user runs it: the server serves the Qwen2 model, --model names the Llama one."""
    rows = rows_file(tmp_path)
    out = run_check_engine(
        "--url", servers["default"].url, "--backend", "lmdeploy", "--model", tiny_llama_rm_dir, "--data", str(rows),
        "--n", "4",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"4 rows scored by lmdeploy at {servers['default'].url} and in process."
    local = PolarScorer(tiny_llama_rm_dir, device="cpu").score(*(column[:4] for column in row_columns()))
    remote = PolarScorer(tiny_qwen2_rm_dir, device="cpu").score(*(column[:4] for column in row_columns()))
    largest = max(abs(a - b) for a, b in zip(remote, local))
    assert lines[1].startswith(f"largest difference: {largest:.6g} (row ")
    assert lines[2:4] == ["The engine differs. Likely cause:", lines[3]]
    assert lines[3].startswith("  - model: the remote scores do not follow the in-process ones (correlation ")


def test_check_engine_names_a_scaled_head(servers, scorer, tiny_qwen2_rm_dir, tmp_path):
    """The same backbone with the value head doubled in process: the engine's scores are half of them."""
    from transformers import AutoModelForSequenceClassification

    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_qwen2_rm_dir, scaled)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen2_rm_dir)
    with torch.no_grad():
        model.score.weight.mul_(2.0)
    model.save_pretrained(scaled)
    check = check_engine(servers["vllm"].url, "vllm", str(scaled), *row_columns(), device="cpu")
    assert not check.agrees
    assert_close(check.local, [2 * x for x in check.remote])
    assert check.causes == [check.causes[0]] and check.causes[0].startswith("head or activation: remote = 0.5 * in")


@pytest.mark.parametrize("backend", ["vllm", "lmdeploy"])
def test_check_engine_names_a_tokenizer_without_bos(servers, scorer, backend, tiny_qwen2_rm_dir):
    """The engine serves the right weights with a tokenizer that adds no BOS: its tokenization route shows it."""
    check = check_engine(servers["no_bos"].url, backend, tiny_qwen2_rm_dir, *row_columns(), device="cpu")
    assert not check.agrees and check.notes == []
    texts = [scorer.template.format(p, r, c) for p, r, c in zip(*row_columns())]
    without_bos = scorer.score_ids([scorer.template.tokenizer(t)["input_ids"][1:] for t in texts])
    assert_close(check.remote, without_bos)
    assert check.causes == [
        "tokenizer or special tokens: the engine adds no BOS token ('<s>') at the start of row 0, unlike the "
        "model's training; serve it with the checkpoint's tokenizer config.",
        "the in-process model scores the engine's token ids as the engine does: the tokenization is the whole "
        "difference.",
    ]


def test_diagnose_names_each_cause_from_real_scores(scorer, tiny_qwen2_rm_dir):
    """The causes check-engine names, each from a real variant of the same rows' scores."""
    prompts, references, candidates = row_columns()
    local = scorer.score(prompts, references, candidates)
    tol = 1e-5
    pretrain = scorer.score(prompts, references, candidates, "pretrain")
    ids = [scorer.template.encode(p, r, c) for p, r, c in zip(prompts, references, candidates)]
    no_bos = scorer.score_ids([x[1:] for x in ids])
    alternatives = {"other wrapper": pretrain, "no BOS": no_bos}

    def cause(remote):
        (found,) = diagnose(remote, local, tolerance=tol, alternatives=alternatives)
        return found

    assert cause(pretrain).startswith("template text: the remote scores are the in-process scores of the 'pretrain'")
    assert cause(no_bos).startswith("tokenizer or special tokens: the remote scores are the in-process scores of")
    assert "sigmoid" in cause([1 / (1 + math.exp(-x)) for x in local])
    assert cause([x + 0.25 for x in local]) == (
        "head or activation: a constant offset, remote = in process +0.25: a bias in the served head or a reward "
        "normalisation on the engine's side."
    )
    assert cause([-x for x in local]).startswith("head or activation: the sign is flipped")
    # bf16 against fp32, both real scorers of the same checkpoint.
    bf16 = PolarScorer(tiny_qwen2_rm_dir, device="cpu", dtype="bf16").score(prompts, references, candidates)
    assert 0 < max(abs(a - b) for a, b in zip(bf16, local)) <= 0.05
    assert cause(bf16).startswith("precision: differences up to")
    # The engine's tokenization: a text whose reward token is not tokenized as one token.
    texts = [scorer.template.format(p, r, c) for p, r, c in zip(prompts, references, candidates)]
    local_ids = [scorer.template.tokenizer(t)["input_ids"] for t in texts]
    broken = [x[:-1] + scorer.template.tokenizer.encode("[UNUSED", add_special_tokens=False) for x in local_ids]
    (found,) = compare_ids(broken, local_ids, scorer.template)
    assert found.startswith("tokenizer or special tokens: the engine does not tokenize '[UNUSED_TOKEN_130]' as the")
    assert compare_ids(local_ids, local_ids, scorer.template) == []
