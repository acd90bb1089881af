"""The web tier's view of the models in Redis: which are served, and which version a request goes to.

Read from the registry at most every REFRESH_S, so a model whose servers start is served within a
second, without a restart, and a request costs no extra round trip to find its model.
"""

from __future__ import annotations

import threading
import time

import redis

from serving import registry
from serving.clock import RedisClock
from serving.registry import ModelState

# How long a web worker trusts what it read of the models before reading it again.
REFRESH_S = 1.0


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
        self._read_at: float | None = None  # None: read on the next look
        self._lock = threading.Lock()

    def states(self) -> list[ModelState]:
        """Every known model version, sorted by name then version, as read within refresh_s."""
        if self._stale():
            with self._lock:
                if self._stale():
                    self.read()
        return self._states

    def read(self) -> list[ModelState]:
        """The same, read from Redis now (readiness checks must see Redis down at once); raises redis.RedisError."""
        self._states = [registry.state(self.r, k) for k in registry.known_models(self.r, self.clock.now())]
        self._read_at = time.monotonic()
        return self._states

    def forget(self) -> None:
        """Read the registry again on the next look, e.g. once a model turned out to be replaced."""
        self._read_at = None

    def _stale(self) -> bool:
        return self._read_at is None or time.monotonic() - self._read_at > self.refresh_s

    def names(self) -> list[str]:
        return sorted({state.keys.name for state in self.states()})

    def resolve(self, name: str | None, version: int | None) -> ModelState:
        """The model version a request goes to: the named version, or the highest with a live server.

        Raises UnknownModel, NoModelNamed or NoModel; the state's info may still be None.
        """
        wanted = name or self._default_name()
        versions = [state for state in self.states() if state.keys.name == wanted]
        if not versions and not name:  # DEFAULT_MODEL names a model none of whose servers has started
            raise NoModel(f"the default model {wanted!r} has no model server yet; try again shortly")
        if not versions:
            served = ", ".join(self.names()) or "none yet"
            raise UnknownModel(f"no model named {wanted!r} is served; the models are: {served}")
        if version is not None:
            chosen = [state for state in versions if state.keys.version == version]
            if not chosen:
                served = ", ".join(str(state.keys.version) for state in versions)
                raise UnknownModel(f"model {wanted!r} has no version {version}; its versions are: {served}")
            return chosen[0]
        live = [state for state in versions if state.ready]
        return (live or versions)[-1]

    def _default_name(self) -> str:
        if self.default_model:
            return self.default_model
        names = self.names()
        if not names:
            raise NoModel("no model server has started yet; try again shortly")
        if len(names) > 1:
            raise NoModelNamed(f"several models are served: name one of {', '.join(names)} as 'model'")
        return names[0]
