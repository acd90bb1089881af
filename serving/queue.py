"""The Redis queue between the tiers: submitting jobs, taking batches, answering, and recovery.

Reliable-queue pattern: a model server moves each job atomically from the shared queue into its
own in-flight list, and removes the list in the same transaction that writes the answers. A
server that dies leaves its in-flight list behind; when its heartbeat key expires, any live
server moves that list back onto the queue. So no job is lost, and no job sits in two places.
"""

from __future__ import annotations

import time
from enum import Enum

import redis

from serving import wire

# Refuse at once when no model server has been alive for a while, or the queue is full;
# otherwise push. One round trip, and the length check cannot race another web worker.
_SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""

# Move up to ARGV[1] jobs into the in-flight list in one atomic step, so two model servers
# can never take the same job.
_TAKE = """
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not job then break end
  taken[#taken + 1] = job
end
return taken
"""

# Move a server's in-flight jobs back to the pop end of the queue (they are the oldest there).
# With ARGV[1] == 'if_dead', only while its heartbeat is gone: checked inside the script so a
# server that beat again in between keeps its jobs.
_REQUEUE = """
if ARGV[1] == 'if_dead' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local moved = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do moved = moved + 1 end
return moved
"""


# How often a model server looks for more jobs while its batching window is open.
WINDOW_STEP_S = 0.0005


class Submitted(Enum):
    QUEUED = "queued"
    FULL = "full"
    NO_SERVER = "no_server"


def connect(url: str, socket_timeout: float | None) -> redis.Redis:
    """A client that fails fast when Redis is down (connect timeout) rather than hanging."""
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=2.0, health_check_interval=10
    )


def submit(r: redis.Redis, job: wire.Job, queue_limit: int) -> Submitted:
    script = r.register_script(_SUBMIT)  # only hashes the text: EVALSHA after the first call
    status = script(keys=[wire.QUEUE, wire.ALIVE], args=[job.encode(), queue_limit])
    return {-2: Submitted.NO_SERVER, -1: Submitted.FULL}.get(status, Submitted.QUEUED)


def wait_result(r: redis.Redis, request_id: str, deadline: float) -> dict | None:
    """Block on this request's own result key until the deadline; None when time ran out."""
    remaining = deadline - time.time()
    if remaining < 0.001:
        return None
    popped = r.blpop([wire.result_key(request_id)], timeout=remaining)
    return None if popped is None else wire.decode_result(popped[1])


def queue_depth(r: redis.Redis) -> int:
    return r.llen(wire.QUEUE)


def model_info(r: redis.Redis) -> wire.ModelInfo | None:
    """What the model servers published; None when nothing readable was."""
    raw = r.get(wire.MODEL_INFO)
    try:
        return None if raw is None else wire.ModelInfo.decode(raw)
    except wire.MalformedMessage:
        return None


def live_servers(r: redis.Redis) -> int:
    ids = r.smembers(wire.SERVERS)
    if not ids:
        return 0
    return r.exists(*(wire.heartbeat_key(i.decode()) for i in ids))


class ServerQueue:
    """The model server's side of the queue, for one server id."""

    def __init__(self, r: redis.Redis, server_id: str) -> None:
        self.r = r
        self.server_id = server_id
        self.inflight = wire.inflight_key(server_id)
        self._take = r.register_script(_TAKE)
        self._requeue = r.register_script(_REQUEUE)

    def publish(self, info: wire.ModelInfo) -> None:
        self.r.set(wire.MODEL_INFO, info.encode())

    def take_batch(self, size: int, wait_s: float, block_s: float) -> list[bytes]:
        """Up to `size` raw jobs: block up to block_s for the first, then up to wait_s for more."""
        # Jobs left in flight by a batch that failed halfway (Redis went away) go back first,
        # or answer() would delete them with the next batch's in-flight list.
        self._requeue_from(self.server_id, "always")
        first = self.r.blmove(wire.QUEUE, self.inflight, block_s, "RIGHT", "LEFT")
        if first is None:
            return []
        batch = [first]
        window_ends = time.monotonic() + wait_s
        while True:
            batch += self._take(keys=[wire.QUEUE, self.inflight], args=[size - len(batch)])
            remaining = window_ends - time.monotonic()
            if len(batch) >= size or remaining <= 0:
                return batch
            # The window is timed here, not with a blocking pop's timeout: Redis checks those
            # only at its `hz` tick (every 100 ms by default), far coarser than a few ms.
            time.sleep(min(remaining, WINDOW_STEP_S))

    def answer(self, results: dict[str, str], ttl_s: float) -> None:
        """Write every answer and drop the in-flight list in one transaction: all or nothing."""
        pipe = self.r.pipeline(transaction=True)
        for request_id, payload in results.items():
            key = wire.result_key(request_id)
            pipe.lpush(key, payload)
            pipe.expire(key, max(1, round(ttl_s)))
        pipe.delete(self.inflight)
        pipe.execute()

    def beat(self, ttl_s: float, grace_s: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(wire.SERVERS, self.server_id)
        pipe.set(wire.heartbeat_key(self.server_id), 1, px=int(ttl_s * 1000))
        pipe.set(wire.ALIVE, 1, px=int(grace_s * 1000))
        pipe.execute()

    def reap_dead(self) -> int:
        """Requeue the in-flight jobs of every server whose heartbeat expired; how many moved."""
        moved = 0
        for raw_id in self.r.smembers(wire.SERVERS):
            dead = raw_id.decode()
            requeued = self._requeue_from(dead, "if_dead")
            if requeued >= 0:
                self.r.srem(wire.SERVERS, dead)
                moved += requeued
        return moved

    def leave(self) -> None:
        """On a clean exit: requeue anything still held, and stop counting as alive."""
        self._requeue_from(self.server_id, "always")
        self.r.delete(wire.heartbeat_key(self.server_id))
        self.r.srem(wire.SERVERS, self.server_id)

    def _requeue_from(self, server_id: str, when: str) -> int:
        keys = [wire.heartbeat_key(server_id), wire.inflight_key(server_id), wire.QUEUE]
        return self._requeue(keys=keys, args=[when])
