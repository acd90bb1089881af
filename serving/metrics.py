"""Prometheus metrics for both tiers, served by the web tier's GET /metrics.

Web-tier figures are prometheus_client metrics, summed across gunicorn's worker processes by its
multiprocess mode (gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR). The model servers have no
port of their own: each adds its batch figures to one Redis hash, and /metrics reads that hash,
the queue depth and the live servers at scrape time. One scrape sees the whole system.
"""

from __future__ import annotations

import os

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from serving import queue, wire

# `route` is the matched URL rule, never the raw path, so random URLs cannot grow the label set.
REQUESTS = Counter("serving_requests_total", "HTTP requests answered, by route and status", ["route", "status"])
LATENCY = Histogram(
    "serving_request_seconds",
    "Time to answer POST /predict, by status",
    ["status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_HISTOGRAMS = {
    "batch_size": ("serving_batch_size", "Images per predict call", BATCH_SIZE_BUCKETS),
    "model_seconds": ("serving_model_seconds", "Time of one batched predict call", MODEL_SECONDS_BUCKETS),
}
_COUNTERS = {
    "images": "Images the model servers classified",
    "expired": "Images skipped because their client had stopped waiting",
    "malformed": "Queue messages dropped as malformed",
}


def record_batch(r: redis.Redis, size: int, seconds: float, expired: int, malformed: int) -> None:
    """Add one batch's figures to the shared hash (called by the model server)."""
    pipe = r.pipeline(transaction=False)
    if size:  # a batch of only expired or malformed jobs ran no predict
        _observe(pipe, "batch_size", size)
        _observe(pipe, "model_seconds", seconds)
    for name, value in (("images", size), ("expired", expired), ("malformed", malformed)):
        if value:
            pipe.hincrby(wire.STATS, name, value)
    pipe.execute()


def _observe(pipe: redis.client.Pipeline, name: str, value: float) -> None:
    for le in (*_HISTOGRAMS[name][2], "+Inf"):
        if le == "+Inf" or value <= le:
            pipe.hincrby(wire.STATS, f"{name}:{le}", 1)
    pipe.hincrbyfloat(wire.STATS, f"{name}:sum", value)


class _SharedFigures(Collector):
    """Reads the model servers' figures and the queue from Redis on every scrape."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def collect(self):  # noqa: ANN201 (prometheus_client's interface)
        try:
            stats = {k.decode(): float(v) for k, v in self.r.hgetall(wire.STATS).items()}
            depth, live = queue.queue_depth(self.r), queue.live_servers(self.r)
        except redis.RedisError:
            yield GaugeMetricFamily("serving_redis_up", "Whether Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("serving_redis_up", "Whether Redis answered this scrape", value=1)
        yield GaugeMetricFamily("serving_queue_depth", "Images waiting in the queue", value=depth)
        yield GaugeMetricFamily("serving_model_servers", "Model servers with a live heartbeat", value=live)
        for key, (name, doc, bounds) in _HISTOGRAMS.items():
            buckets = [(str(le), stats.get(f"{key}:{le}", 0.0)) for le in (*bounds, "+Inf")]
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=stats.get(f"{key}:sum", 0.0))
        for key, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"serving_{key}", doc, value=stats.get(key, 0.0))


def observe_request(route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(route=route, status=str(status)).inc()
    if route == "/predict":
        LATENCY.labels(status=str(status)).observe(seconds)


def render(r: redis.Redis) -> bytes:
    """The whole text exposition: this tier's metrics from every worker, plus the shared figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # a plain WSGI server in one process
        registry.register(REQUESTS)
        registry.register(LATENCY)
    registry.register(_SharedFigures(r))
    return generate_latest(registry)
