"""The web tier's way to the model tier: admit a request's images for one model, queue them, wait for their answers.

Knows nothing of HTTP: it raises Refused or TimedOut, and the routes turn those into answers.
Admission (serving.admission) refuses a request whose answer the model tier could not deliver
before its deadline: once cheaply from what this worker already knows (refuse_early, before the
image is decoded), and then for certain in the same atomic step that queues it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import redis

from serving import admission, metrics, queue, wire
from serving.admission import Estimate, Limit
from serving.catalog import REFRESH_S
from serving.clock import RedisClock
from serving.registry import ModelState
from serving.results import UNSERVED, Expected, Inbox


class Refused(Exception):
    """Not queued: `reason` is the contract's code, "overloaded" (with a retry_after_s) or "unavailable"."""

    def __init__(self, reason: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after_s = reason, message, retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Retry-After's value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


class NotServed(Exception):
    """Not queued: the version has no registered model server (its last one left since the registry was read)."""


class TimedOut(Exception):
    """The deadline passed before every answer came, or `message` says why no answer could come in time."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class InferenceClient:
    def __init__(self, r: redis.Redis, inbox: Inbox, clock: RedisClock, queue_limit: int) -> None:
        self.r = r
        self.inbox = inbox
        self.clock = clock
        self.queue_limit = queue_limit
        # Per model: the queue depth this worker last saw (in a submit's answer) and when, on time.monotonic().
        self._seen: dict[wire.ModelKeys, tuple[int, float]] = {}

    def refuse_early(self, model: ModelState, count: int, deadline: float) -> None:
        """Raise Refused or TimedOut when what this worker knows already shows that `count` images cannot be
        answered by `deadline`; before any image is decoded, so a refusal is cheap.

        The queue is taken as what this worker last saw (for at most REFRESH_S, then the registry's read)
        minus what the model tier has answered since at its measured rate: other workers' arrivals only
        add to it, so this refuses nothing the queue itself would accept. Within one step of the drain
        (a batch of each server) of the limit, the queue's own length is read instead. Without a
        published speed there is no such guess, and nothing is refused here.
        """
        estimate, limit = self._admission(model, count, deadline)
        if not estimate.known:
            return
        queued = self._queued(model, estimate)
        if queued + count > limit.depth - estimate.step:
            # Near the limit this worker's view is least sure: the queue drains a batch at a time, and other
            # workers fill it unseen. The queue's length costs one round trip; decoding an image that its
            # submit then refuses costs more (at 10x ResNet50, every other submit was refused so).
            queued = queue.depth(self.r, model.keys)
            self._seen[model.keys] = (queued, time.monotonic())
        if queued + count > limit.depth:
            raise self._refusal(model, estimate, limit, queued, count)
        # Counted as queued until its submit says what the queue really holds, so that the requests this
        # worker lets through meanwhile do not all count on the same room.
        self._seen[model.keys] = (queued + count, time.monotonic())

    def overloaded(self, model: ModelState, count: int, deadline: float) -> Refused | None:
        """The refusal refuse_early would raise because the model is overloaded, counted but with nothing
        recorded as queued (serving.shedding answers it before the request's body is read); None when it
        would not refuse for that reason, also when the deadline alone decides."""
        remaining = deadline - self.clock.now()
        if remaining <= 0 or not admission.feasible(model.speeds, count, remaining):
            return None
        estimate, limit = self._limit(model, remaining)
        queued = self._queued(model, estimate)
        if estimate.known and queued + count > limit.depth:
            return self._refusal(model, estimate, limit, queued, count)
        return None

    def _queued(self, model: ModelState, estimate: Estimate) -> int:
        """The model's queue as this worker knows it now: as last seen, less what has drained since."""
        depth, seen_at = self._seen.get(model.keys, (0, -math.inf))
        if time.monotonic() - seen_at > REFRESH_S:  # the registry's read (at most REFRESH_S old) is fresher
            depth, seen_at = model.queued, time.monotonic() - REFRESH_S
        return max(0, depth - estimate.drained(time.monotonic() - seen_at))

    def infer(
        self,
        request_id: str,
        model: ModelState,
        images: list[np.ndarray],
        top_k: int | None,
        deadline: float,
        still_served: Callable[[], bool] | None = None,
    ) -> list[wire.Result]:
        """One result per image, in order; images in the model's channel order (info.bgr), `deadline` on Redis' clock.

        A request that could go to another version gives `still_served`: whether its version has a live model
        server. It gets NotServed instead of being queued where no model server is registered, and while it
        waits, once still_served() says its version's servers are all gone (looked at every REFRESH_S).

        The job of a lone image carries the request's id; several are numbered: "<id>/0", "<id>/1", ...
        """
        ids = [request_id] if len(images) == 1 else [f"{request_id}/{n}" for n in range(len(images))]
        reply_to = self.inbox.worker_id
        bgr = model.info.bgr
        jobs = [wire.Job(i, reply_to, pixels, deadline, top_k, bgr) for i, pixels in zip(ids, images, strict=True)]
        estimate, limit = self._admission(model, len(jobs), deadline)
        with self.inbox.expect(model.keys, ids) as expected:
            self._submit(model, jobs, estimate, limit, "registered" if still_served else "alive")
            try:
                results = self._wait(expected, deadline, still_served)
                while lost := expected.lost():  # Redis restarted: its copies are gone, this worker's are not
                    # Queued even before a model server is back in the new Redis: each comes on its next heartbeat.
                    self._submit(model, [job for job in jobs if job.request_id in lost], estimate, limit, "nothing")
                    results |= self._wait(expected, deadline, still_served)
            except NotServed:  # it goes to another version: a server of this one that comes back must not compute it
                queue.withdraw(self.r, model.keys, jobs)
                raise
        if unserved := _unserved(jobs, results):  # answered "unavailable": nobody waits for these any more
            queue.withdraw(self.r, model.keys, unserved)
        if len(results) < len(ids):
            raise TimedOut()
        return [results[i] for i in ids]

    def _wait(
        self, expected: Expected, deadline: float, still_served: Callable[[], bool] | None
    ) -> dict[str, wire.Result]:
        """The answers that came by the deadline, or by the time all were settled (some may be LOST); NotServed
        once still_served() is false."""
        while True:
            remaining = deadline - self.clock.now()
            if still_served is None or remaining <= REFRESH_S:
                return expected.wait(remaining)
            results = expected.wait(REFRESH_S)
            if expected.settled:
                return results
            if not still_served():  # its servers died (SIGKILL, OOM): another version answers instead
                raise NotServed()

    def _admission(self, model: ModelState, count: int, deadline: float) -> tuple[Estimate, Limit]:
        """The model tier's estimate and the depth `count` images may join; TimedOut if no depth is short enough."""
        remaining = deadline - self.clock.now()
        if remaining <= 0:  # reading and decoding the request used up its deadline
            metrics.refused(model.keys, "deadline")
            raise TimedOut("the request's deadline passed before its images could be queued")
        if not admission.feasible(model.speeds, count, remaining):  # waiting would not help: no "retry later"
            metrics.refused(model.keys, "deadline")
            needs = Estimate(model.speeds).wait_s(count)
            raise TimedOut(
                f"{model.keys.name} needs about {needs * 1000:.0f} ms for {count} image(s) even when idle; "
                f"this request's deadline leaves {remaining * 1000:.0f} ms"
            )
        return self._limit(model, remaining)

    def _limit(self, model: ModelState, remaining: float) -> tuple[Estimate, Limit]:
        estimate = Estimate(model.speeds, model.held)
        return estimate, admission.limit(estimate, remaining, self.queue_limit)

    def _submit(
        self, model: ModelState, jobs: list[wire.Job], estimate: Estimate, limit: Limit, needs: queue.Needs
    ) -> None:
        """Queue every job in one atomic step that refuses them all when the queue would pass the limit, or
        when the model tier lacks what `needs` names (queue.submit)."""
        status, depth = queue.submit(self.r, model.keys, jobs, limit.depth, needs)
        if status is queue.Submitted.NOT_REGISTERED:
            raise NotServed()
        self._seen[model.keys] = (depth + (len(jobs) if status is queue.Submitted.QUEUED else 0), time.monotonic())
        if status is queue.Submitted.FULL:
            raise self._refusal(model, estimate, limit, depth, len(jobs))
        if status is queue.Submitted.NO_SERVER:
            metrics.refused(model.keys, "no_server")
            message = f"no model server of {model.keys.named} has announced itself lately; try again later"
            raise Refused("unavailable", message)

    def _refusal(self, model: ModelState, estimate: Estimate, limit: Limit, queued: int, count: int) -> Refused:
        """The 503 for `count` images that would pass `limit` behind `queued`, saying truthfully which rule refused."""
        metrics.refused(model.keys, limit.cause)
        retry_s = math.ceil(admission.retry_after_s(estimate, queued + count - limit.depth))
        name = model.keys.name
        if limit.cause == "wait":
            wait_s = estimate.wait_s(queued + count)
            why = (
                f"{name} is overloaded: {queued} images are queued ahead and {estimate.held} in the model servers' "
                f"hands, about {wait_s:.1f} s of work at {estimate.rate:.0f} images/s, more than this request's "
                "deadline allows"
            )
        else:
            why = f"{name}'s queue holds its limit of {self.queue_limit} images (QUEUE_LIMIT)"
        return Refused("overloaded", f"{why}; retry after {max(1, retry_s)} s", retry_s)


def _unserved(jobs: list[wire.Job], results: dict[str, wire.Result]) -> list[wire.Job]:
    """The jobs answered "unavailable" (results.UNSERVED): queued for a version no model server is alive for."""
    return [job for job in jobs if (got := results.get(job.request_id)) and got.error_code == UNSERVED.error_code]
