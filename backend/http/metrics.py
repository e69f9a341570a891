"""Prometheus metrics (prometheus_client), correct across gunicorn worker processes.

When PROMETHEUS_MULTIPROC_DIR is set (gunicorn.conf.py sets it), every process writes its samples
there and a scrape of any worker sums them. Queue depth, workers alive and failed jobs are read from
Redis at scrape time.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

REQUESTS = Counter("sam_http_requests_total", "HTTP requests by route and status", ["route", "status"])
LATENCY = Histogram(
    "sam_http_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
CACHE = Counter("sam_embedding_cache_total", "Embedding lookups by result (hit or miss)", ["result"])
ENCODE = Histogram(
    "sam_encoder_seconds", "SAM image-encoder time per image", buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120)
)
DECODE = Histogram(
    "sam_decoder_seconds", "SAM prompt-decoder time per request", buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1)
)
PREDICT_ERRORS = Counter("sam_task_errors_total", "Tasks answered with an error, by HTTP status", ["status"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


class QueueCollector:
    """Reads queue figures from the predictor's status at scrape time (INFERENCE=queue only)."""

    def __init__(self, status: dict) -> None:
        self.status = status

    def collect(self):
        if "workers" in self.status:
            yield GaugeMetricFamily("sam_workers_alive", "Inference workers alive", value=self.status["workers"])
        if "queued" in self.status:
            depth = GaugeMetricFamily("sam_queue_depth", "Jobs waiting per queue", labels=["queue"])
            for name, count in self.status["queued"].items():
                depth.add_metric([name], count)
            yield depth
        if "failed_jobs" in self.status:
            yield GaugeMetricFamily(
                "sam_jobs_failed", "Jobs in the failed-job registries", value=self.status["failed_jobs"]
            )


def render(status: dict) -> bytes:
    """The text exposition of every metric, summed over processes when running under gunicorn."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    queue = QueueCollector(status)
    registry.register(queue)
    try:
        return generate_latest(registry)
    finally:
        registry.unregister(queue)
