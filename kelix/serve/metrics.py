"""``/metrics``: Prometheus text from ``prometheus_client`` (a registry per server, so tests and
several apps in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Requests and errors by kind, queue depth, batch sizes, latency, tokens/s and images/s."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kelix_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("kelix_errors", "refused or failed requests, by OpenAI error type and code",
                              ["type", "code"], registry=r)
        self.cancelled = Counter("kelix_cancelled", "requests whose client left or whose timeout passed",
                                 ["reason"], registry=r)
        self.queue_depth = Gauge("kelix_queue_depth", "requests waiting or running", registry=r)
        self.batch_size = Histogram("kelix_batch_size", "requests per batched forward", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.latency = Histogram("kelix_request_latency_seconds", "time from arrival to the last byte's hand-off",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.produced = Counter("kelix_generated", "answer blocks (tokens) and images produced", ["what"],
                                registry=r)
        self.rate = Gauge("kelix_generated_per_second", "tokens/s or images/s of the last batch", ["what"],
                          registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
