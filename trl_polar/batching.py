"""The one time-window batcher: items submitted from many threads or coroutines within a short window of each other
are handed together, in one call, to the one thread that does the work.

Used by the reward server (requests' token ids, scored in one model call: `trl_polar.serving.service`) and by the
per-sample adapters (verl's and OpenRLHF's samples, scored in one `PolarReward` call:
`trl_polar.integrations.coalesce`). Items of one batch that share a (prompt, reference) then share its prefix.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


class BatcherClosed(RuntimeError):
    """The batcher is closed (its owner is shutting down): nothing new is taken."""


@dataclass
class _Pending(Generic[Item]):
    item: Item
    cost: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)


class WindowBatcher(Generic[Item]):
    """Runs ``process`` on one thread over batches of the submitted items.

    A batch closes when ``window_s`` has passed since its oldest item arrived, or when the waiting items cost
    ``budget`` (``cost(item)``, 1 each by default); an item costlier than the budget runs alone. ``process`` takes
    the batch's items and returns one result per item, in order; when it raises on a batch of several, each item is
    run alone, so that only the culprit gets the error. An item whose future was cancelled before its batch ran
    is left out.

    Example:
        >>> batcher = WindowBatcher(lambda xs: [x * x for x in xs], window_s=0.01, budget=64)
        >>> [f.result() for f in [batcher.submit(x) for x in range(4)]]
        [0, 1, 4, 9]
        >>> batcher.close()
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Sequence[Any]],
        window_s: float,
        budget: int,
        cost: Callable[[Item], int] | None = None,
        name: str = "polar-batcher",
    ) -> None:
        self.process = process
        self.window_s = window_s
        self.budget = budget
        self.cost = cost or (lambda item: 1)
        self._waiting: collections.deque[_Pending[Item]] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for their batch."""
        return len(self._waiting)

    def submit(self, item: Item) -> concurrent.futures.Future:
        """A future of ``item``'s result; `BatcherClosed` once `close` was called."""
        pending = _Pending(item, self.cost(item))
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._waiting.append(pending)
            self._queued += pending.cost
            self._cond.notify()
        return pending.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new items, run the waiting ones, stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take(self) -> list[_Pending[Item]] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._waiting[0].enqueued + self.window_s
            while not self._closed and self._queued < self.budget and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch: list[_Pending[Item]] = []
            spent = 0
            while self._waiting and (not batch or spent + self._waiting[0].cost <= self.budget):
                pending = self._waiting.popleft()
                self._queued -= pending.cost
                spent += pending.cost
                batch.append(pending)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._process(batch)

    def _process(self, batch: list[_Pending[Item]]) -> None:
        try:
            results = self.process([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"The batch's work returned {len(results)} results for {len(batch)} items.")
        except Exception as err:  # must fail these items, not kill the thread and hang all later ones
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            logger.warning("A batch of %d failed (%s); running its items one by one.", len(batch), err)
            for pending in batch:
                self._process([pending])
            return
        for pending, result in zip(batch, results):
            pending.future.set_result(result)
