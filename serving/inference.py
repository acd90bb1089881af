"""The web tier's way to the model tier: queue a request's images for one model and wait for their answers.

Knows nothing of HTTP: it raises Refused or TimedOut, and the routes turn those into answers.
"""

from __future__ import annotations

import numpy as np
import redis

from serving import queue, wire
from serving.clock import RedisClock
from serving.registry import ModelState
from serving.results import Inbox


class Refused(Exception):
    """Not queued: `reason` is "overloaded" (with a retry_after_s) or "unavailable"."""

    def __init__(self, reason: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after_s = reason, message, retry_after_s


class TimedOut(Exception):
    """The deadline passed before every answer came."""


class InferenceClient:
    def __init__(self, r: redis.Redis, inbox: Inbox, clock: RedisClock, queue_limit: int) -> None:
        self.r = r
        self.inbox = inbox
        self.clock = clock
        self.queue_limit = queue_limit

    def infer(
        self, request_id: str, model: ModelState, images: list[np.ndarray], top_k: int | None, deadline: float
    ) -> list[wire.Result]:
        """One result per image, in order; `deadline` is on Redis' clock (serving.clock).

        The job of a lone image carries the request's id; several are numbered: "<id>/0", "<id>/1", ...
        """
        ids = [request_id] if len(images) == 1 else [f"{request_id}/{n}" for n in range(len(images))]
        reply_to = self.inbox.worker_id
        jobs = [wire.Job(i, reply_to, pixels, deadline, top_k) for i, pixels in zip(ids, images, strict=True)]
        with self.inbox.expect(model.keys, ids) as expected:
            self._submit(model, jobs)
            results = expected.wait(deadline - self.clock.now())
        if len(results) < len(ids):
            raise TimedOut()
        return [results[i] for i in ids]

    def _submit(self, model: ModelState, jobs: list[wire.Job]) -> None:
        status, _ = queue.submit(self.r, model.keys, jobs, self.queue_limit)
        if status is queue.Submitted.FULL:
            raise Refused("overloaded", f"{model.keys.name} is at capacity; retry after a second")
        if status is queue.Submitted.NO_SERVER:
            raise Refused("unavailable", f"no model server of {model.keys.name} is running; try again later")
