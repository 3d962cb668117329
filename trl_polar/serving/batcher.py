"""Dynamic batching: the one thread that runs the model, scoring the requests queued together in one scorer call.

Items of *different* requests that share a (prompt, reference) then share the prefix computation. The model never
runs on the event loop, and only this thread ever runs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError
from .metrics import Metrics

logger = logging.getLogger(__name__)

# Seconds a client is asked to wait after a 503; the queue drains in about one batch, so a second is plenty.
RETRY_AFTER_S = 1


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

    A batch closes when ``window_s`` has passed since its oldest job arrived, or when the queued jobs hold
    ``max_tokens_per_batch`` tokens (counted whole: with shared prefixes the scorer runs them in fewer); a single job
    larger than the budget runs alone (the scorer splits it into micro-batches).
    """

    def __init__(
        self, scorer: Any, max_tokens_per_batch: int, window_s: float, metrics: Metrics | None = None
    ) -> None:
        self.scorer = scorer
        self.max_tokens_per_batch = max_tokens_per_batch
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
            while not self._closed and self._queued_tokens < self.max_tokens_per_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Job] = []
            tokens = 0
            while self._jobs and (not batch or tokens + self._jobs[0].tokens <= self.max_tokens_per_batch):
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
