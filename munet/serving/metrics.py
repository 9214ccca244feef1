"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client``: request counts by endpoint and
status, request latency, batch sizes in images and requests, and the queue's depth."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """One server's metrics, in a registry of its own (several servers may live in one process, as in the tests).

    Attributes:
        requests: ``munet_serve_requests_total{endpoint, status}``.
        latency: ``munet_serve_request_seconds{endpoint}``, from the request's arrival to its answer.
        batch_images: ``munet_serve_batch_images``, images per forward batch.
        batch_requests: ``munet_serve_batch_requests``, requests merged into one forward batch.
        queued: ``munet_serve_queued_requests``, requests waiting for a batch.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("munet_serve_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("munet_serve_request_seconds", "Request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("munet_serve_batch_images", "Images per forward batch", buckets=SIZE_BUCKETS,
                                      registry=self.registry)
        self.batch_requests = Histogram("munet_serve_batch_requests", "Requests per forward batch",
                                        buckets=SIZE_BUCKETS, registry=self.registry)
        self.queued = Gauge("munet_serve_queued_requests", "Requests waiting for a batch", registry=self.registry)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Counts one answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
