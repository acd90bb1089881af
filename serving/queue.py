"""The job queue of one model version: submitting jobs, taking batches, answering, requeueing.

Reliable-queue pattern: a model server moves each job atomically from the model's queue into an
in-flight list of its own, and deletes that list in the same transaction that delivers the
answers. A server that dies leaves its in-flight lists behind; once its heartbeat key has expired,
any live server of the model moves them back onto the queue. So no job is lost, and no job sits in
two places. Every script and transaction here touches the keys of one model only (one hash slot).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from enum import Enum
from typing import Literal

import redis

from serving import wire

# Push every job of a request, or none: refused at once when the queue already holds `limit` jobs (the
# length check cannot race another worker), and by what ARGV[2] needs of the model tier: 'alive' when
# no model server has been alive for a while; 'registered' also when no model server of the version is
# registered (the last one left, or a restarted one has not announced itself yet); 'nothing' never.
_SUBMIT = """
if ARGV[2] == 'registered' and redis.call('SCARD', KEYS[3]) == 0 then return {-3, 0} end
if ARGV[2] ~= 'nothing' and redis.call('EXISTS', KEYS[2]) == 0 then return {-2, 0} end
local depth = redis.call('LLEN', KEYS[1])
if depth + #ARGV - 2 > tonumber(ARGV[1]) then return {-1, depth} end
redis.call('LPUSH', KEYS[1], unpack(ARGV, 3))
return {1, depth}
"""

# Move a server's in-flight jobs (KEYS[2..n-1], its oldest batch first) back to the pop end of the
# queue (KEYS[n]), newest first, so the oldest job is popped first again. With ARGV[1] == 'if_dead',
# only while its heartbeat (KEYS[1]) is gone, checked inside the script so that a server that beat
# again in between keeps its jobs.
_REQUEUE = """
if ARGV[1] == 'if_dead' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local moved = 0
for i = #KEYS - 1, 2, -1 do
  while redis.call('LMOVE', KEYS[i], KEYS[#KEYS], 'LEFT', 'RIGHT') do moved = moved + 1 end
end
return moved
"""

# How often a model server looks for more jobs while its batching window is open.
WINDOW_STEP_S = 0.0005
# In-flight lists per model server: one per batch it may hold at once (taken, computing, answering).
INFLIGHT_SLOTS = 3
# What an answered job is overwritten with in an in-flight list before removal: never a valid job.
_ANSWERED = "answered"
_NEVER = threading.Event()  # a window that only its end closes


Needs = Literal["alive", "registered", "nothing"]


class Submitted(Enum):
    QUEUED = "queued"
    FULL = "full"
    NO_SERVER = "no_server"
    NOT_REGISTERED = "not_registered"


def submit(
    r: redis.Redis, keys: wire.ModelKeys, jobs: list[wire.Job], limit: int, needs: Needs = "alive"
) -> tuple[Submitted, int]:
    """Queue every job, or none when the queue would pass `limit` or the model tier lacks what `needs` names:
    "alive" (a model server of the version alive within NO_SERVER_GRACE_S), "registered" (also one registered
    now) or "nothing"; the status and the depth found."""
    script = r.register_script(_SUBMIT)  # only hashes the text: EVALSHA after the first call
    args = [limit, needs, *(job.encode() for job in jobs)]
    status, depth = script(keys=[keys.queue, keys.alive, keys.servers], args=args)
    statuses = {-3: Submitted.NOT_REGISTERED, -2: Submitted.NO_SERVER, -1: Submitted.FULL}
    return statuses.get(status, Submitted.QUEUED), depth


def withdraw(r: redis.Redis, keys: wire.ModelKeys, jobs: list[wire.Job]) -> int:
    """Take back those of `jobs` still queued (none a model server took); how many were. Each LREM scans the
    queue, but stops comparing a job at its id, a few bytes in."""
    pipe = r.pipeline(transaction=False)
    for job in jobs:
        pipe.lrem(keys.queue, 1, job.encode())
    return sum(pipe.execute())


def depth(r: redis.Redis, keys: wire.ModelKeys) -> int:
    """How many jobs the model's queue holds now."""
    return r.llen(keys.queue)


class ServerQueue:
    """One model server's side of one model's queue."""

    def __init__(self, r: redis.Redis, keys: wire.ModelKeys, server_id: str) -> None:
        self.r = r
        self.keys = keys
        self.server_id = server_id
        self._requeue = r.register_script(_REQUEUE)

    def take(self, slot: int, size: int, wait_s: float, block_s: float) -> list[bytes]:
        """Up to `size` raw jobs into in-flight list `slot`: block up to block_s for the first, then up to
        wait_s for more."""
        inflight = self.keys.inflight(self.server_id, slot)
        # Jobs left there by a batch that failed halfway (Redis went away) go back first, or the
        # answer of the next batch in this slot would delete them with the list.
        self._requeue_from(self.server_id, "always", slots=[slot])
        first = self.r.blmove(self.keys.queue, inflight, block_s, "RIGHT", "LEFT")
        if first is None:
            return []
        return [first, *self.take_more(slot, size - 1, wait_s)]

    def take_more(self, slot: int, size: int, wait_s: float, until: threading.Event = _NEVER) -> list[bytes]:
        """Up to `size` more raw jobs into the in-flight list `slot` already holds some of, waiting up to
        wait_s for them, or until `until` is set (a stop); none waits for a first job."""
        inflight = self.keys.inflight(self.server_id, slot)
        batch: list[bytes] = []
        window_ends = time.monotonic() + wait_s
        while size > 0:
            batch += self._move(inflight, size - len(batch))
            remaining = window_ends - time.monotonic()
            if len(batch) >= size or remaining <= 0:
                return batch
            # The window is timed here, not with a blocking pop's timeout: Redis checks those
            # only at its `hz` tick (every 100 ms by default), far coarser than a few ms.
            if until.wait(min(remaining, WINDOW_STEP_S)):
                return batch
        return batch

    def _move(self, inflight: str, n: int) -> list[bytes]:
        """Up to n jobs from the queue into `inflight`, which holds the batch's first, in one transaction: each
        LMOVE is atomic, so two model servers never take the same job. Not a Lua script: a script copies every
        200 KB job into Lua and back out (24 ms for 64 jobs here, against 8 ms for this).

        Nothing once `inflight` is gone: a peer took this server for dead (it stalled) and requeued what it held.
        Jobs moved into a new list would make the answers look undisturbed (ServerQueue.answer), and the
        requeued ones would be answered twice."""
        # Asking for no more than the queue holds keeps a take from an empty or short queue at one
        # LLEN (0.1 ms) instead of a transaction of BATCH_SIZE empty moves (0.5 ms at 32).
        n = min(n, depth(self.r, self.keys))
        if n <= 0:
            return []
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(inflight)  # a requeue between this look and EXEC fails the moves as a whole
            if not pipe.exists(inflight):
                return []
            pipe.multi()
            for _ in range(n):
                pipe.lmove(self.keys.queue, inflight, "RIGHT", "LEFT")
            try:
                return [job for job in pipe.execute() if job is not None]
            except redis.WatchError:
                return []

    def answer(
        self, slot: int, answers: list[tuple[str, wire.Result]], ttl_s: float, taken: list[int] | None = None
    ) -> bool:
        """Deliver every (reply_to, result) to its web worker's inbox and drop from in-flight list `slot`,
        in one transaction (all or nothing), the jobs answered: all of them, or only those `taken` first,
        second... (0 = the first taken since the list was empty), so the others stay held.

        False, and nothing delivered, when the list holds no job any more: a peer took this server for dead
        (it stalled past HEARTBEAT_TTL_S: paused, swapping) and requeued them, or Redis lost them. They are
        answered once, by whoever takes them from the queue."""
        by_inbox: dict[str, list[str]] = defaultdict(list)
        for reply_to, result in answers:
            by_inbox[self.keys.inbox(reply_to)].append(result.encode())
        inflight = self.keys.inflight(self.server_id, slot)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.watch(inflight)  # a requeue between this look and the answers fails them as a whole
            if answers and not pipe.llen(inflight):
                return False
            pipe.multi()
            for inbox, payloads in by_inbox.items():
                pipe.xadd(inbox, wire.inbox_entry(payloads))
                pipe.pexpire(inbox, int(ttl_s * 1000))  # a dead worker's inbox goes away by itself
            if taken is None:
                pipe.delete(inflight)
            else:
                # Taken jobs are pushed on the left, so the n-th taken is at index -(n + 1). Marked by
                # position, then removed by the mark: a 200 KB job need not be sent back to be named.
                for n in taken:
                    pipe.lset(inflight, -(n + 1), _ANSWERED)
                pipe.lrem(inflight, 0, _ANSWERED)
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def requeue_if_dead(self, server_id: str) -> int:
        """Requeue what `server_id` holds if its heartbeat is gone: how many jobs moved, -1 if it lives."""
        return self._requeue_from(server_id, "if_dead")

    def give_back(self) -> int:
        """On a clean exit: every job this server still holds goes back to the queue."""
        return self._requeue_from(self.server_id, "always")

    def _requeue_from(self, server_id: str, when: str, slots: list[int] | None = None) -> int:
        lists = [self.keys.inflight(server_id, slot) for slot in (slots or range(INFLIGHT_SLOTS))]
        return self._requeue(keys=[self.keys.heartbeat(server_id), *lists, self.keys.queue], args=[when])
