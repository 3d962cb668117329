"""The POLAR reward server: ``trl-polar serve --model PATH``.

One process holds one `PolarScorer` and answers over HTTP:

- ``POST /score``       this project's schema: ``{"items": [{"prompt", "reference", "candidate", "wrapper"?}, ...],
                        "options"?: {...}, "id"?: ...}`` -> ``{"scores": [...], "truncated": n, "id": ...}``;
- ``POST /pooling``     what the official POLAR client sends to an lmdeploy server: already formatted strings
                        (reward-token text included), answered in lmdeploy's shape (``data[i].data`` is the score);
- ``POST /get_reward``  OpenRLHF's remote reward-model protocol: ``{"query", "prompts", "labels"}`` in,
                        ``{"rewards", "scores", "extra_logs"}`` out; the label is the reference;
- ``GET /health``, ``GET /metrics`` (Prometheus text format).

Dynamic batching: every request is validated and tokenized on its own, then queued. One worker thread takes the
queued requests that arrived within ``batch_window_ms`` of the oldest one (up to ``max_batch_tokens`` tokens) and
scores them in one `PolarScorer.score_ids` call, so items of *different* requests that share a (prompt, reference)
share the prefix computation. The model never runs on the event loop, and only one thread ever runs it.

Limits: more than ``max_queue`` requests admitted and unanswered -> 503 with Retry-After; a body over
``max_body_bytes`` -> 413; malformed JSON or a wrong schema -> 400/422 naming the field; a wrong or missing API key
-> 401. Shutdown (SIGINT/SIGTERM) refuses new requests with 503, lets the admitted ones finish, then exits.

fastapi and uvicorn are imported only when a server is built (``pip install trl-polar[serve]``), so importing this
module, as the CLI does, costs nothing. (No ``from __future__ import annotations`` here: FastAPI reads the route
functions' annotations at runtime, and ``Request`` is imported inside `create_app`.)
"""

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from .template import WRAPPERS, PolarTemplate, flatten

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_TOKENS = 65536
DEFAULT_MAX_QUEUE = 1024
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_BATCH_WINDOW_MS = 5.0
DEFAULT_GRACEFUL_TIMEOUT_S = 60.0
API_KEY_ENV = "TRL_POLAR_API_KEY"
# Seconds a client is asked to wait after a 503; the queue drains in about one batch, so a second is plenty.
RETRY_AFTER_S = 1
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Per-request template options /score accepts besides the wrapper; each builds (and caches) a template variant.
TEMPLATE_OPTIONS = ("max_length", "max_response_length", "response_cut_side")
_MAX_TEMPLATE_VARIANTS = 16


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message that names the field and the fix, the field."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


# ---------------------------------------------------------------------------------------------------- metrics
class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        lines = [f'{name}_bucket{{{labels}{sep}le="{_fmt(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{suffix} {_fmt(self.sum)}", f"{name}_count{suffix} {self.total}"]
        return lines


def _fmt(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Counters, gauges and histograms in the Prometheus text format (written here: no extra dependency).

    Updated from the event loop and from the batch worker, hence the lock.
    """

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    TOKEN_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self._in_flight = in_flight
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.items: collections.Counter = collections.Counter()  # endpoint -> n
        self.truncated = 0
        self.batches = 0
        self.batch_failures = 0
        self.batch_items = _Histogram(self.SIZE_BUCKETS)
        self.batch_requests = _Histogram(self.SIZE_BUCKETS)
        self.batch_tokens = _Histogram(self.TOKEN_BUCKETS)
        self.scoring_seconds = 0.0
        self.latency: dict[str, _Histogram] = {}

    def request(self, endpoint: str, status: int, seconds: float, items: int = 0, truncated: int = 0) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.items[endpoint] += items
            self.truncated += truncated
            self.latency.setdefault(endpoint, _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def batch(self, requests: int, items: int, tokens: int, seconds: float, failed: bool = False) -> None:
        with self._lock:
            self.batches += 1
            self.batch_failures += int(failed)
            self.batch_requests.observe(requests)
            self.batch_items.observe(items)
            self.batch_tokens.observe(tokens)
            self.scoring_seconds += seconds

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP polar_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE polar_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'polar_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            out += ["# HELP polar_items_total Items scored, by endpoint.", "# TYPE polar_items_total counter"]
            out += [f'polar_items_total{{endpoint="{e}"}} {n}' for e, n in sorted(self.items.items())]
            out += [
                "# HELP polar_truncated_items_total Items the template truncated to max_length/max_response_length.",
                "# TYPE polar_truncated_items_total counter",
                f"polar_truncated_items_total {self.truncated}",
                "# HELP polar_batches_total Batches the worker scored (one scorer call each).",
                "# TYPE polar_batches_total counter",
                f"polar_batches_total {self.batches}",
                "# HELP polar_batch_failures_total Batches whose scorer call raised.",
                "# TYPE polar_batch_failures_total counter",
                f"polar_batch_failures_total {self.batch_failures}",
                "# HELP polar_scoring_seconds_total Time the worker spent in the scorer.",
                "# TYPE polar_scoring_seconds_total counter",
                f"polar_scoring_seconds_total {_fmt(self.scoring_seconds)}",
                "# HELP polar_batch_requests Requests per batch.",
                "# TYPE polar_batch_requests histogram",
                *self.batch_requests.render("polar_batch_requests"),
                "# HELP polar_batch_items Items per batch.",
                "# TYPE polar_batch_items histogram",
                *self.batch_items.render("polar_batch_items"),
                "# HELP polar_batch_tokens Tokens per batch.",
                "# TYPE polar_batch_tokens histogram",
                *self.batch_tokens.render("polar_batch_tokens"),
                "# HELP polar_request_latency_seconds Time from arrival to answer, by endpoint.",
                "# TYPE polar_request_latency_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                out += hist.render("polar_request_latency_seconds", f'endpoint="{endpoint}"')
            out += [
                "# HELP polar_queue_depth Requests waiting for the batch worker.",
                "# TYPE polar_queue_depth gauge",
                f"polar_queue_depth {self._queue_depth()}",
                "# HELP polar_in_flight_requests Requests admitted and not yet answered (limit: --max-queue).",
                "# TYPE polar_in_flight_requests gauge",
                f"polar_in_flight_requests {self._in_flight()}",
            ]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    ids: list[list[int]]
    keys: list[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    # Runs on the event loop. A client that went away has a cancelled future: its answer is dropped.
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Batcher:
    """The one thread that runs the model: it collects queued jobs into batches and scores each in one call.

    A batch closes when ``window_s`` has passed since its oldest job arrived, or when the queued jobs reach
    ``max_tokens``; a single job larger than the budget runs alone (the scorer splits it into micro-batches).
    """

    def __init__(self, scorer: Any, max_tokens: int, window_s: float, metrics: Metrics | None = None) -> None:
        self.scorer = scorer
        self.max_tokens = max_tokens
        self.window_s = window_s
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="polar-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    async def score(self, ids: list[list[int]], keys: list[Any]) -> list[float]:
        loop = asyncio.get_running_loop()
        job = _Job(ids, keys, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise RequestError(
                    503,
                    "The server is shutting down; retry on another replica.",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._jobs.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify()
        return await job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, score the queued ones, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].enqueued + self.window_s
            while not self._closed and self._queued_tokens < self.max_tokens:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Job] = []
            tokens = 0
            while self._jobs and (not batch or tokens + self._jobs[0].tokens <= self.max_tokens):
                job = self._jobs.popleft()
                self._queued_tokens -= job.tokens
                tokens += job.tokens
                batch.append(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            # Clients that disconnected while queued need no scores.
            batch = [job for job in batch if not job.future.cancelled()]
            if not batch:
                continue
            try:
                self._score(batch)
            except Exception as err:  # a bug here must fail these requests, not kill the thread and hang all others
                logger.exception("The batch worker failed; answering %d requests with an error.", len(batch))
                for job in batch:
                    self._finish(job, None, err)

    def _score(self, batch: list[_Job]) -> None:
        ids = [x for job in batch for x in job.ids]
        keys = [k for job in batch for k in job.keys]
        tokens = sum(len(x) for x in ids)
        started = time.perf_counter()
        try:
            scores = self.scorer.score_ids(ids, keys)
            if len(scores) != len(ids):
                raise RuntimeError(f"The scorer returned {len(scores)} scores for {len(ids)} items.")
        except Exception as err:
            if self.metrics:
                self.metrics.batch(len(batch), len(ids), tokens, time.perf_counter() - started, failed=True)
            if len(batch) == 1:
                logger.exception("Scoring a request of %d items failed.", len(ids))
                self._finish(batch[0], None, err)
                return
            # One request can break a shared batch: score each alone so that only the culprit gets the error.
            logger.warning("A batch of %d requests failed (%s); scoring them one by one.", len(batch), err)
            for job in batch:
                self._score([job])
            return
        if self.metrics:
            self.metrics.batch(len(batch), len(ids), tokens, time.perf_counter() - started)
        at = 0
        for job in batch:
            self._finish(job, scores[at : at + len(job.ids)], None)
            at += len(job.ids)

    @staticmethod
    def _finish(job: _Job, scores: list[float] | None, error: BaseException | None) -> None:
        # A closed event loop raises RuntimeError: nobody is waiting for the answer any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(_resolve, job.future, scores, error)


# ---------------------------------------------------------------------------------------------------- parsing
def _expect_list(value: Any, name: str, of: str) -> list:
    if not isinstance(value, list):
        raise RequestError(422, f"`{name}` must be a JSON list of {of}, got {type(value).__name__}.", name)
    return value


def _object(payload: Any, endpoint: str, example: str) -> dict:
    if not isinstance(payload, dict):
        raise RequestError(
            422, f"The body of {endpoint} must be a JSON object like {example}, got {type(payload).__name__}.", "body"
        )
    return payload


def _text(value: Any, name: str) -> Any:
    try:
        flatten(value, name)
    except ValueError as err:
        raise RequestError(422, str(err), name) from None
    return value


def _parse_json(body: bytes) -> Any:
    if not body:
        raise RequestError(400, "The request body is empty; send a JSON object (Content-Type: application/json).")
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestError(
            400, f"The body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}).", "body"
        ) from None
    except (ValueError, RecursionError) as err:  # not UTF-8, or nested deeper than the parser allows
        raise RequestError(400, f"The body is not valid JSON ({type(err).__name__}: {err}).", "body") from None


@dataclass
class _ScoreRequest:
    prompts: list[Any]
    references: list[Any]
    candidates: list[Any]
    wrappers: list[str]
    options: tuple
    request_id: Any


def parse_score(payload: Any) -> _ScoreRequest:
    """Validate a /score body; errors name the field (``items[3].candidate``) and the fix."""
    example = '{"items": [{"prompt": "...", "reference": "...", "candidate": "..."}]}'
    body = _object(payload, "/score", example)
    unknown = sorted(set(body) - {"items", "options", "id"})
    if unknown:
        raise RequestError(422, f"Unknown field(s) {unknown}; /score takes items, options and id.", unknown[0])
    if "items" not in body:
        raise RequestError(422, f"The body needs `items`, a list like {example}.", "items")
    items = _expect_list(body["items"], "items", "{prompt, reference, candidate} objects")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(422, f"`options` must be an object, got {type(options).__name__}.", "options")
    bad = sorted(set(options) - {"wrapper", *TEMPLATE_OPTIONS})
    if bad:
        names = ", ".join(("wrapper", *TEMPLATE_OPTIONS))
        raise RequestError(422, f"Unknown option(s) {bad}; the options are {names}.", f"options.{bad[0]}")
    default_wrapper = options.get("wrapper", "sft")
    if default_wrapper not in WRAPPERS:
        raise RequestError(422, f"`options.wrapper` must be one of {WRAPPERS}, got {default_wrapper!r}.", "options")
    overrides = tuple(sorted((k, v) for k, v in options.items() if k in TEMPLATE_OPTIONS))
    request_id = body.get("id")
    if isinstance(request_id, (dict, list)):
        raise RequestError(422, "`id` must be a string or a number; it is echoed back to match answers.", "id")
    prompts, references, candidates, wrappers = [], [], [], []
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            kind = type(item).__name__
            raise RequestError(422, f"`{where}` must be an object (prompt, reference, candidate), not {kind}.", where)
        for name in ("prompt", "reference"):
            if name not in item:
                raise RequestError(422, f"`{where}` has no `{name}` (it has {sorted(item)}).", f"{where}.{name}")
        candidate_key = "candidate" if "candidate" in item else "output" if "output" in item else None
        if candidate_key is None:
            raise RequestError(
                422, f"`{where}` has no `candidate` (or `output`, the official client's name); it has {sorted(item)}.",
                f"{where}.candidate",
            )  # fmt: skip
        prompts.append(_text(item["prompt"], f"{where}.prompt"))
        references.append(_text(item["reference"], f"{where}.reference"))
        candidates.append(_text(item[candidate_key], f"{where}.{candidate_key}"))
        wrapper = item.get("wrapper", default_wrapper)
        if wrapper not in WRAPPERS:
            message = f"`{where}.wrapper` must be one of {WRAPPERS}, got {wrapper!r}."
            raise RequestError(422, message, f"{where}.wrapper")
        wrappers.append(wrapper)
    return _ScoreRequest(prompts, references, candidates, wrappers, overrides, request_id)


def parse_pooling(payload: Any) -> tuple[list[Any], str | None]:
    """Validate a /pooling body (lmdeploy/vLLM shape): ``input`` is a string, a list of strings or token-id lists."""
    body = _object(payload, "/pooling", '{"input": ["<formatted text>[UNUSED_TOKEN_130]", ...]}')
    if "input" not in body:
        raise RequestError(422, "The body needs `input`: a list of texts built by PolarTemplate.format.", "input")
    inputs = body["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    inputs = _expect_list(inputs, "input", "strings (or lists of token ids)")
    if inputs and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
        inputs = [inputs]  # one sequence of token ids
    for i, value in enumerate(inputs):
        ok = isinstance(value, str) or (
            isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        )
        if not ok:
            message = f"`input[{i}]` must be a string or a non-empty list of token ids, got {value!r:.80}."
            raise RequestError(422, message, f"input[{i}]")
    model = body.get("model")
    return inputs, model if isinstance(model, str) else None


def parse_get_reward(payload: Any) -> tuple[list[str], list[str], list[Any]]:
    """Validate a /get_reward body (OpenRLHF): ``query``, ``prompts`` and ``labels`` of equal length."""
    body = _object(payload, "/get_reward", '{"query": [...], "prompts": [...], "labels": [...]}')
    if "query" not in body:
        raise RequestError(422, "The body needs `query`: the prompt + response texts OpenRLHF sends.", "query")
    queries = _expect_list(body["query"], "query", "strings")
    for name, fix in (
        ("prompts", "the prompt of each query, to cut the response out of it"),
        ("labels", "the reference answers; run OpenRLHF with --data.label_key (older: --label_key) naming them"),
    ):
        if body.get(name) is None:
            message = f"The body needs `{name}`: {fix}. POLAR scores a response against a reference."
            raise RequestError(422, message, name)
    prompts = _expect_list(body["prompts"], "prompts", "strings")
    labels = _expect_list(body["labels"], "labels", "reference answers")
    if not len(queries) == len(prompts) == len(labels):
        raise RequestError(
            422,
            f"`query`, `prompts` and `labels` must have the same length, got {len(queries)}, {len(prompts)} and "
            f"{len(labels)}.",
            "labels",
        )
    for name, values in (("query", queries), ("prompts", prompts)):
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise RequestError(422, f"`{name}[{i}]` must be a string, got {type(v).__name__}.", f"{name}[{i}]")
    return queries, prompts, labels


# ---------------------------------------------------------------------------------------------------- the app
class PolarService:
    """What the HTTP layer calls: validation results in, scores out. One per app (``app.state.polar``)."""

    def __init__(
        self,
        scorer: Any,
        *,
        api_key: str | None,
        max_batch_tokens: int,
        max_queue: int,
        max_body_bytes: int,
        batch_window_ms: float,
        model_name: str,
    ) -> None:
        for name, value in (
            ("max_batch_tokens", max_batch_tokens),
            ("max_queue", max_queue),
            ("max_body_bytes", max_body_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not batch_window_ms >= 0:
            raise ValueError(f"`batch_window_ms` must be >= 0, got {batch_window_ms!r}.")
        if not hasattr(scorer, "score_ids") or not hasattr(scorer, "template"):
            raise ValueError(
                f"create_app needs a PolarScorer (with .score_ids and .template), got {type(scorer).__name__}."
            )
        self.scorer = scorer
        self.template: PolarTemplate = scorer.template
        self.api_key = api_key.encode() if api_key else None
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name
        self.in_flight = 0
        self.draining = False
        self.started = time.time()
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: self.in_flight)
        self.batcher = Batcher(scorer, max_batch_tokens, batch_window_ms / 1000.0, self.metrics)
        # Tokenization is CPU work too: one thread, off the event loop, overlapping the model's thread. A single
        # thread because the template's part cache and a fast tokenizer's settings are not thread-safe.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polar-encode")
        self._templates: collections.OrderedDict[tuple, PolarTemplate] = collections.OrderedDict()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.draining = True
        self.batcher.close()
        self.encoder.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------------ checks
    def check_key(self, authorization: str | None, x_api_key: str | None) -> None:
        if self.api_key is None:
            return
        given = x_api_key
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        # compare_digest on bytes of any length: the time taken does not reveal how much of the key matched.
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key):
            raise RequestError(
                401,
                "Missing or wrong API key: send `Authorization: Bearer <key>` (PolarClient(api_key=...)).",
                "Authorization",
                {"WWW-Authenticate": "Bearer"},
            )

    def admit(self) -> None:
        if self.draining:
            raise RequestError(
                503,
                "The server is shutting down; retry on another replica.",
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            )
        if self.in_flight >= self.max_queue:
            raise RequestError(
                503,
                f"The queue is full ({self.in_flight} requests in flight, --max-queue {self.max_queue}); retry after "
                f"{RETRY_AFTER_S} s, lower the client's concurrency, or add replicas.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def read_body(self, request: Any) -> bytes:
        limit = self.max_body_bytes
        fix = "send fewer items per request (PolarClient(chunk_size=...)) or raise --max-body-bytes"
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise RequestError(400, f"Content-Length {declared!r} is not an integer.", "Content-Length") from None
            if size > limit:
                raise RequestError(413, f"The body has {size} bytes, over the limit of {limit}; {fix}.", "body")
        # Content-Length can be absent (chunked uploads) or wrong: count what actually arrives.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"The body exceeds the limit of {limit} bytes; {fix}.", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------------------------------------ encoding
    def template_for(self, overrides: tuple) -> PolarTemplate:
        if not overrides:
            return self.template
        template = self._templates.get(overrides)
        if template is None:
            params = {**self.template.to_dict(), **dict(overrides)}
            try:
                template = PolarTemplate(self.template.tokenizer, **params)
            except ValueError as err:
                raise RequestError(422, f"`options`: {err}", "options") from None
            self._templates[overrides] = template
            if len(self._templates) > _MAX_TEMPLATE_VARIANTS:
                self._templates.popitem(last=False)
        return template

    def encode_score(self, req: _ScoreRequest) -> tuple[list[list[int]], list[Any], int]:
        """Ids, prefix-group keys and the truncated count of a /score request (runs on the encode thread)."""
        template = self.template_for(req.options)
        ids, keys, truncated = [], [], 0
        for i, (p, r, c, w) in enumerate(zip(req.prompts, req.references, req.candidates, req.wrappers)):
            try:
                enc = template.build(p, r, c, w)
            except ValueError as err:
                raise RequestError(422, f"`items[{i}]`: {err}", f"items[{i}]") from None
            ids.append(enc.input_ids)
            truncated += enc.truncated
            # Items of one (prompt, reference, wrapper, template) share their prefix, across requests too.
            keys.append(("items", flatten(p), flatten(r), w, req.options))
        if truncated:
            logger.warning("%d of %d items were truncated by the template.", truncated, len(ids))
        return ids, keys, truncated

    def encode_texts(self, inputs: list[Any]) -> tuple[list[list[int]], list[Any]]:
        """Ids and group keys of formatted texts, tokenized as an lmdeploy/vLLM server does (special tokens on)."""
        template = self.template
        texts = [x for x in inputs if isinstance(x, str)]
        encoded = iter(template.tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
        ids, keys = [], []
        for i, value in enumerate(inputs):
            seq = list(next(encoded)) if isinstance(value, str) else list(value)
            if not seq or seq[-1] != template.reward_token_id:
                raise RequestError(
                    422,
                    f"`input[{i}]` does not end with the reward token {template.reward_token!r} "
                    f"(id {template.reward_token_id}); the model reads its score there. Build the text with "
                    "PolarTemplate.format(prompt, reference, candidate), which appends it.",
                    f"input[{i}]",
                )
            if len(seq) > template.max_length:
                raise RequestError(
                    422,
                    f"`input[{i}]` has {len(seq)} tokens, over max_length={template.max_length}; PolarTemplate.format "
                    "truncates to fit.",
                    f"input[{i}]",
                )
            if not isinstance(value, str) and (min(seq) < 0 or max(seq) >= len(template.tokenizer)):
                raise RequestError(
                    422, f"`input[{i}]` has token ids outside the vocabulary (0..{len(template.tokenizer) - 1}).",
                    f"input[{i}]",
                )  # fmt: skip
            ids.append(seq)
            # The text before the separator is P + "\n" + REF: equal texts there mean a shared prefix.
            if isinstance(value, str) and template.separator in value:
                keys.append(("text", value.split(template.separator, 1)[0]))
            else:
                keys.append(None)
        return ids, keys

    def encode_get_reward(
        self, queries: list[str], prompts: list[str], labels: list[Any]
    ) -> tuple[list[list[int]], list[Any], int]:
        from .integrations.openrlhf import _label, _stop_strings, response_from_query

        stops = _stop_strings()
        items = _ScoreRequest([], [], [], [], (), None)
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels)):
            try:
                reference, prompt_override = _label(label, i)
            except ValueError as err:
                raise RequestError(422, str(err), f"labels[{i}]") from None
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                raise RequestError(
                    422,
                    f"`labels[{i}]` is empty. POLAR needs the reference answer as the label: run OpenRLHF with "
                    "--data.label_key naming the column that holds it.",
                    f"labels[{i}]",
                )
            items.prompts.append(_text(prompt_override if prompt_override is not None else prompt, f"prompts[{i}]"))
            items.references.append(_text(reference, f"labels[{i}]"))
            items.candidates.append(response_from_query(query, prompt, stops))
            items.wrappers.append("sft")
        return self.encode_score(items)

    async def encode(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.encoder, fn, *args)


def _checked(scores: list[float]) -> list[float]:
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise RequestError(500, f"The model produced non-finite scores for items {bad[:10]}; check the checkpoint.")
    return [float(s) for s in scores]


def create_app(
    scorer: Any,
    *,
    api_key: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
    model_name: str | None = None,
):
    """The FastAPI app serving one scorer.

    Args:
        scorer: a `PolarScorer` (anything with ``.score_ids(ids, group_keys)`` and ``.template``).
        api_key: when set, every endpoint but /health needs ``Authorization: Bearer <key>`` (or ``X-API-Key``).
        max_batch_tokens: the most tokens the worker puts in one scorer call (the scorer then splits it into
            micro-batches under its own ``max_tokens_per_batch``).
        max_queue: the most requests admitted and not yet answered; beyond it a request gets 503 + Retry-After.
        max_body_bytes: the largest request body; beyond it 413.
        batch_window_ms: how long the worker waits for more requests after the first one of a batch arrives.
        model_name: the name /pooling answers with (default: the model directory's name).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    if model_name is None:
        source = getattr(getattr(scorer, "model", None), "name_or_path", None) or "polar"
        model_name = os.path.basename(str(source).rstrip("/")) or "polar"
    service = PolarService(
        scorer,
        api_key=api_key,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        model_name=model_name,
    )

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            # uvicorn has already waited for the admitted requests; what is still queued is scored before exit.
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="trl-polar reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.polar = service

    def error_response(err: RequestError) -> Response:
        body = {"error": {"message": err.message, "type": _ERROR_TYPES.get(err.status, "error"), "code": err.status}}
        if err.field:
            body["error"]["field"] = err.field
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    def json_response(body: dict) -> Response:
        return Response(json.dumps(body, ensure_ascii=False, allow_nan=False), media_type="application/json")

    async def handle(request: Request, endpoint: str, work: Callable) -> Response:
        started = time.perf_counter()
        status, items, truncated = 500, 0, 0
        admitted = False
        try:
            service.check_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
            service.admit()
            service.in_flight += 1
            admitted = True
            payload = _parse_json(await service.read_body(request))
            body, items, truncated = await work(payload)
            status = 200
            return json_response(body)
        except RequestError as err:
            status = err.status
            return error_response(err)
        except Exception as err:  # a bug or a model failure: answer 500 and keep serving
            logger.exception("%s failed", endpoint)
            return error_response(RequestError(500, f"Internal error while scoring: {type(err).__name__}: {err}"))
        finally:
            if admitted:
                service.in_flight -= 1
            service.metrics.request(endpoint, status, time.perf_counter() - started, items, truncated)

    @app.post("/score")
    async def score(request: Request) -> Response:
        async def work(payload):
            req = parse_score(payload)
            ids, keys, truncated = await service.encode(service.encode_score, req)
            scores = _checked(await service.batcher.score(ids, keys))
            body = {"scores": scores, "truncated": truncated}
            if req.request_id is not None:
                body["id"] = req.request_id
            return body, len(scores), truncated

        return await handle(request, "/score", work)

    @app.post("/pooling")
    async def pooling(request: Request) -> Response:
        async def work(payload):
            inputs, model = parse_pooling(payload)
            ids, keys = await service.encode(service.encode_texts, inputs)
            scores = _checked(await service.batcher.score(ids, keys))
            tokens = sum(len(x) for x in ids)
            body = {
                "id": f"pool-{time.time_ns():x}",
                "object": "list",
                "created": int(time.time()),
                "model": model or service.model_name,
                "data": [{"index": i, "object": "pooling", "data": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
            }
            return body, len(scores), 0

        return await handle(request, "/pooling", work)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Response:
        async def work(payload):
            queries, prompts, labels = parse_get_reward(payload)
            ids, keys, truncated = await service.encode(service.encode_get_reward, queries, prompts, labels)
            scores = _checked(await service.batcher.score(ids, keys))
            # Raw POLAR scores: OpenRLHF normalises and clips on its side (--reward.normalize_enable, clip_range).
            body = {"rewards": scores, "scores": scores, "extra_logs": {"polar_raw": scores}}
            return body, len(scores), truncated

        return await handle(request, "/get_reward", work)

    @app.get("/health")
    async def health() -> Response:
        status = "draining" if service.draining else "ok"
        body = {
            "status": status,
            "model": service.model_name,
            "queue_depth": service.batcher.depth,
            "in_flight": service.in_flight,
            "max_queue": service.max_queue,
            "uptime_s": round(time.time() - service.started, 3),
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            service.check_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        except RequestError as err:
            return error_response(err)
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


_ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    413: "payload_too_large",
    422: "invalid_request",
    500: "internal_error",
    503: "unavailable",
}


# ---------------------------------------------------------------------------------------------------- serving
def serve(
    model: Any,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    api_key: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
    max_tokens_per_batch: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    log_level: str = "info",
) -> None:
    """Serve a POLAR reward model over HTTP until SIGINT/SIGTERM (then admitted requests finish, new ones get 503).

    Args:
        model: a saved POLAR reward model directory (or hub name), or a `PolarScorer`.
        host: the address to bind; loopback by default. Binding anything else exposes the model: pass an api_key.
        port: the TCP port.
        max_tokens_per_batch, device, dtype: passed to `PolarScorer` when ``model`` is a path.
        graceful_timeout: the most seconds shutdown waits for admitted requests.
        The other arguments are `create_app`'s.
    """
    import uvicorn

    from .scorer import DEFAULT_MAX_TOKENS_PER_BATCH, PolarScorer

    if hasattr(model, "score_ids"):
        scorer = model
    else:
        scorer = PolarScorer(
            model,
            max_tokens_per_batch=max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH,
            device=device,
            dtype=dtype,
        )
    if host not in LOOPBACK_HOSTS and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach this port can use the model.", host)
    app = create_app(
        scorer,
        api_key=api_key,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
    )
    service: PolarService = app.state.polar

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # noqa: ANN001 - uvicorn's signature
            # Refuse new requests from the moment the signal arrives, before uvicorn closes the listener.
            service.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout,
        access_log=False,
        # The body limit is ours to enforce (413); uvicorn's defaults for headers and keep-alive are fine.
    )
    _Server(config).run()


def serve_command(
    model: Annotated[str, typer.Option(help="A saved POLAR reward model: directory or hub name.")],
    host: Annotated[
        str, typer.Option(help="Address to bind. Loopback by default; anything else exposes the model (use a key).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(envvar=API_KEY_ENV, help=f"Require `Authorization: Bearer KEY` (or set {API_KEY_ENV})."),
    ] = None,
    max_batch_tokens: Annotated[
        int, typer.Option(help="Most tokens scored together in one batch across requests.")
    ] = DEFAULT_MAX_BATCH_TOKENS,
    max_queue: Annotated[
        int, typer.Option(help="Most requests admitted and unanswered; more get 503 + Retry-After.")
    ] = DEFAULT_MAX_QUEUE,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body in bytes; larger gets 413.")
    ] = DEFAULT_MAX_BODY_BYTES,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a batch waits for more requests after its first.")
    ] = DEFAULT_BATCH_WINDOW_MS,
    max_tokens_per_batch: Annotated[
        int | None, typer.Option(help="PolarScorer micro-batch budget (tokens per forward, shared prefix once).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32 (default: as stored).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a POLAR reward model over HTTP: /score, /pooling (lmdeploy), /get_reward (OpenRLHF), /health, /metrics."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        max_tokens_per_batch=max_tokens_per_batch,
        device=device,
        dtype=dtype,
        log_level=log_level,
    )


if __name__ == "__main__":
    typer.run(serve_command)
