"""How long a full garbage collection stops each tier, before and after gc.freeze(), which both call once
started (serving/gunicorn_conf.py's post_worker_init, model_server.py after its warm-up).

What a process imports at start lives as long as it does, yet every full collection walks it again: in a
web worker it held up every request the worker had in hand, in a model server the batch in predict.
Each tier is built as its process builds it, in a fresh interpreter, then timed: the median of 5
gc.collect() calls, then the same after gc.freeze(). Prints one line per tier.

    .venv/bin/python -m bench.gc_pause
"""

from __future__ import annotations

import json
import subprocess
import sys

from scripts.processes import REPO, environ_without_settings

BUILDS = {
    # Nothing connects to Redis while the app is built: the unreachable URL is never used.
    "web worker": "from gevent import monkey; monkey.patch_all(); import web_server",
    "model server (digits)": (
        "import numpy as np; from serving import zoo; servable = zoo.load('digits'); "
        "servable.predict(np.zeros((32, 8, 8, 1), np.uint8))"
    ),
}
MEASURE = """
import gc, json, statistics, time
def full_collection_ms():
    times = []
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
objects, before = len(gc.get_objects()), full_collection_ms()
gc.freeze()
print(json.dumps({"objects": objects, "before_ms": before, "after_ms": full_collection_ms()}))
"""


def measure(build: str) -> dict[str, float]:
    env = {**environ_without_settings(), "REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", f"{build}\n{MEASURE}"], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    for tier, build in BUILDS.items():
        m = measure(build)
        print(
            f"{tier}: {m['objects']:,} objects; a full collection {m['before_ms']:.1f} ms, "
            f"{m['after_ms']:.3f} ms after gc.freeze()",
            flush=True,
        )


if __name__ == "__main__":
    main()
