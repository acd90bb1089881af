"""Every setting of both tiers, each read once from the environment variable of the same name.

The README's settings table explains each one and why its default is what it is.
"""

import os


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"setting {name}={raw!r} must be a whole number") from None
    if value < minimum:
        raise SystemExit(f"setting {name}={value} must be at least {minimum}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"setting {name}={raw!r} must be a number") from None
    if value <= 0:
        raise SystemExit(f"setting {name}={value} must be above 0")
    return value


def _str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


# Where the queue lives; a password in the URL is used.
REDIS_URL = _str("REDIS_URL", "redis://localhost:6379/0")

# The model: a zoo name (resnet50, mobilenet_v2, efficientnet_b0, digits) or a .keras/.h5 path.
MODEL = _str("MODEL", "resnet50")
MODEL_WEIGHTS = _str("MODEL_WEIGHTS", "imagenet")
LABELS = _str("LABELS", "")
PREPROCESS = _str("PREPROCESS", "")

# Batching: see the README's tuning guide for how these defaults were measured.
BATCH_SIZE = _int("BATCH_SIZE", 32, minimum=1)
BATCH_WAIT_MS = _int("BATCH_WAIT_MS", 0)

REQUEST_TIMEOUT_S = _float("REQUEST_TIMEOUT_S", 30.0)
QUEUE_LIMIT = _int("QUEUE_LIMIT", 256, minimum=1)
TOP_K = _int("TOP_K", 5, minimum=1)
MAX_UPLOAD_MB = _float("MAX_UPLOAD_MB", 16.0)

PORT = _int("PORT", 5000, minimum=1)
WEB_WORKERS = _int("WEB_WORKERS", 2, minimum=1)

# Comma-separated bearer keys; empty means the API is open.
API_KEYS = frozenset(key.strip() for key in os.environ.get("API_KEYS", "").split(",") if key.strip())

# A model server beats every HEARTBEAT_S; one silent for HEARTBEAT_TTL_S is dead and its batch is
# requeued by the live ones. The TTL spans several beats so one slow beat does not kill a server.
HEARTBEAT_S = _float("HEARTBEAT_S", 1.0)
HEARTBEAT_TTL_S = _float("HEARTBEAT_TTL_S", 5.0)
# With no model server alive for this long, requests are refused with 503 instead of queued.
NO_SERVER_GRACE_S = _float("NO_SERVER_GRACE_S", 15.0)
# An answer nobody picked up (its client gave up) is gone from Redis after this.
RESULT_TTL_S = _float("RESULT_TTL_S", 60.0)

LOG_LEVEL = _str("LOG_LEVEL", "INFO").upper()
LOG_FORMAT = _str("LOG_FORMAT", "text")
