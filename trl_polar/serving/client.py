"""PolarClient: score (prompt, reference, candidate) triples on remote servers; None only where asked for
(``on_error="none"``).

The backends ("trl-polar", this project's server, and the engines vLLM, SGLang and lmdeploy) are the adapters of
`trl_polar.serving.backends`. For the engines the client builds each text with `PolarTemplate.format`, so it needs
the template: ``template=`` a `PolarTemplate`, or a path to the reward model (or its tokenizer).

What the official client lacks and this one does: requests split into chunks of ``chunk_size`` items and sent
concurrently (at most ``max_concurrency`` in flight), timeouts on every request, retries with exponential backoff
(honouring Retry-After), several replicas used round-robin with a failing one skipped for a while, the answer's
shape and length checked, and, after the last retry, a `PolarClientError` naming the server(s) and the cause.

All HTTP runs on one private event-loop thread, so the sync `score` works anywhere (also inside a running event
loop), `ascore` does not block the caller's loop, and the concurrency limit holds across all calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..failures import FailurePolicy, describe
from ..template import WRAPPERS, PolarTemplate, Text, check_texts
from .backends import BACKENDS, parse_scores

logger = logging.getLogger(__name__)

# Status codes worth another try (elsewhere): the server is overloaded, restarting or timed out.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class PolarClientError(RuntimeError):
    """Scoring failed after every retry (or a request was refused in a way retrying cannot fix).

    Attributes:
        servers: the URLs that were tried.
        cause: the last failure, as text.
        status: the last HTTP status, if the server answered.
    """

    def __init__(self, message: str, servers: Sequence[str] = (), cause: str = "", status: int | None = None):
        super().__init__(message)
        self.servers = list(servers)
        self.cause = cause
        self.status = status


class _Failure(Exception):
    """One failed attempt: retryable or not, with the server's status when it answered."""

    def __init__(self, message: str, retryable: bool, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class _Replica:
    def __init__(self, url: str) -> None:
        self.url = url
        self.down_until = 0.0
        self.failures = 0


def _normalize_url(url: str, endpoint: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"A server URL must be a non-empty string like 'http://127.0.0.1:8000', got {url!r}.")
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # the official client takes "host:port"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Server URL {url!r} must use http:// or https://.")
    return url if url.endswith(endpoint) else url + endpoint


def _targets(url: str | None, urls: Sequence[str] | str | None) -> list[str]:
    if url is not None and urls is not None:
        raise ValueError("Pass either `url` (one server) or `urls` (replicas), not both.")
    if isinstance(urls, str):
        urls = [urls]
    targets = [url] if url is not None else list(urls or [])
    if not targets:
        raise ValueError("PolarClient needs a server: pass url='http://host:port' or urls=[...].")
    return targets


def _check_settings(**settings: Any) -> None:
    for name in ("max_retries", "max_concurrency", "chunk_size"):
        value, low = settings[name], 0 if name == "max_retries" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
    for name in ("timeout", "connect_timeout"):
        if not (isinstance(settings[name], (int, float)) and settings[name] > 0):
            raise ValueError(f"`{name}` must be a positive number of seconds, got {settings[name]!r}.")
    if not all(settings[name] >= 0 for name in ("backoff", "max_backoff", "cooldown")):
        raise ValueError("`backoff`, `max_backoff` and `cooldown` must be >= 0.")


def _load_template(template: Any) -> PolarTemplate:
    if isinstance(template, PolarTemplate):
        return template
    if isinstance(template, (str, os.PathLike)):
        path = str(template)
        if os.path.isfile(os.path.join(path, "config.json")):
            return PolarTemplate.from_pretrained(path)
        from ..hub import load_tokenizer

        return PolarTemplate(load_tokenizer(path))
    raise ValueError(
        f"`template` must be a PolarTemplate or the path of the reward model (or its tokenizer), got "
        f"{type(template).__name__}."
    )


class PolarClient:
    """Remote POLAR scoring with chunking, concurrency, retries and failover.

    Args:
        url: one server, e.g. ``"http://10.0.0.5:8000"`` (``"host:port"`` works; the endpoint is appended).
        urls: several replicas; requests go round-robin, a failing replica is skipped for ``cooldown`` seconds.
        backend: ``"trl-polar"`` (default), ``"vllm"``, ``"sglang"`` or ``"lmdeploy"``.
        api_key: sent as ``Authorization: Bearer <key>``.
        model_name: the served model's name, sent as ``model`` (SGLang needs it; default: the template's model
            directory name for sglang, omitted otherwise).
        template: a `PolarTemplate` or the reward model's path; needed by vllm, sglang and lmdeploy, which receive
            formatted text.
        wrapper: "sft" (default) or "pretrain".
        timeout: seconds one request may take (connect: ``connect_timeout``).
        max_retries: further attempts after the first, each on the next replica that is up.
        backoff: first wait in seconds when every replica is failing; doubles per attempt up to ``max_backoff``.
        max_concurrency: requests in flight at once, across all calls of this client.
        chunk_size: items per request.
        cooldown: seconds a replica that failed is skipped while another one is up.
        on_error: "raise" (default) raises `PolarClientError` once a request has failed every retry; "none" gives
            the items of that request (and any item the backend cannot format) None, counted in
            ``stats["failed_items"]`` and logged (`trl_polar.failures`).
        score_timeout: seconds the items of one request may take, retries included (None: no limit beyond
            ``timeout`` per attempt); past it, ``on_error`` applies.

    Example::

        client = PolarClient(urls=["http://10.0.0.5:8000", "http://10.0.0.6:8000"], api_key="...")
        client.score(["What is 2+2?"], ["4"], ["The answer is 4."])
        reward = PolarReward(client)  # or PolarReward(urls=[...]) once PolarReward builds the client itself
    """

    def __init__(
        self,
        url: str | None = None,
        urls: Sequence[str] | None = None,
        backend: str = "trl-polar",
        *,
        api_key: str | None = None,
        model_name: str | None = None,
        template: PolarTemplate | str | os.PathLike | None = None,
        wrapper: str = "sft",
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        max_concurrency: int = 8,
        chunk_size: int = 64,
        cooldown: float = 5.0,
        on_error: str = "raise",
        score_timeout: float | None = None,
    ) -> None:
        self.policy = FailurePolicy(on_error, score_timeout)
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {tuple(BACKENDS)}, got {backend!r}.")
        _check_settings(
            max_retries=max_retries, max_concurrency=max_concurrency, chunk_size=chunk_size, timeout=timeout,
            connect_timeout=connect_timeout, backoff=backoff, max_backoff=max_backoff, cooldown=cooldown,
        )  # fmt: skip
        if wrapper not in WRAPPERS:
            raise ValueError(f"`wrapper` must be one of {WRAPPERS}, got {wrapper!r}.")
        self.backend = backend
        self.endpoint = BACKENDS[backend].endpoint
        self.urls = [_normalize_url(u, self.endpoint) for u in _targets(url, urls)]
        self.api_key = api_key
        if BACKENDS[backend].formats and template is None:
            raise ValueError(
                f"backend={backend!r} sends formatted text, so the client needs the template: pass "
                "template=<reward model path> (or a PolarTemplate)."
            )
        self.template = None if template is None else _load_template(template)
        if model_name is None and backend == "sglang":
            source = getattr(self.template.tokenizer, "name_or_path", "") if self.template else ""
            model_name = os.path.basename(str(source).rstrip("/")) or None
        self.model_name = model_name
        self.wrapper = wrapper
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_concurrency = max_concurrency
        self.chunk_size = chunk_size
        self.cooldown = float(cooldown)
        self._init_runtime()

    # ------------------------------------------------------------------------------------------------ runtime
    def _init_runtime(self) -> None:
        self._replicas = [_Replica(u) for u in self.urls]
        self._turn = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http = None
        self._semaphore: asyncio.Semaphore | None = None
        self._pid = os.getpid()
        self._start_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failovers": 0, "failed_items": 0}

    def __getstate__(self) -> dict[str, Any]:
        # Travels as its settings (TRL may pickle reward functions into another process); the loop and the
        # connections are rebuilt there on first use.
        runtime = {"_replicas", "_turn", "_loop", "_thread", "_http", "_semaphore", "_pid", "_start_lock", "stats"}
        return {k: v for k, v in self.__dict__.items() if k not in runtime}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._pid != os.getpid():  # a forked child has no copy of the parent's thread
            self._init_runtime()
        with self._start_lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="polar-client", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
        return self._loop

    def _client(self):
        import httpx

        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            # trust_env=False: a reward server is addressed directly; HTTP(S)_PROXY settings meant for the internet
            # must not reroute it (the official client disables proxies for the same reason).
            self._http = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                limits=limits,
                trust_env=False,
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._http

    def close(self) -> None:
        """Close the connections and stop the client's thread (it restarts on the next call)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self._http is not None:
            asyncio.run_coroutine_threadsafe(self._http.aclose(), loop).result(timeout=10)
            self._http = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> PolarClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Only stop the loop: awaiting the connections' close here could run on the loop's own thread and deadlock.
        loop = getattr(self, "_loop", None)
        if loop is not None and getattr(self, "_pid", None) == os.getpid():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)

    # ------------------------------------------------------------------------------------------------ public API
    def score(
        self,
        prompts: Sequence[Text],
        references: Sequence[Text],
        candidates: Sequence[Text],
        wrapper: str | Sequence[str] | None = None,
    ) -> list[float | None]:
        """One float per (prompt, reference, candidate), in order; raises `PolarClientError` (with
        ``on_error="none"``: None for the items that failed). ``wrapper``: one for all items or one per item;
        default: the client's."""
        return self._submit(prompts, references, candidates, wrapper).result()

    async def ascore(
        self,
        prompts: Sequence[Text],
        references: Sequence[Text],
        candidates: Sequence[Text],
        wrapper: str | Sequence[str] | None = None,
    ) -> list[float | None]:
        """`score` for async code: awaits without blocking the caller's event loop."""
        return await asyncio.wrap_future(self._submit(prompts, references, candidates, wrapper))

    def _submit(self, prompts, references, candidates, wrapper):
        # All HTTP runs on the client's own loop thread, so sync and async callers of one client share
        # its connection pool and its concurrency limit.
        return asyncio.run_coroutine_threadsafe(
            self._score(prompts, references, candidates, wrapper), self._ensure_loop()
        )

    # ------------------------------------------------------------------------------------------------ internals
    def _payloads(self, prompts, references, candidates, wrapper, failures: dict[int, str]):
        """The requests, each with the indices of its items; an item the backend cannot format is refused, or,
        with on_error="none", recorded in ``failures`` and left out."""
        backend = BACKENDS[self.backend]
        # One wrapper for the call, or one per item (the Scorer protocol's `wrapper`).
        wrappers = [wrapper] * len(candidates) if isinstance(wrapper, str) else list(wrapper)
        if len(wrappers) != len(candidates):
            raise ValueError(f"`wrapper` has {len(wrappers)} entries for {len(candidates)} items; pass one per item.")
        items, owners = [], []
        for i, triple in enumerate(zip(prompts, references, candidates, strict=True)):
            try:
                # Text JSON cannot carry (a lone surrogate) is refused here, naming the field, before any request.
                for name, value in zip(("prompts", "references", "candidates"), triple, strict=True):
                    check_texts(value, f"{name}[{i}]")
                items.append(backend.item(self.template, *triple, wrappers[i]))
                owners.append(i)
            except ValueError as err:
                if self.policy.on_error == "raise":
                    raise ValueError(f"Item at index {i}: {err}") from err
                failures[i] = str(err)
        default = wrappers[0] if wrappers else self.wrapper
        spans = range(0, len(items), self.chunk_size)
        return [
            (
                backend.request(items[at : at + self.chunk_size], self.model_name, default),
                owners[at : at + self.chunk_size],
            )
            for at in spans
        ]

    async def _chunk(self, body: dict, owners: list[int], failures: dict[int, str]) -> list[float | None]:
        try:
            return await self.policy.await_(self._send(body, len(owners)))
        except Exception as err:
            if self.policy.on_error == "raise":
                raise
            for i in owners:
                failures[i] = describe(err)
            return [None] * len(owners)

    async def _score(self, prompts, references, candidates, wrapper) -> list[float]:
        for name, value in (("prompts", prompts), ("references", references), ("candidates", candidates)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"`{name}` must be a list (one entry per item), got {type(value).__name__}.")
        if not len(prompts) == len(references) == len(candidates):
            raise ValueError(
                f"prompts, references and candidates must have the same length, got {len(prompts)}, "
                f"{len(references)} and {len(candidates)}."
            )
        wrapper = wrapper or self.wrapper
        if not candidates:
            return []
        failures: dict[int, str] = {}
        payloads = self._payloads(prompts, references, candidates, wrapper, failures)
        self._client()
        tasks = [asyncio.ensure_future(self._chunk(body, owners, failures)) for body, owners in payloads]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        scores: list[float | None] = [None] * len(candidates)
        for (_, owners), chunk in zip(payloads, results, strict=True):
            for i, score in zip(owners, chunk, strict=True):
                scores[i] = score
        if failures:
            self.stats["failed_items"] += len(failures)
            self.policy.settle(failures, len(candidates), "items", "items")
        return scores

    def _pick(self, avoid: _Replica | None) -> _Replica:
        """The next replica round-robin that is up, preferring one other than ``avoid``; else the one back soonest."""
        now = time.monotonic()
        n = len(self._replicas)
        start = next(self._turn)
        order = [self._replicas[(start + k) % n] for k in range(n)]
        up = [r for r in order if r.down_until <= now]
        for replica in up:
            if replica is not avoid:
                return replica
        if up:
            return up[0]
        return min(order, key=lambda r: r.down_until)

    async def _send(self, body: dict, n: int) -> list[float]:
        import httpx

        tried: list[str] = []
        last: _Failure | None = None
        replica: _Replica | None = None
        for attempt in range(self.max_retries + 1):
            previous = replica
            replica = self._pick(previous)
            if previous is not None:
                self.stats["retries"] += 1
                if replica is not previous:
                    self.stats["failovers"] += 1
            wait = 0.0
            if replica.down_until > time.monotonic() or (last is not None and replica is previous):
                # No healthy replica left: back off before hammering a failing one again.
                wait = min(self.max_backoff, self.backoff * 2 ** max(0, attempt - 1))
                wait *= 0.5 + random.random() / 2  # jitter, so that many clients do not retry in lockstep
                if last is not None and last.retry_after is not None:
                    wait = max(wait, min(last.retry_after, self.max_backoff))
            if wait > 0:
                await asyncio.sleep(wait)
            if replica.url not in tried:
                tried.append(replica.url)
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    response = await self._http.post(replica.url, json=body)
                values = self._check(response, n)
            except _Failure as failure:
                last = failure
            except httpx.TimeoutException as err:
                last = _Failure(f"timed out after {self.timeout:g} s ({type(err).__name__})", retryable=True)
            except httpx.HTTPError as err:
                last = _Failure(f"{type(err).__name__}: {str(err) or 'connection failed'}", retryable=True)
            else:
                replica.failures = 0
                replica.down_until = 0.0
                return values
            replica.failures += 1
            logger.warning("POLAR server %s failed (attempt %d): %s", replica.url, attempt + 1, last)
            if not last.retryable:
                raise PolarClientError(
                    f"POLAR server {replica.url} failed: {last}. Retrying cannot fix this.",
                    [replica.url],
                    str(last),
                    last.status,
                )
            if len(self._replicas) > 1:
                replica.down_until = time.monotonic() + self.cooldown
        raise PolarClientError(
            f"Scoring {n} items failed after {self.max_retries + 1} attempts on {', '.join(tried)}; last error: "
            f"{last}. Check that the server is up (GET /health) and reachable, or raise timeout/max_retries.",
            tried,
            str(last),
            last.status if last else None,
        )

    def _check(self, response: Any, n: int) -> list[float]:
        status = response.status_code
        if status != 200:
            message = _error_message(response)
            retry_after = None
            if status in RETRYABLE_STATUS:
                try:
                    retry_after = float(response.headers.get("retry-after", ""))
                except ValueError:
                    retry_after = None
            if status == 413:
                message += f" (lower chunk_size, now {self.chunk_size})"
            raise _Failure(f"HTTP {status}: {message}", status in RETRYABLE_STATUS, status, retry_after)
        try:
            body = response.json()
        except ValueError:
            # A truncated or garbled answer (e.g. a proxy error page): another attempt may well succeed.
            raise _Failure(f"the answer is not JSON: {response.text[:200]!r}", retryable=True, status=status) from None
        try:
            return parse_scores(self.backend, body, n)
        except ValueError as err:
            raise _Failure(f"bad answer from a {self.backend} server: {err}", False, status) from None


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(body)[:300]
