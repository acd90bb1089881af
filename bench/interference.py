"""Does a model tier keep its throughput when something else takes a little of the CPU?

Under overload the web tier's refusals take a core for a fraction of a millisecond at a time, all the
time. This runs the model servers' own predict (a random ResNet50, batches of 32, nice 10 as in
bench.overload) in each layout of the model tier, alone and beside a nice-0 process that spins
BURST_MS at random moments, LOAD of one core on average: the images a second of each, printed and
written to bench/results/interference.md.

    python -m bench.interference [--duration 20] [--layouts 1x0 2x1] [--rounds 3]   (servers x MODEL_THREADS)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

import numpy as np

from bench.common import CORES, RESULTS, model_spec
from scripts.processes import REPO
from serving import zoo

BATCH = 32
BURST_MS = 0.8
LOAD = 0.2  # of one core: about what the web tier used at 10x ResNet50 in bench.overload
NICE = 10


def worker(path: str, threads: int, seconds: float) -> None:
    """One model server's predict loop: warms up, says so, waits for a line on stdin, then reports."""
    import model_server

    os.nice(NICE)
    model_server.use_threads(threads)  # before the backend computes anything
    servable = zoo.load(path, preprocess=model_spec("resnet50").preprocess)  # the file is built already
    batch = np.zeros((BATCH, *servable.info.shape), np.uint8)
    servable.predict(batch)
    print("ready", flush=True)
    sys.stdin.readline()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        servable.predict(batch)
        done += BATCH
    print(json.dumps({"images_per_s": done / (time.perf_counter() - started)}), flush=True)


def spin(seconds: float) -> None:
    """LOAD of one core in bursts of BURST_MS at random moments, for `seconds`."""
    burst = BURST_MS / 1000
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        while time.perf_counter() - started < burst:
            pass
        time.sleep(random.expovariate(LOAD / (burst * (1 - LOAD))))


def run(servers: int, threads: int, seconds: float, loaded: bool) -> float:
    """Images a second of `servers` predict loops of `threads` threads each, run at once."""
    path = str(model_spec("resnet50").path)  # built here, once, not by each loop
    command = [sys.executable, "-m", "bench.interference", "--worker", path, str(threads), "--duration", str(seconds)]
    loops = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(servers)
    ]
    for loop in loops:
        assert loop.stdout.readline().strip() == "ready"
    load = None
    if loaded:
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.interference", "--spin", "--duration", str(seconds + 1)], cwd=REPO
        )
    for loop in loops:
        loop.stdin.write("go\n")
        loop.stdin.flush()
    rates = [json.loads(loop.communicate()[0].splitlines()[-1])["images_per_s"] for loop in loops]
    if load:
        load.wait()
    return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of predict per run")
    parser.add_argument("--layouts", nargs="+", default=["1x0", "2x1"], help="SERVERSxMODEL_THREADS")
    parser.add_argument("--rounds", type=int, default=3, help="each layout this often, in turn")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # PATH THREADS: one predict loop
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)  # the load beside them
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.duration)
    elif args.spin:
        spin(args.duration)
    else:
        compare(args.layouts * args.rounds, args.duration)


def compare(layouts: list[str], seconds: float) -> None:
    """Each layout in turn (a layout may come again: this machine's speed drifts within minutes)."""
    command = " ".join(["python -m bench.interference", *sys.argv[1:]])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {CORES} CPU cores with `{command}`:",
        f"images a second of the model servers' predict of a random ResNet50 (batches of {BATCH}, nice {NICE}),",
        f"alone and beside a nice-0 process spinning {LOAD:g} of one core in bursts of {BURST_MS:g} ms.",
        "",
        f"| layout | images/s alone | beside {LOAD:g} of a core | kept |",
        "| --- | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for layout in layouts:
        servers, threads = map(int, layout.split("x"))
        alone, loaded = (run(servers, threads, seconds, loaded) for loaded in (False, True))
        name = f"{servers} server{'s' if servers > 1 else ''}, MODEL_THREADS={threads}"
        lines.append(f"| {name} | {alone:.1f} | {loaded:.1f} | {loaded / alone:.0%} |")
        print(lines[-1], flush=True)
    (RESULTS / "interference.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
