"""The model tier's loop: take a batch of one model's jobs from Redis, run one predict, answer every job.

Built from its parts (a servable, a Redis client, the settings), so the loop runs in-process in
tests as well as in `python model_server.py`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis

from serving import logs, metrics, wire
from serving.clock import RedisClock
from serving.queue import ServerQueue
from serving.registry import Registration
from serving.zoo import Servable
from settings import Settings

log = logging.getLogger("model_server")

# How long one blocking take may wait before the loop looks at the stop flag again.
BLOCK_S = 1.0


@dataclass
class Batch:
    """What one batch held and what became of it: logged, counted, and handed to `on_batch`."""

    jobs: list[wire.Job] = field(default_factory=list)
    answers: list[tuple[str, wire.Result]] = field(default_factory=list)  # (reply_to, result)
    counts: Counter[str] = field(default_factory=Counter)  # metrics.COUNTERS: expired, malformed, ...
    model_seconds: float = 0.0

    @property
    def request_ids(self) -> list[str]:
        return [job.request_id for job in self.jobs]


class ModelServer:
    def __init__(
        self,
        servable: Servable,
        r: redis.Redis,
        settings: Settings,
        server_id: str = "",
        clock: RedisClock | None = None,
        on_batch: Callable[[Batch], None] | None = None,
        block_s: float = BLOCK_S,
    ) -> None:
        self.servable = servable
        self.settings = settings
        self.server_id = server_id or uuid.uuid4().hex
        self.keys = wire.ModelKeys(servable.info.name, servable.info.version)
        self.queue = ServerQueue(r, self.keys, self.server_id)
        self.registration = Registration(r, servable.info, self.server_id)
        self.clock = clock or RedisClock(r)
        self.on_batch = on_batch
        self.block_s = block_s  # how soon a stop is noticed while no job comes
        self.stopping = threading.Event()
        self.started = threading.Event()  # set once it has announced itself and takes jobs

    def run(self) -> None:
        """Serve until stop(): then finish the batch in hand, give back anything held, and leave."""
        while not self.stopping.is_set():  # Redis may come up after us
            try:
                self._beat()
                break
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        logs.event(log, "serving", model=self.keys.name, version=self.keys.version, server_id=self.server_id)
        self.started.set()
        while not self.stopping.is_set():
            try:
                self.serve_one_batch()
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        self._leave()
        heartbeat.join()
        log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    def serve_one_batch(self, slot: int = 0) -> Batch | None:
        """Take, predict and answer one batch; None when no job came within block_s."""
        raw = self.queue.take(slot, self.settings.batch_size, self.settings.batch_wait_ms / 1000, self.block_s)
        if not raw:
            return None
        batch = self._sort_out(raw)
        if batch.jobs:
            batch.answers += self._predict(batch)
        if self.on_batch:  # before the answers go out: a client that has its answer finds its batch here
            self.on_batch(batch)
        self.queue.answer(slot, batch.answers, self.settings.result_ttl_s)
        metrics.record_batch(self.queue.r, self.keys, len(batch.jobs), batch.model_seconds, **batch.counts)
        if batch.jobs:  # logged last: a logged batch has been answered and counted
            ms = round(batch.model_seconds * 1000, 1)
            logs.event(log, "batch", size=len(batch.jobs), model_ms=ms, request_ids=",".join(batch.request_ids))
        return batch

    def _sort_out(self, raw: list[bytes]) -> Batch:
        """The jobs worth computing; the rest answered at once with why, or dropped when unanswerable."""
        batch, now = Batch(), self.clock.now()
        for message in raw:
            try:
                job = wire.Job.decode(message)
            except wire.MalformedMessage as exc:
                logs.event(log, "malformed", logging.ERROR, error=str(exc))
                batch.counts["malformed"] += 1
                if address := wire.reply_address(message):
                    batch.answers.append((address[1], wire.Result(address[0], error_code="malformed", error=str(exc))))
                continue
            if job.pixels.shape != self.servable.info.shape:
                # The model was replaced under the same name: the web tier prepared it for the old one.
                message = f"{self.keys.name} now takes {self.servable.info.shape} images, not {job.pixels.shape}"
                batch.answers.append((job.reply_to, failure(job, "model_changed", message)))
                batch.counts["model_changed"] += 1
            elif job.deadline < now:
                logs.event(log, "expired", request_id=job.request_id)  # its client stopped waiting
                batch.counts["expired"] += 1
            else:
                batch.jobs.append(job)
        return batch

    def _predict(self, batch: Batch) -> list[tuple[str, wire.Result]]:
        started = time.perf_counter()
        try:
            probabilities = self.servable.predict(np.stack([job.pixels for job in batch.jobs]))
        except Exception as exc:  # e.g. out of memory: fail this batch, not the server
            log.exception("predict failed on a batch of %d", len(batch.jobs))
            return [(job.reply_to, failure(job, "model_error", type(exc).__name__)) for job in batch.jobs]
        finally:
            batch.model_seconds = time.perf_counter() - started
        return [(job.reply_to, result_of(job, p)) for job, p in zip(batch.jobs, probabilities, strict=True)]

    def _beat(self) -> None:
        s = self.settings
        self.registration.beat(self.clock.now(), s.heartbeat_ttl_s, s.no_server_grace_s)

    def _heartbeat(self) -> None:
        """In its own thread so a long predict never makes this server look dead."""
        while not self.stopping.wait(self.settings.heartbeat_s):
            try:
                self._beat()
                self._reap_dead()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _reap_dead(self) -> None:
        for peer in self.registration.peers():
            moved = self.queue.requeue_if_dead(peer)
            if moved >= 0:  # its heartbeat is gone: what it held is back on the queue
                self.registration.forget(peer)
            if moved > 0:
                logs.event(log, "requeued", logging.WARNING, jobs=moved, dead_server=peer)

    def _leave(self) -> None:
        try:
            self.queue.give_back()
            self.registration.leave()
        except redis.RedisError as exc:  # what we held is requeued by others once our beat expires
            log.warning("could not leave cleanly: %s", exc)


def failure(job: wire.Job, code: str, message: str) -> wire.Result:
    return wire.Result(job.request_id, error_code=code, error=message)


def result_of(job: wire.Job, probabilities: np.ndarray) -> wire.Result:
    """The answer a job asked for: its top_k classes, or every probability."""
    if job.top_k is None:
        return wire.Result(job.request_id, probabilities=probabilities.astype(np.float32))
    best = np.argsort(-probabilities, kind="stable")[: job.top_k]
    return wire.Result(job.request_id, top=tuple((int(i), float(probabilities[i])) for i in best))
