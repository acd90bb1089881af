"""The ceiling: the model's own batched predict on ready uint8 tensors, as the model server calls it.

Also measures Keras' `model.predict` of the same uint8-input model, the call most single-file
servers make, to show what the model server gains by calling `predict_on_batch` instead (no
tf.data pipeline per call).

    python bench/ceiling.py PATH PREPROCESS [BATCH ...]
      ->  JSON {"predict_on_batch": {batch: images/s}, "predict": {batch: images/s}}
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np

from serving import zoo

MIN_SECONDS = 3.0  # per batch size and call, after warm-up: enough repeats to average out noise


def images_per_second(run: Callable[[np.ndarray], object], shape: tuple[int, ...], batch: int) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, *shape), np.uint8)
    run(x)  # trace and allocate outside the timing
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < MIN_SECONDS:
        run(x)
        done += batch
    return done / (time.perf_counter() - started)


def main(path: str, preprocess: str, batches: list[int]) -> None:
    servable = zoo.load(path, preprocess=preprocess)

    def classic(x: np.ndarray) -> object:
        return servable.served.predict(x, verbose=0)

    calls = {"predict_on_batch": servable.predict, "predict": classic}
    shape = servable.info.shape
    rates = {name: {b: round(images_per_second(run, shape, b), 2) for b in batches} for name, run in calls.items()}
    print(json.dumps(rates))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]] or [1, 8, 16, 32, 64])
