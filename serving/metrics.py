"""Prometheus metrics for both tiers, served by the web tier's GET /metrics.

Web-tier figures are prometheus_client metrics, summed across gunicorn's worker processes by its
multiprocess mode (gunicorn_conf.py sets PROMETHEUS_MULTIPROC_DIR). The model servers have no
port of their own: each adds its batch figures to its model's Redis hash, and /metrics reads those
hashes, the queue depths and the live servers at scrape time, labelled by model and version. One
scrape sees the whole system.
"""

from __future__ import annotations

import os

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from serving import registry, wire
from serving.admission import Estimate
from serving.clock import RedisClock

# `route` is the matched URL rule, never the raw path, so random URLs cannot grow the label set.
REQUESTS = Counter("serving_requests_total", "HTTP requests answered, by route and status", ["route", "status"])
# Inference requests by the model version they went to ("" when none was chosen, e.g. a bad upload).
LATENCY = Histogram(
    "serving_request_seconds",
    "Time to answer an inference request (POST /predict, or the Open Inference Protocol's infer)",
    ["route", "model", "version", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Requests the web tier turned away before queueing them; `reason` is one of REFUSALS' keys.
REFUSED = Counter(
    "serving_refused_total", "Requests refused at admission, before queueing, by reason", ["model", "version", "reason"]
)
REFUSALS = {
    "wait": "503 overloaded: the predicted wait is longer than the request's deadline allows",
    "queue_limit": "503 overloaded: the queue holds QUEUE_LIMIT images (the memory cap)",
    "no_server": "503 unavailable: no model server has been alive for NO_SERVER_GRACE_S",
    "deadline": "504 timeout: even with an empty queue the answer could not come before the deadline",
}

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_HISTOGRAMS = {
    "batch_size": ("serving_batch_size", "Images per predict call", BATCH_SIZE_BUCKETS),
    "model_seconds": ("serving_model_seconds", "Time of one batched predict call", MODEL_SECONDS_BUCKETS),
}
# The model servers' counters; record_batch takes each by its key.
COUNTERS = {
    "images": "Images the model servers classified",
    "expired": "Images skipped because their deadline had passed when taken",
    "late": "Images answered 'late' before compute: their answer could not have arrived before the deadline",
    "finished_late": "Images computed and answered after their deadline all the same",
    "malformed": "Queue messages dropped as malformed",
    "model_changed": "Images refused because they were prepared for another input shape of the model",
}


def record_batch(r: redis.Redis, keys: wire.ModelKeys, size: int, seconds: float, **counts: int) -> None:
    """Add one batch's figures to its model's hash (called by the model server); counts are COUNTERS."""
    pipe = r.pipeline(transaction=False)
    if size:  # a batch of only expired or malformed jobs ran no predict
        _observe(pipe, keys, "batch_size", size)
        _observe(pipe, keys, "model_seconds", seconds)
    for name, value in {"images": size, **counts}.items():
        if name not in COUNTERS:
            raise ValueError(f"no counter {name!r}")
        if value:
            pipe.hincrby(keys.stats, name, value)
    pipe.execute()


def _observe(pipe: redis.client.Pipeline, keys: wire.ModelKeys, name: str, value: float) -> None:
    for le in (*_HISTOGRAMS[name][2], "+Inf"):
        if le == "+Inf" or value <= le:
            pipe.hincrby(keys.stats, f"{name}:{le}", 1)
    pipe.hincrbyfloat(keys.stats, f"{name}:sum", value)


_LABELS = ["model", "version"]


class _SharedFigures(Collector):
    """Reads every model's figures, queue and servers from Redis on every scrape."""

    def __init__(self, r: redis.Redis, clock: RedisClock) -> None:
        self.r = r
        self.clock = clock

    def collect(self):  # noqa: ANN201 (prometheus_client's interface)
        try:
            models = self._read()
        except redis.RedisError:
            yield GaugeMetricFamily("serving_redis_up", "Whether Redis answered this scrape", value=0)
            return
        yield GaugeMetricFamily("serving_redis_up", "Whether Redis answered this scrape", value=1)
        depth = GaugeMetricFamily("serving_queue_depth", "Images waiting in the queue", labels=_LABELS)
        wait = GaugeMetricFamily(
            "serving_wait_estimate_seconds",
            "Predicted wait of a new one-image request, from the servers' published speeds and the queue",
            labels=_LABELS,
        )
        live = GaugeMetricFamily("serving_model_servers", "Model servers with a live heartbeat", labels=_LABELS)
        families = {
            key: HistogramMetricFamily(name, doc, labels=_LABELS) for key, (name, doc, _) in _HISTOGRAMS.items()
        }
        counters = {key: CounterMetricFamily(f"serving_{key}", doc, labels=_LABELS) for key, doc in COUNTERS.items()}
        for keys, stats, state in models:
            labels = [keys.name, str(keys.version)]
            depth.add_metric(labels, state.queued)
            live.add_metric(labels, state.live_servers)
            estimate = Estimate(state.speeds, state.held)
            if estimate.known:  # no sample rather than a made-up one until a server has measured itself
                wait.add_metric(labels, estimate.wait_s(state.queued + 1))
            for key, (_, _, bounds) in _HISTOGRAMS.items():
                buckets = [(str(le), stats.get(f"{key}:{le}", 0.0)) for le in (*bounds, "+Inf")]
                families[key].add_metric(labels, buckets, sum_value=stats.get(f"{key}:sum", 0.0))
            for key in COUNTERS:
                counters[key].add_metric(labels, stats.get(key, 0.0))
        yield from (depth, live, wait, *families.values(), *counters.values())

    def _read(self) -> list[tuple[wire.ModelKeys, dict[str, float], registry.ModelState]]:
        """Each known version's figures and state, in a few round trips whatever their number (as the
        catalog reads them: registry.states)."""
        versions = registry.known_models(self.r, self.clock.now())
        pipe = self.r.pipeline(transaction=False)
        for keys in versions:
            pipe.hgetall(keys.stats)
        stats = [{k.decode(): float(v) for k, v in raw.items()} for raw in pipe.execute()]
        return list(zip(versions, stats, registry.states(self.r, versions), strict=True))


def refused(keys: wire.ModelKeys, reason: str) -> None:
    if reason not in REFUSALS:
        raise ValueError(f"no refusal reason {reason!r}")
    REFUSED.labels(model=keys.name, version=str(keys.version), reason=reason).inc()


def observe_request(route: str, status: int, seconds: float, model: wire.ModelKeys | None = None) -> None:
    REQUESTS.labels(route=route, status=str(status)).inc()
    if route == "/predict" or route.endswith("/infer"):
        name, version = (model.name, str(model.version)) if model else ("", "")
        LATENCY.labels(route=route, model=name, version=version, status=str(status)).observe(seconds)


def render(r: redis.Redis, clock: RedisClock) -> bytes:
    """The whole text exposition: this tier's metrics from every worker, plus the shared figures."""
    collected = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(collected)
    else:  # a plain WSGI server in one process
        for metric in (REQUESTS, LATENCY, REFUSED):
            collected.register(metric)
    collected.register(_SharedFigures(r, clock))
    return generate_latest(collected)
