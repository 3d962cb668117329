"""The server's counters, gauges and histograms in the Prometheus text format (written here: no extra dependency)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence


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
    """What ``GET /metrics`` shows. Updated from the event loop and from the batch worker, hence the lock."""

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
