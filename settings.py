"""Every setting of both tiers: one immutable Settings, read from the environment variables of the same names.

`Settings.from_env()` reads them (field `batch_size` from BATCH_SIZE, and so on); code is handed the
object it needs and never reads the environment itself. The README's settings table explains each
one and why its default is what it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

# Model names go into Redis keys and URLs: letters, digits, and . _ - after the first character.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# An API key a client can send: HTTP clients disagree on how to send other than ASCII in a header (curl
# sends UTF-8, Python's http.client Latin-1), and gunicorn refuses a header line past 8,190 bytes.
API_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,4096}")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Below 2**53, so that every JSON client reads a version exactly; room for date-like versions (20261206).
MAX_MODEL_VERSION = 10**15 - 1
# Each of its allowed sizes is compiled and warmed up at start (serving.speed); GPU batches in use are a few hundred.
MAX_BATCH_SIZE = 4096
# gunicorn's guide is 2-4 workers a core, and each is a process of about 50 MB with its own Redis connections:
# 256 is 64 cores' worth. Unbounded, WEB_WORKERS=100000 forked until the host ran out of memory.
MAX_WEB_WORKERS = 256
# Durations past a day are mistakes, and past Redis' and the OS's timers (1e300 s overflowed them).
_DAY_S = 86_400.0


def _setting(default: object, minimum: float | None = None, maximum: float | None = None) -> dataclasses.Field:
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum})


@dataclass(frozen=True)
class Settings:
    # Where the queue lives; a password in the URL is used.
    redis_url: str = "redis://localhost:6379/0"  # REDIS_URL

    # The model server's model: a zoo name (resnet50, mobilenet_v2, efficientnet_b0, digits) or a
    # .keras/.h5 path, served as MODEL_NAME version MODEL_VERSION (the name defaults from MODEL).
    model: str = "resnet50"  # MODEL
    model_weights: str = "imagenet"  # MODEL_WEIGHTS
    labels: str = ""  # LABELS
    preprocess: str = ""  # PREPROCESS
    model_name: str = ""  # MODEL_NAME
    model_version: int = _setting(1, minimum=1, maximum=MAX_MODEL_VERSION)  # MODEL_VERSION
    # The web tier's model for requests that name none; unset, the only one served.
    default_model: str = ""  # DEFAULT_MODEL

    # Batching: see the README's tuning guide for how these defaults were measured.
    batch_size: int = _setting(32, minimum=1, maximum=MAX_BATCH_SIZE)  # BATCH_SIZE
    batch_wait_ms: int = _setting(0, minimum=0, maximum=10_000)  # BATCH_WAIT_MS
    # Threads one predict may use; 0: the backend's own choice (every core). For several model servers
    # sharing a CPU host; one single-threaded server per core was measured against one server for the
    # whole host in the README's tuning guide (better at 3x-5x overload, not reliably at 10x).
    model_threads: int = _setting(0, minimum=0)  # MODEL_THREADS

    request_timeout_s: float = _setting(30.0, minimum=0.001, maximum=_DAY_S)  # REQUEST_TIMEOUT_S
    # A memory cap, not the admission rule: requests are refused by their predicted wait first
    # (serving.admission). 10,000 jobs of 224x224x3 are about 2 GB of Redis (200 KB of JSON each);
    # the deadline stops ResNet50 on a CPU at a few hundred, so only fast models ever reach the cap,
    # and then with seconds of work queued (the README's tuning guide has the figures).
    queue_limit: int = _setting(10_000, minimum=1)  # QUEUE_LIMIT
    top_k: int = _setting(5, minimum=1)  # TOP_K
    max_upload_mb: float = _setting(16.0, minimum=0.001)  # MAX_UPLOAD_MB

    port: int = _setting(5000, minimum=1, maximum=65535)  # PORT
    web_workers: int = _setting(2, minimum=1, maximum=MAX_WEB_WORKERS)  # WEB_WORKERS

    # Comma-separated bearer keys; empty means the API is open.
    api_keys: frozenset[str] = frozenset()  # API_KEYS

    # A model server beats every HEARTBEAT_S; one silent for HEARTBEAT_TTL_S is dead and its jobs are
    # requeued by the live ones. The TTL spans several beats so one slow beat does not kill a server.
    heartbeat_s: float = _setting(1.0, minimum=0.001, maximum=_DAY_S)  # HEARTBEAT_S
    heartbeat_ttl_s: float = _setting(5.0, minimum=0.001, maximum=_DAY_S)  # HEARTBEAT_TTL_S
    # With no model server alive for this long, requests are refused with 503 instead of queued.
    no_server_grace_s: float = _setting(15.0, minimum=0.001, maximum=_DAY_S)  # NO_SERVER_GRACE_S
    # An answer nobody picked up (its web worker died) is gone from Redis after this.
    result_ttl_s: float = _setting(60.0, minimum=1, maximum=_DAY_S)  # RESULT_TTL_S

    log_level: str = "INFO"  # LOG_LEVEL
    log_format: str = "text"  # LOG_FORMAT

    def __post_init__(self) -> None:
        if not self.model_name:  # frozen: the derived default is set the one way a dataclass allows
            object.__setattr__(self, "model_name", default_model_name(self.model))
        object.__setattr__(self, "log_level", self.log_level.upper())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Each field from the variable of its name in capitals; unset or blank keeps the default."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.name.upper(), "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """SystemExit with the setting's name when a value cannot work."""
        for f in dataclasses.fields(self):
            value, minimum, maximum = getattr(self, f.name), f.metadata.get("minimum"), f.metadata.get("maximum")
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise SystemExit(f"setting {f.name.upper()}={value} must be a finite number")
            if minimum is not None and value < minimum:
                raise SystemExit(f"setting {f.name.upper()}={value} must be at least {minimum:g}")
            if maximum is not None and value > maximum:
                raise SystemExit(f"setting {f.name.upper()}={value} must be at most {maximum:,}")
        if problem := redis_url_problem(self.redis_url):
            raise SystemExit(f"setting REDIS_URL={self.redis_url!r} {problem}: e.g. redis://:password@host:6379/0")
        if self.log_level not in LOG_LEVELS:
            raise SystemExit(f"setting LOG_LEVEL={self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        derived = self.model_name == default_model_name(self.model) and self.model.endswith((".keras", ".h5"))
        _check_model_name("MODEL_NAME (from the file's name: set it)" if derived else "MODEL_NAME", self.model_name)
        if self.default_model:  # a name no model server could take would route every request nowhere
            _check_model_name("DEFAULT_MODEL", self.default_model)
        for n, key in enumerate(sorted(self.api_keys), 1):  # the key itself is a secret: not in the message
            if not API_KEY_PATTERN.fullmatch(key):
                rule = "each must be up to 4,096 printable ASCII characters, or no client can send it"
                raise SystemExit(f"setting API_KEYS: key {n} of {len(self.api_keys)} (sorted) will not work: {rule}")
        if self.log_format not in ("text", "json"):
            raise SystemExit(f"setting LOG_FORMAT={self.log_format!r} must be text or json")
        if self.heartbeat_ttl_s <= self.heartbeat_s:  # a live server would count as dead between its beats
            raise SystemExit(
                f"setting HEARTBEAT_TTL_S={self.heartbeat_ttl_s:g} must be longer than HEARTBEAT_S={self.heartbeat_s:g}"
                " (several beats: the default is 5 and 1)"
            )

    def replace(self, **changes: object) -> Settings:
        """A copy with some settings changed (tests and benchmarks build variants this way).

        A model name that was derived from MODEL is derived again from a new MODEL.
        """
        if "model" in changes and "model_name" not in changes and self.model_name == default_model_name(self.model):
            changes["model_name"] = ""
        return dataclasses.replace(self, **changes)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def alive_ttl_s(self) -> float:
        """How long a model version counts as alive after a beat of one of its servers: NO_SERVER_GRACE_S
        from when the next beat was due, so that a grace shorter than HEARTBEAT_S does not lapse between beats,
        and at least as long as that server counts as live (HEARTBEAT_TTL_S). A version whose server was
        killed was otherwise "not alive" while the web tier still routed requests to it: those waiting got
        503 unavailable, and so did new ones, instead of going to another live version."""
        return max(self.no_server_grace_s, self.heartbeat_ttl_s) + self.heartbeat_s


def redis_url_problem(url: str) -> str | None:
    """What keeps redis-py from reading `url`, in words; None when nothing does."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must start with redis://, rediss:// or unix://"
    try:
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if parts.scheme != "unix" and not parts.hostname:
        return "names no host"
    if parts.scheme != "unix" and not (parts.path.strip("/") or "0").isdigit():
        return "has a database that is not a number"
    return None


def _check_model_name(setting: str, name: str) -> None:
    if not MODEL_NAME_PATTERN.fullmatch(name):
        rule = "use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise SystemExit(f"setting {setting}={name!r}: {rule}")


def default_model_name(model: str) -> str:
    """A zoo name as it is; a model file by its name without the extension."""
    return pathlib.Path(model).stem if model.endswith((".keras", ".h5")) else model


def _parse(f: dataclasses.Field, raw: str) -> object:
    name = f.name.upper()
    if f.type == "frozenset[str]":
        parts = frozenset(part.strip() for part in raw.split(",") if part.strip())
        if not parts:  # say "API_KEYS=${KEY}," with KEY unset: an API meant closed must not open
            raise SystemExit(f"setting {name}={raw!r} names none: give one or more, or leave it unset")
        return parts
    if f.type == "str":
        return raw
    kind = int if f.type == "int" else float
    try:
        return _number(raw, kind)
    except ValueError:
        raise SystemExit(f"setting {name}={raw!r} must be {'a whole number' if kind is int else 'a number'}") from None


def _number(raw: str, kind: type) -> float:
    if "_" in raw or not raw.isascii():  # Python's 1_000 and "７３１０" are no numbers in the README, nor in requests
        raise ValueError(raw)
    if kind is float:
        return float(raw)
    try:
        return int(raw)
    except ValueError:
        value = float(raw)  # 1e3 is a whole number too, as the README says; 2.5 is not
        if not value.is_integer():
            raise
        return int(value)
