"""What the routes call: the checks every request passes (key, admission, body), encoding through the scorer's one
encode path, and scoring through the batcher. One per app (``app.state.polar``)."""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..batching import BatcherClosed, WindowBatcher
from ..scorer import Encoded, EncodeError
from ..template import PolarTemplate
from .errors import RequestError
from .get_reward import Extracted, OpenRLHFInputError, read_samples
from .metrics import Metrics
from .protocol import GetRewardRequest, ScoreOptions, ScoreRequest
from .settings import ServeSettings

logger = logging.getLogger(__name__)

_MAX_TEMPLATE_VARIANTS = 16
# Seconds a client is asked to wait after a 503; the queue drains in about one batch, so a second is plenty.
RETRY_AFTER_S = 1


@dataclass
class Job:
    """One request's encoded items, waiting for the model thread."""

    ids: list[list[int]]
    keys: list[Any]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def score_jobs(scorer: Any, jobs: list[Job], metrics: Metrics | None = None) -> list[list[float]]:
    """The scores of several requests' items in one scorer call (the model thread's work): items of different
    requests that share a (prompt, reference) share the prefix computation."""
    ids = [x for job in jobs for x in job.ids]
    started, failed = time.perf_counter(), True
    try:
        scores = scorer.score_ids(ids, [k for job in jobs for k in job.keys])
        if len(scores) != len(ids):
            raise RuntimeError(f"The scorer returned {len(scores)} scores for {len(ids)} items.")
        failed = False
    finally:
        if metrics is not None:
            metrics.batch(len(jobs), len(ids), sum(map(len, ids)), time.perf_counter() - started, failed=failed)
    out, at = [], 0
    for job in jobs:
        out.append(list(scores[at : at + len(job.ids)]))
        at += len(job.ids)
    return out


class PolarService:
    """The server's state and work, without HTTP: one per app (``app.state.polar``)."""

    def __init__(self, scorer: Any, settings: ServeSettings) -> None:
        if not all(hasattr(scorer, name) for name in ("encode_items", "score_ids", "template")):
            raise ValueError(
                f"create_app needs a PolarScorer (with .encode_items, .score_ids and .template), got "
                f"{type(scorer).__name__}."
            )
        self.settings = settings
        self.scorer = scorer
        self.template: PolarTemplate = scorer.template
        # What a request's options may lower but not raise.
        self.limits = {
            "max_length": self.template.max_length,
            "max_response_length": self.template.max_response_length,
        }
        self.api_key = settings.api_key.encode() if settings.api_key else None
        source = getattr(getattr(scorer, "model", None), "name_or_path", None) or "polar"
        self.model_name = settings.model_name or os.path.basename(str(source).rstrip("/")) or "polar"
        self.in_flight = 0
        self.receiving = 0
        self.draining = False
        self.started = time.time()
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: self.in_flight)
        # The one thread that runs the model. A batch closes after the window, or at the scorer's token budget
        # (counted whole: with shared prefixes the scorer runs them in fewer); a larger request runs alone.
        self.batcher = WindowBatcher(
            functools.partial(score_jobs, scorer, metrics=self.metrics),
            settings.batch_window_ms / 1000.0,
            budget=scorer.max_tokens_per_batch,
            cost=lambda job: job.tokens,
        )
        # Tokenization is CPU work too: off the event loop, overlapping the model's thread. One thread, because a
        # template variant's part cache is used from the calling thread only.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polar-encode")
        self._templates: collections.OrderedDict[tuple, PolarTemplate] = collections.OrderedDict()

    # ------------------------------------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self.draining = True
        self.batcher.close()
        self.encoder.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------------ checks
    def check_key(self, given: str | None) -> None:
        if self.api_key is None:
            return
        # compare_digest on bytes of any length: the time taken does not reveal how much of the key matched.
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.api_key):
            raise RequestError(
                401,
                "Missing or wrong API key: send `Authorization: Bearer <key>` (PolarClient(api_key=...)).",
                "Authorization",
                {"WWW-Authenticate": "Bearer"},
            )

    def check_open(self) -> None:
        if self.draining:
            raise RequestError(
                503,
                "The server is shutting down; retry on another replica.",
                headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
            )

    def admit(self) -> None:
        """Count a request whose body is in against --max-queue (a client still sending holds no place)."""
        self.check_open()
        if self.in_flight >= self.settings.max_queue:
            raise RequestError(
                503,
                f"The queue is full ({self.in_flight} requests in flight, --max-queue {self.settings.max_queue}); "
                f"retry after "
                f"{RETRY_AFTER_S} s, lower the client's concurrency, or add replicas.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    def check_limits(self, options: ScoreOptions | None) -> None:
        """Refuse options that raise the template's limits (a request may lower them), before any work."""
        above = options.above(self.limits) if options is not None else None
        if above is not None:
            raise RequestError(422, above[1], above[0])

    # ------------------------------------------------------------------------------------------------ work
    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the encode thread."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder, fn, *args)

    async def score(self, ids: list[list[int]], keys: list[Any]) -> list[float]:
        try:
            future = self.batcher.submit(Job(ids, keys))
        except BatcherClosed:
            self.check_open()
            raise
        # A client that goes away cancels its future: if its batch has not started, it is left out.
        scores = await asyncio.wrap_future(future)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            message = f"The model produced non-finite scores for items {bad[:10]}; check the checkpoint."
            raise RequestError(500, message)
        return [float(s) for s in scores]

    def template_for(self, overrides: tuple) -> PolarTemplate | None:
        """The template variant of a request's options (cached), or None for the server's own."""
        if not overrides:
            return None
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

    def encode_score(self, req: ScoreRequest) -> Encoded:
        """Ids, prefix-group keys and the truncated count of a /score request (runs on the encode thread)."""
        options = req.options or ScoreOptions()
        overrides = options.template_overrides()
        wrappers = [item.wrapper or options.wrapper for item in req.items]
        columns = ([item.prompt for item in req.items], [item.reference for item in req.items])
        return self._encode(*columns, [item.candidate for item in req.items], wrappers, overrides, "items")

    def encode_get_reward(self, req: GetRewardRequest) -> tuple[Extracted, list[int], Encoded]:
        """The same for /get_reward: OpenRLHF's samples read by the OpenRLHF adapter's own reading (so the reward
        file and this route score alike). A sample that cannot be read or encoded is recorded in the samples'
        ``failures``, not refused: OpenRLHF drops the body of any non-200 answer. Returns the samples, the indices
        encoded, and their encoding."""
        try:
            samples = read_samples(req.query, req.prompts, req.labels)
        except OpenRLHFInputError as err:
            raise RequestError(422, str(err), err.field) from None
        ok = samples.ok
        while ok:
            columns = ([samples.prompts[i] for i in ok], [samples.references[i] for i in ok])
            try:
                return samples, ok, self._encode(*columns, [samples.responses[i] for i in ok], "sft", (), "query")
            except RequestError as err:  # names the item by its position among `ok`: set it aside, encode the rest
                bad = ok.pop(int(err.field[len("query[") : -1]))
                samples.failures[bad] = (f"query[{bad}]", f"query[{bad}]: {err.message.split(': ', 1)[-1]}")
        return samples, ok, Encoded([], [], 0)

    def _encode(self, prompts, references, candidates, wrappers, overrides: tuple, name: str) -> Encoded:
        try:
            enc = self.scorer.encode_items(
                prompts, references, candidates, wrappers, template=self.template_for(overrides)
            )
        except EncodeError as err:
            raise RequestError(422, f"`{name}[{err.index}]`: {err.reason}", f"{name}[{err.index}]") from None
        # Items of one (prompt, reference, wrapper) and one template share their prefix, across requests too.
        return Encoded(enc.input_ids, [(*key, overrides) for key in enc.group_keys], enc.truncated)

    def encode_texts(self, inputs: list[Any], name: str, single: bool = False) -> tuple[list[list[int]], list[Any]]:
        """Ids and group keys of formatted texts (the request's field ``name``, one input rather than a list when
        ``single``), tokenized as an lmdeploy, vLLM or SGLang server does (special tokens on)."""
        template = self.template
        texts = [x for x in inputs if isinstance(x, str)]
        encoded = iter(template.tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
        ids, keys = [], []
        for i, value in enumerate(inputs):
            seq = list(next(encoded)) if isinstance(value, str) else list(value)
            self._check_sequence(seq, name if single else f"{name}[{i}]", tokenized=isinstance(value, str))
            ids.append(seq)
            # The text before the separator is P + "\n" + REF: equal texts there mean a shared prefix.
            if isinstance(value, str) and template.separator in value:
                keys.append(("text", value.split(template.separator, 1)[0]))
            else:
                keys.append(None)
        return ids, keys

    def _check_sequence(self, seq: list[int], where: str, tokenized: bool) -> None:
        template = self.template
        if not seq or seq[-1] != template.reward_token_id:
            raise RequestError(
                422,
                f"`{where}` does not end with the reward token {template.reward_token!r} (id "
                f"{template.reward_token_id}); the model reads its score there. Build the text with "
                "PolarTemplate.format(prompt, reference, candidate), which appends it.",
                where,
            )
        if len(seq) > template.max_length:
            raise RequestError(
                422,
                f"`{where}` has {len(seq)} tokens, over max_length={template.max_length}; PolarTemplate.format "
                "truncates to fit.",
                where,
            )
        if not tokenized and (min(seq) < 0 or max(seq) >= len(template.tokenizer)):
            message = f"`{where}` has token ids outside the vocabulary (0..{len(template.tokenizer) - 1})."
            raise RequestError(422, message, where)
