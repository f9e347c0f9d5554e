"""Prometheus metrics of one service (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("facejax_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("facejax_request_seconds", "request latency",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        buckets, b = [], 1
        while b <= max_batch:
            buckets.append(b)
            b *= 2
        self.batch_size = Histogram("facejax_batch_size", "images per embedder call",
                                    buckets=buckets, registry=r)
        self.embed_seconds = Histogram("facejax_embed_seconds", "embedder call time",
                                       buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("facejax_queue_depth", "queries waiting or being decoded",
                                 registry=r)
        self.gallery_size = Gauge("facejax_gallery_size", "items in the gallery", registry=r)
        self.rejected = Counter("facejax_overloaded", "queries refused with 503 (queue full)",
                                registry=r)

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.embed_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
