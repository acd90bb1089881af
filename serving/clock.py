"""Redis' clock, read on any host: deadlines set on a web host and checked on a model host.

Hosts' clocks may disagree by seconds; Redis' is the one both tiers see. Each host measures the
offset between Redis' TIME and its own monotonic clock (the midpoint of the round trip, as NTP
does) and refreshes it now and then, so reading the clock costs no round trip. A host whose wall
clock is off, or jumps, does not matter: only the monotonic clock is used locally.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

# Monotonic clocks drift by parts per million: resyncing every half minute keeps the error in microseconds.
RESYNC_S = 30.0
# Of a few round trips, the shortest gives the best midpoint.
SAMPLES = 3


class RedisClock:
    def __init__(self, r: redis.Redis, local: Callable[[], float] = time.monotonic) -> None:
        self.r = r
        self.local = local
        self._offset: float | None = None
        self._synced_at = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds on Redis' clock (Unix time as Redis sees it); raises redis.RedisError before the first sync."""
        if self._stale():
            self._sync()
        return self.local() + self._offset

    def _stale(self) -> bool:
        return self._offset is None or self.local() - self._synced_at > RESYNC_S

    def _sync(self) -> None:
        with self._lock:
            if not self._stale():  # another thread synced while this one waited
                return
            try:
                self._offset = min((self._sample() for _ in range(SAMPLES)), key=lambda s: s[0])[1]
            except redis.RedisError:
                if self._offset is None:
                    raise  # no clock at all yet; an old offset is good for a while yet
            self._synced_at = self.local()

    def _sample(self) -> tuple[float, float]:
        """(round trip, offset) of one TIME call."""
        sent = self.local()
        seconds, micros = self.r.time()
        received = self.local()
        return received - sent, seconds + micros / 1e6 - (sent + received) / 2
