"""The wait a new request faces, predicted from the model servers' measured speeds: what admission decides on.

A request's last image sits behind the images the model servers already hold (taken into their
in-flight lists, not answered yet) and those queued ahead of it. Its answer comes once the model
tier has worked through all of them at its measured rate (every live server's full batch over that
batch's time), plus the time of the batch that holds it. Admission lets the queue hold only as many images as the model
tier can answer within a share (HEADROOM) of the request's remaining time: the rest of that time
covers an estimate that lags when the machine slows down, and the answer's way back to the client.
"""

from __future__ import annotations

import bisect
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from serving import wire

# The share of its remaining time a request's predicted wait may fill. Under overload the queue
# stays at the depth this allows, so the model never idles whatever the share; a smaller share only
# keeps accepted requests safer from a slowdown the moving estimates have not seen yet.
HEADROOM = 0.8
# The depth allowed while no server has published a speed: no limit but QUEUE_LIMIT (see the README).
UNBOUNDED = sys.maxsize


class BatchTimes:
    """One server's time for a batch of any size, from its published speed: between measured sizes
    interpolated, below the smallest as the smallest, beyond the largest at its time per image
    (bigger batches cost no less).

    Each size's time is its own moving estimate, so noise can make a small batch read slower than a
    bigger one; each size counts as the slowest of the sizes up to it. Predicted waits then grow
    with the queue's depth, which depth_within's search relies on. Built once per estimate: the
    search asks for many sizes.
    """

    def __init__(self, speed: wire.Speed) -> None:
        self.batch_size = speed.batch_size
        self.sizes = sorted(speed.batch_seconds)
        self.seconds = list(itertools.accumulate((speed.batch_seconds[n] for n in self.sizes), max))
        self.extra_seconds = speed.extra_seconds

    def __call__(self, size: int) -> float:
        i = bisect.bisect_left(self.sizes, size)
        if i == len(self.sizes):
            predict = self.seconds[-1] * size / self.sizes[-1]
        elif i == 0 or self.sizes[i] == size:
            predict = self.seconds[i]
        else:
            low, high = self.sizes[i - 1], self.sizes[i]
            share = (size - low) / (high - low)
            predict = self.seconds[i - 1] + share * (self.seconds[i] - self.seconds[i - 1])
        return predict + self.extra_seconds


def batch_time(speed: wire.Speed, size: int) -> float:
    """Seconds one server takes for a batch of `size` (see BatchTimes)."""
    return BatchTimes(speed)(size)


class Estimate:
    """What the live servers' published speeds predict; `known` is False until one has measured a batch."""

    def __init__(self, speeds: Sequence[wire.Speed], held: int = 0) -> None:
        self.held = held  # images the servers have taken and not answered: ahead of the whole queue
        self.servers = [BatchTimes(speed) for speed in speeds if speed.batch_seconds]
        self.known = bool(self.servers)
        # Images a second of the whole model tier, each server running full batches.
        self.rate = sum(s.batch_size / s(s.batch_size) for s in self.servers)
        # The queue drains in steps, not smoothly: each server takes a full batch at once.
        self.step = sum(s.batch_size for s in self.servers)

    def wait_s(self, images: int) -> float:
        """Seconds until the last of `images` queued images (the queue ahead and a request's own) is answered.

        What the servers hold and the queue drain at the tier's rate; the last batch may land on the
        slowest server. Its images count in both terms: a batch's images are answered together, at its end.
        """
        if not self.known:
            return 0.0
        last_batch = max(s(max(1, min(images, s.batch_size))) for s in self.servers)
        return (self.held + images) / self.rate + last_batch

    def depth_within(self, budget_s: float) -> int:
        """The most images the queue may hold, a new request's own included, for the last to be answered
        within budget_s; UNBOUNDED while no speed is known."""
        if not self.known:
            return UNBOUNDED
        low, high = 0, max(1, math.ceil(budget_s * self.rate))  # wait_s(n) > n / rate
        while low < high:  # the largest n with wait_s(n) <= budget_s; wait_s grows with n
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.wait_s(middle) <= budget_s else (low, middle - 1)
        return low

    def drained(self, seconds: float) -> int:
        """Images the tier answers in `seconds` at its measured rate."""
        return int(self.rate * seconds)


@dataclass(frozen=True)
class Limit:
    """How many images the queue may hold, a new request's included, and which rule says so."""

    depth: int
    cause: str  # "wait": the deadline allows no more; "queue_limit": the memory cap (QUEUE_LIMIT)


def limit(estimate: Estimate, remaining_s: float, queue_limit: int) -> Limit:
    """The depth a request with remaining_s left may join: what HEADROOM of that time allows, within QUEUE_LIMIT."""
    allowed = estimate.depth_within(HEADROOM * remaining_s)
    return Limit(allowed, "wait") if allowed < queue_limit else Limit(queue_limit, "queue_limit")


def feasible(speeds: Sequence[wire.Speed], images: int, remaining_s: float) -> bool:
    """Whether an idle model tier (nothing held, nothing queued) could answer `images` in HEADROOM of remaining_s:
    if not, waiting would not help."""
    return Estimate(speeds).wait_s(images) <= HEADROOM * remaining_s  # what depth_within() searches, for one n


def retry_after_s(estimate: Estimate, excess: int) -> float:
    """How long until `excess` images have drained from the queue; a second while no speed is known."""
    return excess / estimate.rate if estimate.known else 1.0
