"""Per-sample reward calls scored together: frameworks that call a reward function once per sample (verl's reward
loop, OpenRLHF's executor) do so from many threads or coroutines at once; scoring each alone would lose POLAR's
shared-prefix batching. `Coalescer` gathers the calls that arrive within a short window into one
`PolarReward.evaluate` call, on the one time-window batcher (`trl_polar.batching`) the server uses too.

It works before encoding, on (prompt, reference, completion) triples, so that everything `PolarReward` does (think
stripping, baseline, clipping, a remote client) applies unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass
from typing import Any

from ..batching import WindowBatcher


@dataclass
class Scored:
    """One sample's outcome: its reward and raw score, or the reason it got none."""

    reward: float | None
    raw: float | None
    failure: str | None = None


class Coalescer:
    """Scores the samples submitted within ``window_s`` of the first waiting one in one call of ``reward``.

    ``reward`` is a `PolarReward` built with ``on_error="none"``: a sample that fails gets its reason back and the
    others of its batch are still scored; the caller applies its own policy to its own sample.
    """

    def __init__(self, reward: Any, window_s: float = 0.01, max_items: int = 4096) -> None:
        self.reward = reward
        self.batches: collections.Counter[int] = collections.Counter()  # batch size -> how many (for the logs)
        self._batcher = WindowBatcher(self._score, window_s, budget=max_items, name="polar-coalescer")

    def submit(self, prompt: Any, completion: Any, reference: Any) -> concurrent.futures.Future:
        """A future of the sample's `Scored`."""
        return self._batcher.submit((prompt, completion, reference))

    def _score(self, batch: list[tuple[Any, Any, Any]]) -> list[Scored]:
        self.batches[len(batch)] += 1
        prompts, completions, references = (list(column) for column in zip(*batch))
        outcome = self.reward.evaluate(prompts, completions, references)
        return [Scored(outcome.rewards[k], outcome.raw[k], outcome.failures.get(k)) for k in range(len(batch))]
