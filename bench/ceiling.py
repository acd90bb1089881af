"""The ceiling: the model's own batched predict on ready uint8 tensors, as the model server calls it.

python bench/ceiling.py PATH PREPROCESS [BATCH ...]   ->  JSON {batch: images per second}
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from serving import zoo

MIN_SECONDS = 3.0  # per batch size, after warm-up: enough repeats to average out noise


def images_per_second(servable: zoo.Servable, batch: int) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, *servable.info.shape), np.uint8)
    servable.predict(x)  # trace and allocate outside the timing
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < MIN_SECONDS:
        servable.predict(x)
        done += batch
    return done / (time.perf_counter() - started)


def main(path: str, preprocess: str, batches: list[int]) -> None:
    servable = zoo.load(path, preprocess=preprocess)
    print(json.dumps({b: round(images_per_second(servable, b), 2) for b in batches}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]] or [1, 8, 16, 32, 64])
