"""Answers for one web worker's requests: one reader per model hands each answer to the request waiting for it.

The model servers add every answer meant for this worker to one stream per model
(wire.ModelKeys.inbox), an entry per batch. A reader thread per model reads them in bulk, wakes the
waiting requests and deletes what it read. However many requests wait, a worker holds one blocking
Redis connection per model it has sent jobs to, not one per request. Answers whose client gave up
are read and dropped like the rest, so none stays behind in Redis; the inbox of a worker that died
expires after RESULT_TTL_S.
While requests wait, the reader also looks once a READ_BLOCK_S whether their model version still has
a model server (its "alive" key, serving.registry): once none has been alive for NO_SERVER_GRACE_S,
when new requests are refused, the waiting ones are answered "unavailable" too instead of a 504 at
their deadline. Their jobs stay queued for a server of that version that comes back.
A Redis that restarted (a new run id) has lost the jobs it held, but their web workers still hold the
images: the waiting requests are answered LOST, and queued again (serving.inference).

Written with threading primitives: under gunicorn's gevent worker they are gevent's (monkey
patching), so a reader is a greenlet and a waiting request costs a greenlet and an Event.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import redis

from serving import wire

log = logging.getLogger("web")

# How long one blocking read lasts before the reader looks at the stop flag again.
READ_BLOCK_S = 1.0
# Inbox entries (each a batch's answers for this worker) read in one round trip when many are waiting.
READ_BATCH = 1000


class _Waiter:
    __slots__ = ("event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: wire.Result | None = None


# What a waiting request is answered once no model server of its version is alive.
UNSERVED = wire.Result(
    "", error_code="unavailable", error="no model server of this version is alive now; try again later"
)
# What a waiting request is answered when Redis restarted since its job was queued: the job is gone.
LOST = wire.Result("", error_code="lost", error="Redis restarted and lost this job")


class Expected:
    """The answers one request waits for."""

    def __init__(self, waiters: dict[str, _Waiter]) -> None:
        self._waiters = waiters

    def wait(self, timeout_s: float) -> dict[str, wire.Result]:
        """Every answer that came within timeout_s, by request id (missing ones timed out or were lost)."""
        give_up = time.monotonic() + timeout_s
        for waiter in self._waiters.values():
            waiter.event.wait(max(0.0, give_up - time.monotonic()))
        return {rid: w.result for rid, w in self._waiters.items() if w.result is not None and not _lost(w)}

    @property
    def settled(self) -> bool:
        """Whether every answer came (or was lost)."""
        return all(waiter.event.is_set() for waiter in self._waiters.values())

    def lost(self) -> list[str]:
        """The request ids whose jobs a restarted Redis lost; each is waited for again from now."""
        ids = [rid for rid, waiter in self._waiters.items() if _lost(waiter)]
        for rid in ids:
            self._waiters[rid].result = None
            self._waiters[rid].event.clear()
        return ids


class Inbox:
    def __init__(self, r: redis.Redis, worker_id: str = "") -> None:
        """`r` should have a socket timeout above READ_BLOCK_S: its connections block that long."""
        self.r = r
        self.worker_id = worker_id or uuid.uuid4().hex
        self._waiters: dict[wire.ModelKeys, dict[str, _Waiter]] = {}
        self._readers: dict[wire.ModelKeys, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @contextmanager
    def expect(self, keys: wire.ModelKeys, request_ids: list[str]) -> Iterator[Expected]:
        """Wait for these answers within the block; register before the jobs are queued, so none is missed."""
        self._start_reader(keys)
        waiters = {request_id: _Waiter() for request_id in request_ids}
        waiting = self._waiters[keys]
        waiting.update(waiters)
        try:
            yield Expected(waiters)
        finally:
            for request_id in request_ids:
                waiting.pop(request_id, None)

    @property
    def waiting(self) -> int:
        return sum(len(waiting) for waiting in list(self._waiters.values()))

    def close(self) -> None:
        """Stop the readers; each ends within READ_BLOCK_S."""
        self._closed.set()

    def _start_reader(self, keys: wire.ModelKeys) -> None:
        if keys in self._readers:
            return
        with self._lock:
            if keys not in self._readers:
                self._waiters[keys] = {}
                reader = threading.Thread(target=self._read, args=(keys,), name=f"inbox {keys.member}", daemon=True)
                reader.start()
                self._readers[keys] = reader

    def _read(self, keys: wire.ModelKeys) -> None:
        inbox, waiting = keys.inbox(self.worker_id), self._waiters[keys]
        looked, redis_run = -math.inf, _Run()
        handled: list[bytes] = []  # ids of the entries read and handed on, deleted with the next read
        while not self._closed.is_set():
            try:
                if time.monotonic() - looked >= READ_BLOCK_S:
                    looked = time.monotonic()
                    self._look(keys, waiting, redis_run)
                entries = self._next_entries(inbox, handled)
                handled = []
                for entry_id, answers in entries:
                    handled.append(entry_id)  # first: an entry that fails its delivery must not block the rest
                    for raw in answers.values():
                        self._deliver(waiting, raw)
            except redis.RedisError as exc:
                log.warning("reading answers from %s failed: %s", inbox, exc)
                self._closed.wait(1.0)
            except Exception:  # a reader that died would leave every later request of its model to time out
                log.exception("reading answers from %s failed", inbox)
                self._closed.wait(1.0)

    def _next_entries(self, inbox: str, handled: list[bytes]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Delete the entries handled, then wait up to READ_BLOCK_S for more: one round trip.

        Read, not popped: a read whose reply never arrives (Redis stalled past the socket timeout, then
        ran the read sent meanwhile for a connection already closed) leaves the answers for the next one.
        A pop there took them to nobody, and their clients waited out their deadlines for a 504."""
        with self.r.pipeline(transaction=False) as pipe:
            if handled:
                pipe.xdel(inbox, *handled)  # by id: a late or repeated delete removes nothing else
            pipe.xread({inbox: "0-0"}, count=READ_BATCH, block=int(READ_BLOCK_S * 1000))
            *_, read = pipe.execute()
        return read[0][1] if read else []

    def _look(self, keys: wire.ModelKeys, waiting: dict[str, _Waiter], redis_run: _Run) -> None:
        """Answer every waiting request LOST when Redis has restarted since the last look, or "unavailable"
        once no model server of its version is alive; after a restart, not before one is alive again (the
        model servers come back to the new Redis on their next heartbeat)."""
        unanswered = [(rid, waiter) for rid, waiter in waiting.copy().items() if waiter.result is None]
        if redis_run.changed(self.r):  # looked at even with nobody waiting: the next request's "before"
            if unanswered:
                log.warning("Redis restarted: %d requests for %s are queued again", len(unanswered), keys.member)
            for _, waiter in unanswered:
                _answer(waiter, LOST)
        elif not unanswered:
            return
        elif self.r.exists(keys.alive):
            redis_run.restarted = False
        elif not redis_run.restarted:
            for request_id, waiter in unanswered:
                _answer(waiter, replace(UNSERVED, request_id=request_id))

    @staticmethod
    def _deliver(waiting: dict[str, _Waiter], raw: bytes) -> None:
        try:
            result = wire.Result.decode(raw)
        except wire.MalformedMessage as exc:
            log.error("dropped an unreadable answer: %s", exc)
            return
        waiter = waiting.get(result.request_id)
        if waiter is not None:  # else its client gave up: the answer goes no further
            _answer(waiter, result)


def _answer(waiter: _Waiter, result: wire.Result) -> None:
    waiter.result = result
    waiter.event.set()


def _lost(waiter: _Waiter) -> bool:
    return waiter.result is LOST


class _Run:
    """Which Redis process a reader last saw (its run id): a new one has started empty, or from a snapshot
    older than the jobs queued since."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.restarted = False  # and no model server of the reader's version has been alive since

    def changed(self, r: redis.Redis) -> bool:
        try:
            run_id = r.info("server")["run_id"]
        except redis.ResponseError:  # INFO not allowed to this Redis user: restarts go unseen
            return False
        changed = self.run_id is not None and run_id != self.run_id
        self.run_id = run_id
        self.restarted = self.restarted or changed
        return changed
