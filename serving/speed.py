"""How fast one model server is: its allowed batch sizes, their measured times, and what fits a deadline.

Batches are padded to a few allowed sizes (as Triton's and TF Serving's allowed batch sizes), all
compiled at start-up, so a batch of a size never seen before costs no compilation mid-traffic.
The same measured times are what the server publishes (wire.Speed) for the web tier's admission
and what the server itself uses to choose a batch size for the oldest job's deadline.
"""

from __future__ import annotations

import bisect
import threading

from serving import wire

# Weight of the newest batch in the moving estimates: about the last five batches count.
SMOOTHING = 0.2


def allowed_sizes(batch_size: int) -> tuple[int, ...]:
    """The sizes a batch is padded to: powers of two below batch_size, and batch_size itself."""
    powers = [1 << k for k in range(batch_size.bit_length()) if 1 << k < batch_size]
    return (*powers, batch_size)


def padded(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest allowed size that holds n images."""
    return sizes[bisect.bisect_left(sizes, n)]


class Meter:
    """Moving estimates of one predict's seconds at each allowed size and of a batch's time outside it."""

    def __init__(self, sizes: tuple[int, ...], predict_seconds: dict[int, float], extra_seconds: float) -> None:
        self.sizes = sizes
        self._predict = dict(predict_seconds)
        self._extra = extra_seconds
        self._lock = threading.Lock()  # written by the answering thread, read by the others

    def predict_seconds(self, size: int) -> float:
        return self._predict[size]

    @property
    def extra_seconds(self) -> float:
        return self._extra

    def observe(self, size: int, predict_s: float, extra_s: float) -> None:
        """One live batch, padded to `size`: its predict and its take + decode + answer time."""
        with self._lock:
            self._predict[size] += SMOOTHING * (predict_s - self._predict[size])
            self._extra += SMOOTHING * (extra_s - self._extra)

    def largest_within(self, seconds: float) -> int:
        """The largest allowed size whose batch, once it starts, is answered within `seconds`; 0 if none."""
        fitting = [n for n in self.sizes if self._predict[n] + self._extra <= seconds]
        return fitting[-1] if fitting else 0

    def speed(self) -> wire.Speed:
        with self._lock:
            return wire.Speed(self.sizes[-1], dict(self._predict), self._extra)
