"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge(
            "blip3o_queue_depth", "requests waiting for the scheduler", registry=r
        )
        self.running = Gauge("blip3o_running", "requests the scheduler is stepping", registry=r)
        self.batch_size = Histogram(
            "blip3o_batch_size",
            "rows per session call",
            ["stage"],
            buckets=(1, 2, 3, 4, 6, 8, 16, 32),
            registry=r,
        )
        self.step_seconds = Histogram(
            "blip3o_step_seconds",
            "seconds per session call",
            ["stage"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "blip3o_request_seconds",
            "request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "blip3o_requests", "requests answered", ["endpoint", "status"], registry=r
        )
        self.cancels = Counter("blip3o_cancels", "requests cancelled before finishing", registry=r)
        self.rejections = Counter(
            "blip3o_rejections", "requests shed (queue full, not ready)", ["reason"], registry=r
        )

    def record(self, endpoint: str, status: str, started: float) -> None:
        """One answered request: its count under `endpoint` ("images", "images_stream", "chat",
        "chat_stream") and `status`, its latency since `started` (perf_counter) under the
        endpoint's family (the stream's too)."""
        self.requests.labels(endpoint, status).inc()
        family = endpoint.removesuffix("_stream")
        self.request_seconds.labels(family).observe(time.perf_counter() - started)
