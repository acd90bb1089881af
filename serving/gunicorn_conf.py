"""Gunicorn configuration for the web tier (python web_server.py starts gunicorn with it)."""

import gc
import os
import resource
import shutil
import tempfile

from gunicorn.glogging import Logger

from settings import Settings

settings = Settings.from_env()
# Each worker writes its metrics to files here and /metrics sums them, whichever worker answers.
# Set before any worker imports prometheus_client; a fresh directory per start, so no stale figures.
METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="serving-metrics-")

bind = f"0.0.0.0:{settings.port}"
workers = settings.web_workers
# Each request spends nearly all its time waiting on Redis for its answer: gevent lets one
# worker hold any number of those at once for the cost of a greenlet and a file descriptor each,
# so the open-file limit is what caps a worker's connections (raised to the hard limit here,
# inherited by the workers; RESERVED_FDS are left for Redis connections, logs and metrics files).
worker_class = "serving.gunicorn_worker.Worker"
RESERVED_FDS = 200
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
worker_connections = max(100, _hard - RESERVED_FDS)
# Connections not yet accepted wait here; the kernel caps it at net.core.somaxconn (4096 here).
backlog = 65535
# On SIGTERM a worker stops accepting and gets this long to finish the requests it holds,
# which by then wait at most REQUEST_TIMEOUT_S for their answer.
graceful_timeout = int(settings.request_timeout_s) + 5
timeout = int(settings.request_timeout_s) + 30
keepalive = 30  # load balancers and stress_test.py reuse connections
accesslog = None  # the app logs one line per request itself, with its request id


class AppLogsRequests(Logger):
    """gunicorn's logger without its access log. A logging config (logconfig_dict, set below for
    LOG_FORMAT=json) turns gunicorn's on whatever accesslog says, and it then built a line for every
    request that no handler printed: 3.6-4% of a busy worker's CPU in py-spy."""

    def access(self, resp, req, environ, request_time) -> None:  # noqa: ANN001 (gunicorn's signature)
        pass


logger_class = AppLogsRequests
loglevel = settings.log_level.lower()
if settings.log_format == "json":  # gunicorn's own lines (start, workers, signals) as JSON too
    logconfig_dict = {
        "version": 1,
        "formatters": {"json": {"()": "serving.logs.JsonFormatter"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {"gunicorn.error": {"handlers": ["json"], "level": settings.log_level, "propagate": False}},
        # gunicorn merges these keys over its defaults one level deep: its root logger would
        # name a handler that "handlers" above replaced.
        "root": {"handlers": ["json"], "level": settings.log_level},
    }
# gunicorn's control socket sits at one fixed path per user, so a second server on the same
# host would take it over; we manage workers with signals instead.
control_socket_disable = True


def post_worker_init(worker) -> None:  # noqa: ANN001 (gunicorn's hook signature)
    # What the worker imported lives as long as it does: out of the collector's sight, a full collection no
    # longer walks its 60,000 objects while requests wait (32 ms each time, here; python -m bench.gc_pause).
    gc.freeze()


def child_exit(server, worker) -> None:  # noqa: ANN001 (gunicorn's hook signature)
    # Imported here, not above: prometheus_client picks its storage when first imported,
    # which must be after PROMETHEUS_MULTIPROC_DIR is set.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:  # noqa: ANN001
    shutil.rmtree(METRICS_DIR, ignore_errors=True)
