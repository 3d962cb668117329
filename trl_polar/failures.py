"""The one failure policy of every reward path: what happens to an item that cannot get its reward.

An item fails when its input cannot be read (a label without a reference, a query that does not hold its prompt),
when scoring raises (a server that stays down), or when its score takes longer than ``score_timeout`` seconds.
``on_error`` then decides:

- ``"raise"`` (the default): the call raises `ItemFailure`, naming the first failed item, its field and the cause;
- ``"none"``: the item gets None, each framework's own "no reward for this item" where it has one (TRL and ms-swift
  skip it); OpenRLHF has no such state, so it gets the finite ``TRL_POLAR_FAILURE_REWARD`` instead
  (`trl_polar.serving.get_reward`), and verl a score of 0.0 (see `trl_polar.integrations.verl`). The failures
  are counted where the framework logs (TRL ``log_metric``, OpenRLHF ``extra_logs``, verl ``reward_extra_info``) and
  logged as a warning. Never a silent 0.

`PolarReward`, `PolarClient`, the verl, OpenRLHF and ms-swift adapters and the server's ``/get_reward`` all take
their outcome from `FailurePolicy`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "none")


class ItemFailure(RuntimeError):
    """One or more items got no reward and ``on_error="raise"``.

    Attributes:
        failures: ``{index: reason}`` of every failed item of the call.
        field: the field of the first failed item as the caller names it (``labels[3]``, ``completions[0]``).
    """

    def __init__(self, message: str, failures: Mapping[int, str], field: str = "") -> None:
        super().__init__(message)
        self.failures = dict(failures)
        self.field = field


class ScoreTimeout(TimeoutError):
    """Scoring took longer than ``score_timeout``."""


@dataclass(frozen=True)
class FailurePolicy:
    """What a reward path does with an item it cannot score.

    Args:
        on_error: "raise" (default) raises `ItemFailure`; "none" gives the item None and counts it.
        score_timeout: seconds an item may wait for its score, retries included (None: no limit).

    Example::

        PolarReward("path/to/polar-rm", on_error="none", score_timeout=60)  # TRL: None + polar_reward/failed_frac
        PolarClient(url="http://rm-host:8000", on_error="none")  # None per failed item, stats["failed_items"]
        # verl, OpenRLHF, ms-swift: TRL_POLAR_ON_ERROR=none TRL_POLAR_SCORE_TIMEOUT=60
    """

    on_error: str = field(
        default="raise", metadata={"help": "'raise' stops on an item that cannot be scored; 'none' gives it None."}
    )
    score_timeout: float | None = field(
        default=None, metadata={"help": "Seconds an item may wait for its score, retries included (None: no limit)."}
    )

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(
                f"`on_error` must be one of {ON_ERROR}, got {self.on_error!r}: 'raise' stops on an item that cannot "
                "be scored, 'none' gives it no reward (None) and counts it."
            )
        if self.score_timeout is not None and (
            isinstance(self.score_timeout, bool)
            or not isinstance(self.score_timeout, (int, float))
            or not self.score_timeout > 0
        ):
            raise ValueError(
                f"`score_timeout` must be a positive number of seconds or None, got {self.score_timeout!r}."
            )

    def settle(
        self,
        failures: Mapping[int, str],
        total: int,
        what: str,
        field: str = "items",
        fields: Mapping[int, str] | None = None,
    ) -> None:
        """Apply the policy to a call's failures (``{index: reason}`` of ``total`` items): raise, or warn once. The
        first failed item is named ``field[index]``, or by ``fields[index]`` where given."""
        if not failures:
            return
        first = min(failures)
        where = (fields or {}).get(first, f"{field}[{first}]")
        summary = f"{len(failures)} of {total} {what} got no reward; first, {where}: {failures[first]}"
        if self.on_error == "raise":
            raise ItemFailure(
                f"{summary}. Fix the input, or pass on_error='none' to give such items no reward (None) and count "
                "them.",
                failures,
                where,
            )
        logger.warning("%s (on_error='none': they get None).", summary)

    def wait(self, future: concurrent.futures.Future) -> Any:
        """The result of ``future`` within ``score_timeout``; `ScoreTimeout` past it."""
        try:
            return future.result(timeout=self.score_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ScoreTimeout(self._timeout_message()) from None

    async def await_(self, awaitable: Any) -> Any:
        """``await awaitable`` within ``score_timeout``; `ScoreTimeout` past it."""
        try:
            return await asyncio.wait_for(awaitable, self.score_timeout)
        except TimeoutError:
            raise ScoreTimeout(self._timeout_message()) from None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` within ``score_timeout``: on the caller's thread when there is no limit; with one, on the
        process's pool of scoring threads (started once, reused), as a running model call cannot be interrupted: its
        late answer is dropped."""
        if self.score_timeout is None:
            return fn(*args)
        return self.wait(_timed_pool().submit(fn, *args))

    def _timeout_message(self) -> str:
        return (
            f"no score within score_timeout={self.score_timeout} s; raise score_timeout, or check that the scorer "
            "(or reward server) keeps up"
        )


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _timed_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run calls under a ``score_timeout`` (a few: a call past its limit still holds one)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="polar-score")
        return _POOL


def describe(err: BaseException) -> str:
    """An exception as the one-line reason stored for a failed item."""
    text = str(err) or type(err).__name__
    return text if isinstance(err, (ValueError, ScoreTimeout)) else f"{type(err).__name__}: {text}"
