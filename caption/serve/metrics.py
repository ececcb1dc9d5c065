"""The server's Prometheus metrics, in a registry of its own (prometheus_client, text format at
``GET /metrics``): requests by endpoint and status (refusals, timeouts and 499 for clients gone
included), their latency, the size of every batched model call, the images captioned and those
whose captioning failed (counted by :class:`caption.serve.app.Service` after each batch), and
how many images wait for the model."""

from __future__ import annotations

from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters; ``queue_depth`` is read at every scrape."""

    def __init__(self, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("caption_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("caption_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("caption_batch_size", "Images per batched model call (encoder + search)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("caption_images", "Images captioned", registry=self.registry)
        self.model_errors = Counter("caption_model_errors", "Images whose captioning raised an error",
                                    registry=self.registry)
        queue = Gauge("caption_queue_depth", "Images waiting for the model", registry=self.registry)
        queue.set_function(queue_depth)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
