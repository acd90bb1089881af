"""The model tier's loop: take a batch of one model's jobs from Redis, run one predict, answer every job.

A pipeline of three threads keeps the accelerator busy: while predict runs batch N (it releases
the GIL), this server's main thread takes and decodes batch N+1, taking what arrives until batch N
is done, and its answering thread answers batch N-1. Each batch lives in one of the server's
in-flight lists (queue.INFLIGHT_SLOTS) from its take until its answers are delivered, so a crash
at any point loses nothing. Built from its parts (a servable, a Redis client, the settings), so the
loop runs in-process in tests as well as in `python model_server.py`.
"""

from __future__ import annotations

import logging
import queue as threadqueue
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis

from serving import logs, metrics, wire
from serving.batch import Batch, Intake
from serving.clock import RedisClock
from serving.queue import INFLIGHT_SLOTS, ServerQueue
from serving.registry import Registration
from serving.speed import Meter, allowed_sizes, padded
from serving.zoo import Servable
from settings import Settings

log = logging.getLogger("model_server")

# How long one blocking take may wait before the loop looks at the stop flag again.
BLOCK_S = 1.0
# How often a thread waiting for its turn in the pipeline looks at the stop flag.
POLL_S = 0.1
# While the batch ahead computes, the next one looks for more jobs in steps of a quarter of the time
# predict has left, within these bounds: a look is a round trip to Redis, and jobs decoded as they come
# are not all decoded at the end, when predict waits for them.
FILL_STEP_S = (0.002, 0.02)
# The BATCH_WAIT_MS window is waited out in steps of at most this: a job that comes meanwhile with an earlier
# deadline closes it sooner (serving.batch.Intake.window).
WINDOW_STEP_S = 0.05


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
        self.started = threading.Event()  # set once it has warmed up, announced itself and takes jobs
        self.sizes = allowed_sizes(settings.batch_size)
        # One pixel array per in-flight slot: a slot's rows are rewritten only after its batch is answered.
        self.rows = [np.zeros((settings.batch_size, *servable.info.shape), np.uint8) for _ in range(INFLIGHT_SLOTS)]
        self.meter: Meter | None = None  # measured by warm_up()
        self._free_slots: threadqueue.Queue[int] = threadqueue.Queue()
        self._to_predict: threadqueue.Queue[Batch | None] = threadqueue.Queue()
        self._to_answer: threadqueue.Queue[Batch | None] = threadqueue.Queue()
        # Held from the take of a batch until predict picks it up: at most one batch waits, ready.
        self._ready = threading.Semaphore(1)
        self._busy_until = 0.0  # monotonic time the batch in predict should be done
        self._predict_free = threading.Event()  # clear while a predict runs
        self._predict_free.set()

    def run(self) -> None:
        """Serve until stop(): then compute and answer every batch taken, give back anything held, and leave."""
        if self.meter is None:  # not warmed up yet
            self.warm_up()
        while not self.stopping.is_set():  # Redis may come up after us
            try:
                self._beat()
                break
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        threads = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self._predict_loop, name="predict", daemon=True),
            threading.Thread(target=self._answer_loop, name="answer", daemon=True),
        ]
        for thread in threads:
            thread.start()
        for slot in range(INFLIGHT_SLOTS):
            self._free_slots.put(slot)
        logs.event(log, "serving", model=self.keys.name, version=self.keys.version, server_id=self.server_id)
        self.started.set()
        self._take_loop()
        self._to_predict.put(None)  # the pipeline drains: what was taken is computed and answered
        for thread in reversed(threads):
            thread.join()
        self._leave()
        log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()

    def warm_up(self) -> None:
        """Compile every allowed batch size before traffic and measure each, so the first Speed is real."""
        shape, seconds = self.servable.info.shape, {}
        for size in self.sizes:
            batch = np.zeros((size, *shape), np.uint8)
            self.servable.predict(batch)  # compiles this shape
            started = time.perf_counter()
            self.servable.predict(batch)
            seconds[size] = time.perf_counter() - started
        # Until live batches say more, the time outside predict is what decoding a full batch takes.
        sample = wire.Job("warm-up", "", np.zeros(shape, np.uint8), 0.0, None).encode()
        started = time.perf_counter()
        for row in self.rows[0]:
            row[...] = wire.Job.decode(sample).pixels
        self.meter = Meter(self.sizes, seconds, time.perf_counter() - started)
        logs.event(log, "warmed up", sizes=",".join(map(str, self.sizes)), **_ms_fields(seconds))

    # The three stages, each in its own thread, hand batches on through queues.

    def _take_loop(self) -> None:
        while not self.stopping.is_set():
            slot = self._turn()
            if slot is None:
                return
            try:
                batch = self._take_batch(slot)
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self._ready.release()
                self._free_slots.put(slot)
                self.stopping.wait(1.0)
                continue
            if batch is None:
                self._ready.release()
                self._free_slots.put(slot)
            elif not batch.jobs:  # all answered or dropped at take: nothing waits for predict
                self._ready.release()
                self._to_answer.put(batch)
            else:
                self._to_predict.put(batch)

    def _turn(self) -> int | None:
        """A free slot, once no taken batch waits for predict any more; None when stopping."""
        slot = None
        while slot is None:
            if self.stopping.is_set():
                return None
            try:
                slot = self._free_slots.get(timeout=POLL_S)
            except threadqueue.Empty:
                continue
        while not self._ready.acquire(timeout=POLL_S):
            if self.stopping.is_set():
                break
        else:
            if not self.stopping.is_set():
                return slot
            self._ready.release()
        self._free_slots.put(slot)
        return None

    def _take_batch(self, slot: int) -> Batch | None:
        """Take and decode one batch into `slot`, answering at once what cannot be computed in time;
        None when no job came within block_s."""
        raw = self.queue.take(slot, 1, 0.0, self.block_s)  # the oldest job first: it sets the batch's size
        if not raw:
            return None
        # A batch's own time starts with its first job; it is what the published speed is made of. Waiting
        # for a job is idle time, and jobs dropped before one joins (expired in the queue after an overload)
        # are no batch's work: counted, one batch after an overload "took" 16 s, and admission by that
        # speed then refused every request, so that no batch ever measured the server fast again.
        started = time.perf_counter()
        batch = Batch(slot)
        now = self.clock.now()
        starts_at = now + max(0.0, self._busy_until - time.monotonic())
        intake = Intake(batch, self.rows[slot], self.servable.info.bgr, self.meter, now, starts_at)
        window_s, asked, waited = self.settings.batch_wait_ms / 1000, 1, 0.0
        while True:
            decode_started = time.perf_counter()
            for message in raw:
                intake.admit(message)
            if batch.jobs:
                batch.decode_seconds += time.perf_counter() - decode_started
            else:
                started = time.perf_counter()
            ran_dry, asked = len(raw) < asked, intake.wanted()
            if asked <= 0 or self.stopping.is_set():  # a stop takes no more: the batch in hand is computed
                break
            if batch.jobs and not self._predict_free.is_set():
                # This batch cannot start before the one ahead is done: it takes what comes meanwhile,
                # else the jobs that arrive while a batch computes wait for the batch after next.
                wait_started = time.perf_counter()
                self._predict_free.wait(self._fill_step())
                waited += time.perf_counter() - wait_started
                raw = self.queue.take_more(slot, asked, 0.0)
                continue
            wait_s = intake.window(window_s, self.clock.now()) if batch.jobs else 0.0
            if ran_dry and not wait_s:
                break
            wait_started = time.perf_counter()
            raw = self.queue.take_more(slot, asked, min(wait_s, WINDOW_STEP_S), until=self.stopping)
            if wait_s:  # waiting for company is no work: at light load it would read as a slow server
                waited += time.perf_counter() - wait_started
        batch.ran_dry = intake.wanted() > 0
        # Waiting, for the batch ahead or in the window, is no time of this batch's: the speed is made of these.
        batch.take_seconds = time.perf_counter() - started - batch.decode_seconds - waited
        if batch.rejections or intake.rejected:  # answered now, not after the predict ahead of this batch
            self.queue.answer(slot, batch.rejections, self.settings.result_ttl_s, taken=intake.rejected)
        return batch

    def _fill_step(self) -> float:
        low, high = FILL_STEP_S
        return min(high, max(low, (self._busy_until - time.monotonic()) / 4))

    def _predict_loop(self) -> None:
        while (batch := self._to_predict.get()) is not None:
            batch.size = padded(len(batch.jobs), self.sizes)
            self._busy_until = time.monotonic() + self.meter.predict_seconds(batch.size)
            # Under load the next batch is taken while this one computes. When the queue ran dry it is
            # taken once predict is done instead: it then holds every job that came meanwhile, and at
            # light load the take does not compete with predict for the GIL (0.7 ms of 3.6 at c=1).
            self._predict_free.clear()
            if not batch.ran_dry:
                self._ready.release()
            self._predict(batch)
            self._predict_free.set()
            if batch.ran_dry:
                self._ready.release()
            self._to_answer.put(batch)
        self._to_answer.put(None)

    def _predict(self, batch: Batch) -> None:
        started = time.perf_counter()
        try:
            batch.probabilities = self.servable.predict(self.rows[batch.slot][: batch.size])[: len(batch.jobs)]
        except Exception as exc:  # e.g. out of memory: fail this batch, not the server
            log.exception("predict failed on a batch of %d", len(batch.jobs))
            batch.failure = type(exc).__name__
        finally:
            batch.model_seconds = time.perf_counter() - started

    def _answer_loop(self) -> None:
        while (batch := self._to_answer.get()) is not None:
            try:
                self._answer_batch(batch)
            except redis.RedisError as exc:  # its jobs stay in the slot: the slot's next take requeues them
                # Unless Redis ran them after this server gave up on its reply (it stalled): then they went out.
                log.warning(
                    "could not confirm a batch's answers (%s); unless they went out, its jobs are requeued", exc
                )
            except Exception:  # the same, rather than a pipeline that stops answering
                log.exception("could not answer a batch; its jobs go back to the queue")
            finally:
                self._free_slots.put(batch.slot)

    def _answer_batch(self, batch: Batch) -> None:
        """Deliver a computed batch's answers, drop its in-flight list, count and log it."""
        started = time.perf_counter()
        batch.answers = batch.results()
        if self.on_batch:  # before the answers go out: a client that has its answer finds its batch here
            self.on_batch(batch)
        if not self.queue.answer(batch.slot, batch.answers, self.settings.result_ttl_s):
            # A peer requeued them (this server stalled past HEARTBEAT_TTL_S), or Redis lost them.
            log.warning("a batch of %d left this server's in-flight list before its answers", len(batch.jobs))
            return
        now = self.clock.now()
        batch.counts["finished_late"] += sum(1 for job in batch.jobs if job.deadline < now)
        metrics.record_batch(self.queue.r, self.keys, len(batch.jobs), batch.model_seconds, **batch.counts)
        batch.answer_seconds = time.perf_counter() - started
        if batch.jobs:
            self.meter.observe(batch.size, batch.model_seconds, batch.extra_seconds)
            self._log(batch)  # logged last: a logged batch has been answered and counted

    def _log(self, batch: Batch) -> None:
        stages = {
            "take_ms": batch.take_seconds,
            "decode_ms": batch.decode_seconds,
            "model_ms": batch.model_seconds,
            "answer_ms": batch.answer_seconds,
        }
        counts = {name: n for name, n in batch.counts.items() if n}
        ids = ",".join(batch.request_ids)
        logs.event(log, "batch", size=len(batch.jobs), padded=batch.size, **_ms(stages), **counts, request_ids=ids)

    # Presence: heartbeat with this server's speed, reaping of dead peers, leaving.

    def _beat(self) -> None:
        s = self.settings
        self.registration.beat(self.clock.now(), s.heartbeat_ttl_s, s.alive_ttl_s, speed=self.meter.speed())

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


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(s * 1000, 2) for name, s in seconds.items()}


def _ms_fields(seconds: dict[int, float]) -> dict[str, float]:
    return _ms({f"predict_{size}_ms": s for size, s in seconds.items()})
