"""Where the time goes under load: batch sizes and busy time from the model server's log, and a
py-spy profile of the model server and one web worker.

    .venv/bin/python -m bench.profile [--model resnet50] [--concurrency 32] [--duration 30] [KEY=VALUE ...]

KEY=VALUE pairs are settings for the stack, e.g. BATCH_WAIT_MS=100.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import subprocess
import sys
import threading
import time

from bench.common import WORK, model_spec, our_stack, stress

MODEL_SERVER_PARTS = [
    ("heartbeat thread (sleeping)", "_heartbeat"),
    ("predict_on_batch", "predict_on_batch"),
    ("preprocess", "preprocess_input"),
    ("take_batch (Redis)", "take_batch"),
    ("answer (Redis)", "answer"),
    ("decode jobs", "_sort_out"),
    ("top-k and encode", "_predict"),
    ("metrics", "record_batch"),
]
WEB_WORKER_PARTS = [
    ("image decode", "images.py"),
    ("wait for result", "wait_result"),
    ("submit", "submit"),
    ("flask/werkzeug", "werkzeug"),
    ("gevent hub (idle)", "hub.py"),
]


def py_spy(pid: int, seconds: int, out: pathlib.Path) -> subprocess.Popen:
    spy = pathlib.Path(sys.executable).with_name("py-spy")  # installed beside the interpreter
    command = [str(spy), "record", "--pid", str(pid), "--duration", str(seconds)]
    return subprocess.Popen([*command, "--format", "raw", "--idle", "--rate", "200", "-o", str(out)])


def shares(raw: pathlib.Path, parts: list[tuple[str, str]]) -> dict[str, str]:
    """Each part's share of all samples (a sample counts for the first part its stack mentions)."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        counts[next((label for label, needle in parts if needle in stack), "other")] += int(samples)
    total = sum(counts.values())
    return {label: f"{100 * n / total:.1f}%" for label, n in counts.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    spec = model_spec(args.model)
    stack, url = our_stack(spec, **dict(pair.split("=", 1) for pair in args.settings))
    try:
        stress(url, spec.image, "--requests", "40", "--concurrency", "8")  # warm-up
        logged_before, started = len(stack.batches()), time.monotonic()
        load = ["--duration", str(args.duration), "--concurrency", str(args.concurrency)]
        runner = threading.Thread(target=lambda: print("load:", stress(url, spec.image, *load)))
        runner.start()
        time.sleep(5)
        master = stack.processes[1].pid
        worker = int(pathlib.Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
        outs = {"model server": WORK / "profile-model.txt", "web worker": WORK / "profile-web.txt"}
        pids = (stack.processes[0].pid, worker)
        spies = [py_spy(pid, args.duration - 10, out) for pid, out in zip(pids, outs.values(), strict=True)]
        for spy in spies:
            spy.wait()
        runner.join()
        elapsed = time.monotonic() - started
        sizes = [size for size, _ in stack.batches()[logged_before:]]
        predict_s = sum(stack.model_ms()[logged_before:]) / 1000
    finally:
        stack.close()
    print(f"batches: {len(sizes)}, mean size {sum(sizes) / len(sizes):.1f}, first sizes {sizes[:16]}")
    print(f"model busy {predict_s / elapsed:.0%} of the run, {sum(sizes) / predict_s:.1f} images/s while predicting")
    print("model server:", shares(outs["model server"], MODEL_SERVER_PARTS))
    print("web worker:", shares(outs["web worker"], WEB_WORKER_PARTS))


if __name__ == "__main__":
    main()
