"""One batch from take to answer: what it holds, how what was taken is sorted out, and its answers.

Jobs are decoded into rows of one preallocated uint8 array per in-flight slot, so a batch reaches
predict without a copy or a stack. What cannot be computed in time (or at all) is answered or
dropped while the batch is taken, not after the predict ahead of it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from serving import logs, wire
from serving.admission import HEADROOM
from serving.speed import Meter

# Rows up to this long are sorted whole: shorter than that, partitioning first costs more than it saves.
PARTITION_FROM = 64

log = logging.getLogger("model_server")


@dataclass
class Batch:
    """What one batch held and what became of it: logged, counted, and handed to `on_batch`."""

    slot: int  # the in-flight list (and pixel array) it lives in
    jobs: list[wire.Job] = field(default_factory=list)  # to compute, in the order of the rows
    rejections: list[tuple[str, wire.Result]] = field(default_factory=list)  # answered at take: (reply_to, result)
    answers: list[tuple[str, wire.Result]] = field(default_factory=list)  # the computed jobs' answers
    counts: Counter[str] = field(default_factory=Counter)  # metrics.COUNTERS: expired, late, malformed, ...
    size: int = 0  # the allowed size predict ran at (len(jobs) padded up); 0 without a predict
    probabilities: np.ndarray | None = None  # one row per job
    failure: str = ""  # why predict failed, if it did
    ran_dry: bool = False  # the queue was empty before the batch was full: nothing else waits to be taken
    # Where the time went: taking from Redis, decoding, predict, building and sending the answers.
    take_seconds: float = 0.0
    decode_seconds: float = 0.0
    model_seconds: float = 0.0
    answer_seconds: float = 0.0

    @property
    def request_ids(self) -> list[str]:
        return [job.request_id for job in self.jobs]

    @property
    def extra_seconds(self) -> float:
        """Its time outside predict, as wire.Speed.extra_seconds counts it."""
        return self.take_seconds + self.decode_seconds + self.answer_seconds

    def results(self) -> list[tuple[str, wire.Result]]:
        """Each computed job's answer, or the failure of its predict."""
        if self.failure or self.probabilities is None:
            return [(job.reply_to, failure(job, "model_error", self.failure)) for job in self.jobs]
        return [(job.reply_to, result_of(job, p)) for job, p in zip(self.jobs, self.probabilities, strict=True)]


class Intake:
    """Sorts the messages taken into one batch, oldest first, into the rows of its pixel array.

    The oldest job that can still be answered in time sets the batch's size: the largest allowed
    size whose measured time fits its deadline (each request's deadline as its SLO, as in Clipper).
    Later jobs join while they too fit; the rest are answered "late" at once.
    """

    def __init__(self, batch: Batch, rows: np.ndarray, bgr: bool, meter: Meter, now: float, starts_at: float) -> None:
        self.batch = batch
        self.rows = rows
        self.bgr = bgr  # the rows' channel order (ModelInfo.bgr)
        self.meter = meter
        self.now = now  # Redis' clock, as deadlines are
        self.starts_at = starts_at  # when predict is expected to be free for this batch, on the same clock
        self.limit = 0  # the most jobs the batch may hold; 0 until its oldest servable job is found
        self.taken = 0
        self.rejected: list[int] = []  # the take order of each message answered or dropped here

    def wanted(self) -> int:
        """How many more messages to take: one at a time until a job sets the size, then up to it."""
        return self.limit - len(self.batch.jobs) if self.limit else 1

    def window(self, wait_s: float, now: float) -> float:
        """How much longer, at `now`, the batch may wait for more jobs: wait_s (BATCH_WAIT_MS) from its start,
        but no longer than answers its most urgent job within the share of the time it had left then that
        admission counts on (HEADROOM). A job that joins with an earlier deadline closes it sooner."""
        earliest = min(job.deadline for job in self.batch.jobs)
        finish = self.meter.predict_seconds(self.limit) + self.meter.extra_seconds
        closes = self.now + min(wait_s, HEADROOM * (earliest - self.now) - finish)
        return max(0.0, closes - now)

    def admit(self, message: bytes) -> None:
        position, self.taken = self.taken, self.taken + 1
        reason = self._sort(message)
        if reason:
            self.batch.counts[reason] += 1
            self.rejected.append(position)

    def _sort(self, message: bytes) -> str:
        """Empty when the job joins the batch; otherwise the counter it goes to, after answering it if it can."""
        try:
            job = wire.Job.decode(message)
        except wire.MalformedMessage as exc:
            logs.event(log, "malformed", logging.ERROR, error=str(exc))
            if address := wire.reply_address(message):
                self._reject(address[1], wire.Result(address[0], error_code="malformed", error=str(exc)))
            return "malformed"
        if job.pixels.shape != self.rows.shape[1:]:
            # The model was replaced under the same name: the web tier prepared it for the old one.
            message = f"this model now takes {self.rows.shape[1:]} images, not {job.pixels.shape}"
            self._reject(job.reply_to, failure(job, "model_changed", message))
            return "model_changed"
        if job.deadline < self.now:
            logs.event(log, "expired", request_id=job.request_id)  # its client stopped waiting
            return "expired"
        if self._late(job):
            logs.event(log, "late", request_id=job.request_id)
            self._reject(job.reply_to, failure(job, "late", "the model tier cannot answer before the deadline"))
            return "late"
        # A job in the other order (from a web tier that read the model's info before a replacement) is flipped.
        self.rows[len(self.batch.jobs)] = job.pixels if job.bgr == self.bgr else job.pixels[..., ::-1]
        self.batch.jobs.append(job)
        return ""

    def _late(self, job: wire.Job) -> bool:
        if not self.limit:  # the oldest job that can make it sets the batch's size
            self.limit = self.meter.largest_within(job.deadline - self.starts_at)
            return not self.limit
        finish = self.starts_at + self.meter.predict_seconds(self.limit) + self.meter.extra_seconds
        return job.deadline < finish

    def _reject(self, reply_to: str, result: wire.Result) -> None:
        self.batch.rejections.append((reply_to, result))


def failure(job: wire.Job, code: str, message: str) -> wire.Result:
    return wire.Result(job.request_id, error_code=code, error=message)


def result_of(job: wire.Job, probabilities: np.ndarray) -> wire.Result:
    """The answer a job asked for: its top_k classes, or every probability; model_error for NaN or infinity,
    which no JSON client could read."""
    if not np.isfinite(probabilities).all():
        return failure(job, "model_error", "the model's output for this image is not a number (NaN or infinity)")
    if job.top_k is None:
        return wire.Result(job.request_id, probabilities=probabilities.astype(np.float32))
    best = top_classes(probabilities, job.top_k)
    return wire.Result(job.request_id, top=tuple((int(i), float(probabilities[i])) for i in best))


def top_classes(probabilities: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k highest probabilities, highest first, ties in index order: a stable sort of
    the whole row, but of only its k best (and their ties) when the row is long, as ImageNet's 1000 are."""
    negated = -probabilities
    if len(negated) <= max(k, PARTITION_FROM):
        return np.argsort(negated, kind="stable")[:k]
    kth = np.partition(negated, k - 1)[k - 1]
    best = np.flatnonzero(negated <= kth)
    if len(best) < k:  # NaNs, which no comparison holds for: the whole sort decides
        return np.argsort(negated, kind="stable")[:k]
    return best[np.argsort(negated[best], kind="stable")][:k]
