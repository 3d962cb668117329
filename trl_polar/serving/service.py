"""What the routes call: the checks every request passes (key, admission, body), encoding through the scorer's one
encode path, and scoring through the batcher. One per app (``app.state.polar``)."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..scorer import Encoded, EncodeError
from ..template import PolarTemplate
from .batcher import RETRY_AFTER_S, Batcher
from .get_reward import Extracted, OpenRLHFInputError, read_samples
from .metrics import Metrics
from .protocol import POOLING_SHAPES, GetRewardRequest, RequestError, ScoreOptions, ScoreRequest

logger = logging.getLogger(__name__)

_MAX_TEMPLATE_VARIANTS = 16


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


class PolarService:
    """The server's state and work, without HTTP: see `trl_polar.serving.app.create_app` for the arguments."""

    def __init__(
        self,
        scorer: Any,
        *,
        api_key: str | None,
        max_queue: int,
        max_body_bytes: int,
        batch_window_ms: float,
        body_timeout_s: float,
        model_name: str,
        pooling_shape: str = "lmdeploy",
    ) -> None:
        self.max_queue = positive_int("max_queue", max_queue)
        self.max_body_bytes = positive_int("max_body_bytes", max_body_bytes)
        if not batch_window_ms >= 0:
            raise ValueError(f"`batch_window_ms` must be >= 0, got {batch_window_ms!r}.")
        if not body_timeout_s > 0:
            raise ValueError(f"`body_timeout_s` must be a positive number of seconds, got {body_timeout_s!r}.")
        self.body_timeout_s = float(body_timeout_s)
        if not all(hasattr(scorer, name) for name in ("encode_items", "score_ids", "template")):
            raise ValueError(
                f"create_app needs a PolarScorer (with .encode_items, .score_ids and .template), got "
                f"{type(scorer).__name__}."
            )
        self.scorer = scorer
        self.template: PolarTemplate = scorer.template
        # What a request's options may lower but not raise.
        self.limits = {
            "max_length": self.template.max_length,
            "max_response_length": self.template.max_response_length,
        }
        self.api_key = api_key.encode() if api_key else None
        self.model_name = model_name
        if pooling_shape not in POOLING_SHAPES:
            raise ValueError(f"`pooling_shape` must be one of {POOLING_SHAPES}, got {pooling_shape!r}.")
        self.pooling_shape = pooling_shape
        self.in_flight = 0
        self.draining = False
        self.started = time.time()
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: self.in_flight)
        self.batcher = Batcher(scorer, scorer.max_tokens_per_batch, batch_window_ms / 1000.0, self.metrics)
        # Tokenization is CPU work too: off the event loop, overlapping the model's thread. One thread, because a
        # template variant's part cache is used from the calling thread only.
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
        if self.in_flight >= self.max_queue:
            raise RequestError(
                503,
                f"The queue is full ({self.in_flight} requests in flight, --max-queue {self.max_queue}); retry after "
                f"{RETRY_AFTER_S} s, lower the client's concurrency, or add replicas.",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def read_body(self, request: Any) -> bytes:
        """The whole body, within --max-body-bytes (413) and within ``body_timeout_s`` of the headers (408)."""
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
        try:
            return await asyncio.wait_for(self._stream(request, limit, fix), self.body_timeout_s)
        except TimeoutError:
            # The rest of the body may still come; closing the connection keeps it from being read as a request.
            message = (
                f"The body did not arrive within {self.body_timeout_s:g} s; send it at once (or raise --body-timeout)."
            )
            raise RequestError(408, message, "body", {"Connection": "close"}) from None

    @staticmethod
    async def _stream(request: Any, limit: int, fix: str) -> bytes:
        # Content-Length can be absent (chunked uploads) or wrong: count what actually arrives.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"The body exceeds the limit of {limit} bytes; {fix}.", "body")
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------------------------------------------ work
    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on the encode thread."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder, fn, *args)

    async def score(self, ids: list[list[int]], keys: list[Any]) -> list[float]:
        scores = await self.batcher.score(ids, keys)
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
