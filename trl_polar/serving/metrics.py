"""What ``GET /metrics`` shows, kept by ``prometheus_client`` in a registry of the app's own (several apps in one
process, as in the tests, do not share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOKEN_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, histograms and gauges; updated from the event loop and from the batch worker
    (``prometheus_client`` metrics are thread-safe)."""

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "polar_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"],
            registry=registry,
        )  # fmt: skip
        self.items = Counter("polar_items", "Items scored, by endpoint.", ["endpoint"], registry=registry)
        self.truncated = Counter(
            "polar_truncated_items", "Items the template truncated to max_length/max_response_length.",
            registry=registry,
        )  # fmt: skip
        self.batches = Counter("polar_batches", "Batches the worker scored (one scorer call each).", registry=registry)
        self.batch_failures = Counter("polar_batch_failures", "Batches whose scorer call raised.", registry=registry)
        self.scoring_seconds = Counter(
            "polar_scoring_seconds", "Time the worker spent in the scorer.", registry=registry
        )
        self.batch_requests = Histogram(
            "polar_batch_requests", "Requests per batch.", buckets=SIZE_BUCKETS, registry=registry
        )
        self.batch_items = Histogram("polar_batch_items", "Items per batch.", buckets=SIZE_BUCKETS, registry=registry)
        self.batch_tokens = Histogram(
            "polar_batch_tokens", "Tokens per batch.", buckets=TOKEN_BUCKETS, registry=registry
        )
        self.latency = Histogram(
            "polar_request_latency_seconds", "Time from arrival to answer, by endpoint.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        depth = Gauge("polar_queue_depth", "Requests waiting for the batch worker.", registry=registry)
        depth.set_function(queue_depth)
        flight = Gauge(
            "polar_in_flight_requests", "Requests admitted and not yet answered (limit: --max-queue).",
            registry=registry,
        )  # fmt: skip
        flight.set_function(in_flight)

    def request(self, endpoint: str, status: int, seconds: float, items: int = 0, truncated: int = 0) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.items.labels(endpoint).inc(items)
        self.truncated.inc(truncated)
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, requests: int, items: int, tokens: int, seconds: float, failed: bool = False) -> None:
        self.batches.inc()
        if failed:
            self.batch_failures.inc()
        self.batch_requests.observe(requests)
        self.batch_items.observe(items)
        self.batch_tokens.observe(tokens)
        self.scoring_seconds.inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
