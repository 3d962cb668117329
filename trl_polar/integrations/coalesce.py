"""Per-sample reward calls scored together: frameworks that call a reward function once per sample (verl's reward
loop, OpenRLHF's executor) do so from many threads or coroutines at once; scoring each alone would lose POLAR's
shared-prefix batching. `Coalescer` gathers the calls that arrive within a short window into one
`PolarReward.evaluate` call.

The server's batcher (`trl_polar.serving.batcher`) does the same for encoded requests on an event loop; this one
works before encoding, on (prompt, reference, completion) triples, so that everything `PolarReward` does (think
stripping, baseline, clipping, a remote client) applies unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    """One sample's outcome: its reward and raw score, or the reason it got none."""

    reward: float | None
    raw: float | None
    failure: str | None = None


@dataclass
class _Item:
    prompt: Any
    completion: Any
    reference: Any
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)


class Coalescer:
    """Scores the samples submitted within ``window_s`` of the first waiting one in one call of ``reward``.

    ``reward`` is a `PolarReward` built with ``on_error="none"``: a sample that fails gets its reason back and the
    others of its batch are still scored; the caller applies its own policy to its own sample.
    """

    def __init__(self, reward: Any, window_s: float = 0.01, max_items: int = 4096) -> None:
        self.reward = reward
        self.window_s = window_s
        self.max_items = max_items
        self.batches: collections.Counter[int] = collections.Counter()  # batch size -> how many (for the logs)
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="polar-coalescer", daemon=True)
        self._thread.start()

    def submit(self, prompt: Any, completion: Any, reference: Any) -> concurrent.futures.Future:
        """A future of the sample's `Scored`."""
        item = _Item(prompt, completion, reference)
        with self._cond:
            self._items.append(item)
            self._cond.notify()
        return item.future

    def _take(self) -> list[_Item]:
        with self._cond:
            while not self._items:
                self._cond.wait()
            deadline = self._items[0].enqueued + self.window_s
            while len(self._items) < self.max_items and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            return [self._items.popleft() for _ in range(min(len(self._items), self.max_items))]

    def _run(self) -> None:
        while True:
            batch = [item for item in self._take() if item.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self._score(batch)

    def _score(self, batch: list[_Item]) -> None:
        self.batches[len(batch)] += 1
        try:
            outcome = self.reward.evaluate(
                [i.prompt for i in batch], [i.completion for i in batch], [i.reference for i in batch]
            )
        except Exception as err:  # must fail these samples, not kill the thread and hang all later ones
            if len(batch) > 1:
                # One sample can break a shared call (a reference the reward refuses): score each alone, so that
                # only the culprit gets the error.
                logger.warning("A batch of %d samples failed (%s); scoring them one by one.", len(batch), err)
                for item in batch:
                    self._score([item])
                return
            batch[0].future.set_exception(err)
            return
        for k, item in enumerate(batch):
            item.future.set_result(Scored(outcome.rewards[k], outcome.raw[k], outcome.failures.get(k)))
