"""The web tier's view of the models in Redis: which are served, and which version a request goes to.

Read from the registry at most every REFRESH_S, so a model's new version is served within a second,
without a restart, and a request costs no extra round trip to find its model. A request for a model the
view lacks reads it again first, unless it is younger than RECHECK_S: a model whose first server just
started is served as soon as /ready (which reads the registry when asked) says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import redis

from serving import registry, wire
from serving.clock import RedisClock
from serving.registry import ModelState

# How long a web worker trusts what it read of the models before reading it again.
REFRESH_S = 1.0
# How old a view may be that turns a request away for a model it lacks: a model whose first server started
# since is found by a read then, not a REFRESH_S later (/ready, which reads now, says it is ready at once).
RECHECK_S = 0.1
_BACK_SOON = "the model servers announce their models again within a heartbeat; try again shortly"


class UnknownModel(LookupError):
    """No model (or version) of that name is served; the message names the ones that are."""


class NoModelNamed(LookupError):
    """Several models are served, none is the default, and the request named none."""


class NoModel(LookupError):
    """No model server has published a model yet."""


class Catalog:
    def __init__(
        self, r: redis.Redis, clock: RedisClock, default_model: str = "", refresh_s: float = REFRESH_S
    ) -> None:
        self.r = r
        self.clock = clock
        self.default_model = default_model
        self.refresh_s = refresh_s
        self._states: list[ModelState] = []
        self._starting: list[wire.ModelKeys] = []  # versions a model server is loading, as last read
        self._read_at: float | None = None  # None: read on the next look
        self._lock = threading.Lock()
        self._failed: tuple[float, redis.RedisError] | None = None  # when the last read failed, and why
        # When this worker last read each version as ready (time.monotonic()): see _missing.
        self._ready_at: dict[wire.ModelKeys, float] = {}

    def states(self, max_age_s: float | None = None) -> list[ModelState]:
        """Every known model version, sorted by name then version, as read within max_age_s (else refresh_s).

        A read that failed fails every look for refresh_s: when Redis hangs, a read waits out the socket
        timeout, and requests must not each wait their turn to wait it out again."""
        max_age_s = self.refresh_s if max_age_s is None else max_age_s
        if self._stale(max_age_s):
            with self._lock:
                if self._failed and time.monotonic() - self._failed[0] < self.refresh_s:
                    raise redis.ConnectionError(f"Redis did not answer the last read of the models: {self._failed[1]}")
                if self._stale(max_age_s):
                    try:
                        self.read()
                    except redis.RedisError as exc:
                        self._failed = (time.monotonic(), exc)
                        raise
        return self._states

    def read(self) -> list[ModelState]:
        """The same, read from Redis now (readiness checks must see Redis down at once); raises redis.RedisError."""
        now = self.clock.now()
        # The starting list first: a server's first beat moves its version from it to the registry, and read
        # the other way round, a beat between the two reads left the version in neither (a 404).
        self._starting = registry.starting_models(self.r, now)
        self._states = registry.states(self.r, registry.known_models(self.r, now))
        self._read_at = time.monotonic()
        self._ready_at.update((state.keys, self._read_at) for state in self._states if state.ready)
        return self._states

    def why_none_ready(self) -> str:
        """What readiness checks say while no version has a live server, as last read."""
        if self._starting:
            return f"no model server is alive yet: loading {', '.join(keys.member for keys in self._starting)}"
        return "no model server is alive"

    def forget(self) -> None:
        """Read the registry again on the next look, e.g. once a model turned out to be replaced."""
        self._read_at = None

    def _stale(self, max_age_s: float) -> bool:
        return self._read_at is None or time.monotonic() - self._read_at > max_age_s

    def names(self) -> list[str]:
        return _names(self.states())

    def resolve(self, name: str | None, version: int | None) -> ModelState:
        """The model version a request goes to: the named version, or the highest with a live server.

        Raises UnknownModel, NoModelNamed or NoModel, as a view read within RECHECK_S has it; the state's info
        may still be None.
        """
        try:
            return self._resolve(name, version)
        except LookupError:
            self.states(RECHECK_S)
            return self._resolve(name, version)

    def _resolve(self, name: str | None, version: int | None) -> ModelState:
        wanted = name or self._default_name()
        versions = [state for state in self.states() if state.keys.name == wanted]
        if not versions and not name:  # DEFAULT_MODEL names a model none of whose servers has started
            yet = f"the default model {wanted!r} has no model server yet; try again shortly"
            raise NoModel(self._starting_now(wanted) or yet)
        if not versions:
            served = ", ".join(self.names()) or "none yet"
            raise self._missing(wanted, version, f"no model named {wanted!r:.80} is served; the models are: {served}")
        if version is not None:
            chosen = [state for state in versions if state.keys.version == version]
            if not chosen:
                served = ", ".join(str(state.keys.version) for state in versions)
                raise self._missing(
                    wanted, version, f"model {wanted!r:.80} has no version {version}; its versions are: {served}"
                )
            return chosen[0]
        # While no version has a live server: the highest one whose server is starting, else the highest alive
        # (within NO_SERVER_GRACE_S of its last server), not the highest known. The registry keeps a version a
        # day after its last server left, and a version that left cleanly stays alive for the grace: sent
        # there, requests were refused while the version below restarted.
        live = [state for state in versions if state.ready]
        starting = [state for state in versions if state.keys in self._starting]
        alive = [state for state in versions if state.alive]
        return (live or starting or alive or versions)[-1]

    def _missing(self, name: str, version: int | None, unknown: str) -> LookupError:
        """UnknownModel(unknown), unless a model server of the model (version) is loading it, or this worker
        read it as ready within MODEL_RETENTION_S. The registry keeps a version that long after its last
        server's beat, so it is missing then only because Redis lost it (restarted empty): its servers
        announce it again on their next beat. A 404 would tell clients it is gone for good."""
        if self._ready_lately(lambda keys: keys.name == name and version in (None, keys.version)):
            return NoModel(f"{name!r} is missing from Redis, which seems to have restarted: {_BACK_SOON}")
        if starting := self._starting_now(name, version):
            return NoModel(starting)
        return UnknownModel(unknown)

    def _starting_now(self, name: str, version: int | None = None) -> str | None:
        """What to tell a request for the model (version) while a model server is loading it; else None."""
        if not any(keys.name == name and version in (None, keys.version) for keys in self._starting):
            return None
        which = name if version is None else wire.ModelKeys(name, version).named
        return f"{which} is starting: its model server is loading it; try again shortly"

    def _ready_lately(self, which: Callable[[wire.ModelKeys], bool]) -> bool:
        since = time.monotonic() - registry.MODEL_RETENTION_S
        return any(which(keys) and at > since for keys, at in self._ready_at.copy().items())

    def _default_name(self) -> str:
        """DEFAULT_MODEL, else the only model served: the only one with a live server; while none has one, the
        only one alive within NO_SERVER_GRACE_S (its servers restart); else the only one known. A model whose
        servers all left stays known for MODEL_RETENTION_S (a day): counted, it made every request naming no
        model a 400 "several models are served" for that long."""
        if self.default_model:
            return self.default_model
        states = self.states()
        names = _names(s for s in states if s.ready) or _names(s for s in states if s.alive) or _names(states)
        if not names and self._ready_lately(lambda keys: True):
            raise NoModel(f"no model is in Redis, which seems to have restarted: {_BACK_SOON}")
        if not names:
            loading = {keys.name for keys in self._starting}
            if len(loading) == 1:  # the model that requests naming none will go to
                raise NoModel(self._starting_now(loading.pop()))
            raise NoModel("no model server has started yet; try again shortly")
        if len(names) > 1:
            raise NoModelNamed(f"several models are served: name one of {', '.join(names)} as 'model'")
        return names[0]


def _names(states: Iterable[ModelState]) -> list[str]:
    return sorted({state.keys.name for state in states})
