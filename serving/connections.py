"""Redis clients for both tiers, with their connection pools sized on purpose, and failing fast when Redis is down.

Each connection carries a name (CLIENT SETNAME) saying which process and part holds it, so
`CLIENT LIST` on Redis shows what each web worker and model server costs in connections.
"""

from __future__ import annotations

import os

import redis

from serving.results import READ_BLOCK_S

# A web worker's quick commands (submit, model lookups) take well under a millisecond each, so its
# requests share a few connections, waiting their turn for a free one (microseconds, never an
# error) rather than each opening its own: thousands of waiting clients cost no Redis connections.
WEB_COMMAND_CONNECTIONS = 16

_FAIL_FAST = {"socket_connect_timeout": 2.0, "health_check_interval": 10}


def client_name(tier: str, part: str) -> str:
    """e.g. "web:4242:commands": which tier, process and part holds a connection."""
    return f"{tier}:{os.getpid()}:{part}"


def connect(url: str, socket_timeout: float | None, name: str | None = None) -> redis.Redis:
    """A client whose connect attempts give up within seconds and whose idle connections are checked."""
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, client_name=name, **_FAIL_FAST)


def for_web_worker(url: str) -> tuple[redis.Redis, redis.Redis]:
    """(quick commands, inbox readers) for one web worker process."""
    # timeout=None: a request waits for a pooled connection as long as it takes; each holder gives
    # its connection back within its socket timeout, so the wait is bounded without a pool error.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=WEB_COMMAND_CONNECTIONS,
        timeout=None,
        socket_timeout=5.0,
        client_name=client_name("web", "commands"),
        **_FAIL_FAST,
    )
    # One connection per model this worker has sent jobs to, each blocking READ_BLOCK_S at a time.
    readers = connect(url, socket_timeout=READ_BLOCK_S + 5, name=client_name("web", "inbox"))
    return redis.Redis(connection_pool=pool), readers
