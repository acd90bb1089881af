"""The model tier: load MODEL, then pop batches from the Redis queue and answer them until stopped.

Run one per GPU (pin it with CUDA_VISIBLE_DEVICES); any number may share one Redis.
SIGTERM or Ctrl-C: finish the batch in hand, take no more, exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid

import numpy as np
import redis

import settings
from serving import logs, metrics, queue, wire, zoo

log = logging.getLogger("model_server")

# How long one blocking pop may wait before the loop looks at the stop flag again.
BLOCK_S = 1.0


class ModelServer:
    def __init__(self, servable: zoo.Servable, r: redis.Redis, server_id: str) -> None:
        self.servable = servable
        self.queue = queue.ServerQueue(r, server_id)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():  # Redis may come up after us
            try:
                self._keep_alive()
                break
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        threading.Thread(target=self._heartbeat, daemon=True).start()
        log.info("serving %s as %s", self.servable.info.name, self.queue.server_id)
        while not self.stopping.is_set():
            try:
                self.serve_one_batch()
            except redis.RedisError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                self.stopping.wait(1.0)
        try:
            self.queue.leave()
        except redis.RedisError as exc:  # what we held is requeued by others once our beat expires
            log.warning("could not leave cleanly: %s", exc)
        log.info("stopped")

    def serve_one_batch(self) -> None:
        raw = self.queue.take_batch(settings.BATCH_SIZE, settings.BATCH_WAIT_MS / 1000, BLOCK_S)
        if not raw:
            return
        jobs, expired, malformed = self._sort_out(raw)
        started = time.perf_counter()
        try:
            results = self._predict(jobs) if jobs else {}
        except Exception as exc:  # e.g. out of memory: fail this batch, not the server
            log.exception("predict failed on a batch of %d", len(jobs))
            results = {job.request_id: wire.encode_failure(type(exc).__name__) for job in jobs}
        seconds = time.perf_counter() - started
        self.queue.answer(results, settings.RESULT_TTL_S)
        metrics.record_batch(self.queue.r, len(jobs), seconds, expired, malformed)
        if jobs:  # logged last: a logged batch has been answered and counted
            ids = ",".join(job.request_id for job in jobs)
            logs.event(log, "batch", size=len(jobs), model_ms=round(seconds * 1000, 1), request_ids=ids)

    def _sort_out(self, raw: list[bytes]) -> tuple[list[wire.Job], int, int]:
        """The jobs worth computing, and how many were expired or malformed (dropped, logged)."""
        jobs, expired, malformed, now = [], 0, 0, time.time()
        for message in raw:
            try:
                job = wire.Job.decode(message)
                if job.pixels.shape != self.servable.info.shape:
                    raise wire.MalformedMessage(f"shape {job.pixels.shape}, the model takes {self.servable.info.shape}")
            except wire.MalformedMessage as exc:
                log.error("dropped a malformed message: %s", exc)
                malformed += 1
                continue
            if job.deadline < now:
                log.info("skipped %s: its client stopped waiting", job.request_id)
                expired += 1
            else:
                jobs.append(job)
        return jobs, expired, malformed

    def _predict(self, jobs: list[wire.Job]) -> dict[str, str]:
        probabilities = self.servable.predict(np.stack([job.pixels for job in jobs]))
        labels = self.servable.labels
        return {
            job.request_id: wire.encode_result(zoo.top_k(p, labels, job.top_k))
            for job, p in zip(jobs, probabilities, strict=True)
        }

    def _keep_alive(self) -> None:
        self.queue.beat(settings.HEARTBEAT_TTL_S, settings.NO_SERVER_GRACE_S)
        self.queue.publish(self.servable.info)

    def _heartbeat(self) -> None:
        """In its own thread so a long predict never makes this server look dead."""
        while not self.stopping.wait(settings.HEARTBEAT_S):
            try:
                self._keep_alive()
                moved = self.queue.reap_dead()
                if moved:
                    log.warning("requeued %d jobs of a dead model server", moved)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)


def main() -> int:
    logs.setup("model_server")
    try:
        servable = zoo.load(settings.MODEL, settings.MODEL_WEIGHTS, settings.LABELS, settings.PREPROCESS)
    except zoo.ModelUnavailable as exc:
        log.error("%s", exc)
        return 2
    servable.predict(np.zeros((1, *servable.info.shape), np.uint8))  # build the graph before traffic
    r = queue.connect(settings.REDIS_URL, socket_timeout=BLOCK_S + 5)
    server = ModelServer(servable, r, uuid.uuid4().hex)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stopping.set())
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
