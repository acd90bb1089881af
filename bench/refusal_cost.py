"""What a refusal costs the web tier against an answer, and the bound that sets on goodput under overload.

Closed loop, 128 clients posting the digits PNG, the web workers' CPU per request measured from /proc:
- a 200 from the web tier as deployed (MODEL=digits, everything else default);
- a refusal through the app: `timeout_ms=1`, parsed and answered 504 before any decoding or queueing;
- a canned 503 from gunicorn's gevent worker (ours) with no Flask behind it: the least a refusal costs
  in a Python web worker.
A web tier whose CPU is the bottleneck, refusing at a share r of an answer's cost, keeps g = (1 - k r)
/ (1 - r) of its capacity at k times it: what it serves and refuses add up to its CPU, g + r (k - g) = 1.
Then the same canned 503 in open loop at RATES, posting the 640x480 JPEG of ResNet50's overload sweep:
what a refusal costs when refusals come as they do past a slow model's capacity (200 a second at 10x
ResNet50 here), a few at a time, each waking a worker that had gone idle.
Then requests whose clients close the connection right after sending them, a new connection each, read
late (the web workers stopped meanwhile), as those whose clients gave up waiting are read under overload:
what the web tier spends on each, answering 499.
Writes bench/results/refusal_cost.md.

    .venv/bin/python -m bench.refusal_cost [--duration 15]
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import stress_test
from bench import overload
from bench.common import RESULTS, children, command_line, cpu_seconds, model_spec, our_stack, photo, stress
from scripts.processes import REPO, free_port, stop, wait_until
from serving.shedding import READ_LATE_S

CLIENTS = 128
CLOSED_LOOP = ("--concurrency", str(CLIENTS))
RATES = (50, 200, 1000, 3000)  # refusals a second, open loop
WARM_UP_S = 5.0
SENT_AND_CLOSED = 6000  # requests sent and closed at once
AT_ONCE = 200
CANNED = b'{"success": false, "error": {"code": "overloaded", "message": "overloaded; retry after 1 s"}}'


def app(environ: dict, start_response) -> list[bytes]:  # noqa: ANN001 (WSGI's signature)
    """The canned refusal: nothing read, nothing parsed beyond what gunicorn does itself."""
    start_response("503 SERVICE UNAVAILABLE", [("Content-Type", "application/json"), ("Retry-After", "1")])
    return [CANNED]


def cpu_per_request(
    web_pid: int,
    url: str,
    duration: float,
    path: str = "/predict",
    load: tuple[str, str] = CLOSED_LOOP,
    image: pathlib.Path | None = None,
) -> dict:
    """One run after a warm-up (closed loop with the digits PNG unless `load` and `image` say otherwise): its
    statuses and the web workers' CPU milliseconds per request."""
    image = image or model_spec("digits").image
    stress(url, image, "--duration", str(WARM_UP_S), *load, path=path)
    before = cpu_seconds(web_pid)
    run = stress(url, image, "--duration", str(duration), *load, path=path)
    cpu_ms = 1000 * (cpu_seconds(web_pid) - before) / run["requests"]
    return {"statuses": run["status_counts"], "rps": run["throughput_rps"], "cpu_ms": cpu_ms}


def measure(duration: float) -> dict[str, dict]:
    stack, url = our_stack(model_spec("digits"))
    try:
        web = stack.processes[1].pid
        runs = {
            "200": cpu_per_request(web, url, duration),
            "app": cpu_per_request(web, url, duration, "/predict?timeout_ms=1"),
            "gone": gone_cpu(web, url),
        }
    finally:
        stack.close()
    port = free_port()
    options = ["--worker-class", "serving.gunicorn_worker.Worker", "--workers", "2", "--worker-connections", "10000"]
    bind = ["--keep-alive", "30", "--bind", f"127.0.0.1:{port}"]
    canned = subprocess.Popen([sys.executable, "-m", "gunicorn", *options, *bind, "bench.refusal_cost:app"], cwd=REPO)
    try:
        wait_until(lambda: accepts(port), 30, "the canned server")  # the warm-up run covers its workers' boot
        canned_url = f"http://127.0.0.1:{port}"
        runs["canned"] = cpu_per_request(canned.pid, canned_url, duration)
        for rate in RATES:
            runs[f"open {rate}"] = cpu_per_request(
                canned.pid, canned_url, duration, load=("--rate", str(rate)), image=photo()
            )
    finally:
        stop(canned)
    return runs


def gone_cpu(web_pid: int, url: str) -> dict:
    """SENT_AND_CLOSED requests of the digits PNG, each on a connection closed once it is sent: their statuses,
    and the web workers' CPU milliseconds for each until the last is counted."""
    image = model_spec("digits").image.read_bytes()
    request = stress_test.http_post(f"{url}/predict", *stress_test.multipart_body("digit.png", image))
    address = (urlsplit(url).hostname, urlsplit(url).port)
    before, counted = cpu_seconds(web_pid), gone_counted(url)
    for _ in range(SENT_AND_CLOSED // AT_ONCE):
        workers = children(web_pid)
        signal_all(workers, signal.SIGSTOP)
        connections = [socket.create_connection(address) for _ in range(AT_ONCE)]  # the kernel accepts them
        for connection in connections:
            connection.sendall(request)
            connection.close()
        time.sleep(READ_LATE_S + 0.2)
        signal_all(workers, signal.SIGCONT)
        time.sleep(0.5)  # to read them, and to tell gunicorn's master they live (its timeout kills the silent)
    last, now = -1.0, gone_counted(url)
    while now > last:  # until a second passes without another counted
        time.sleep(1.0)
        last, now = now, gone_counted(url)
    cpu_ms = 1000 * (cpu_seconds(web_pid) - before) / SENT_AND_CLOSED
    return {"statuses": {"499": int(now - counted)}, "rps": None, "cpu_ms": cpu_ms}


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def gone_counted(url: str) -> float:
    """The 499s in the web tier's metrics so far."""
    return overload.counters(url).get(overload.GONE, 0.0)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


NAMES = {
    "200": "200 from the web tier",
    "app": "refusal through the app (504, timeout_ms=1)",
    "gone": "499: sent, its connection closed at once, read late",
    "canned": "canned 503 from gunicorn's gevent worker, no Flask",
    **{f"open {rate}": f"the same canned 503, open loop at {rate}/s, the JPEG" for rate in RATES},
}


def kept(k: float, r: float) -> float:
    """The share of its capacity a CPU-bound web tier keeps at k times it, refusing at r of an answer's cost."""
    return max(0.0, (1 - k * r) / (1 - r)) if r < 1 else 0.0


def report(runs: dict[str, dict]) -> str:
    answer = runs["200"]["cpu_ms"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python -m bench.refusal_cost`: {CLIENTS} clients closed loop "
        "posting the digits PNG, unless open loop at a rate posting the 640x480 JPEG of ResNet50's overload sweep; "
        "the web workers' CPU per request. Kept at kx: the share of its capacity a CPU-bound web tier keeps at k "
        "times it, refusing at that cost.",
        "",
        "| request | statuses | req/s | web CPU per request | share of a 200's | kept at 3x | kept at 10x |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, run in runs.items():
        r = run["cpu_ms"] / answer
        if key in ("app", "canned"):
            share, at_3, at_10 = f"{r:.0%}", f"{kept(3, r):.0%}", f"{kept(10, r):.0%}"
        elif key == "gone":  # not a refusal: what a client that gave up costs
            share, at_3, at_10 = f"{r:.0%}", "-", "-"
        else:  # the 200 itself; the open-loop rows post another image than the 200 measured beside them
            share, at_3, at_10 = ("100%" if key == "200" else "-"), "-", "-"
        rps = "-" if run["rps"] is None else f"{run['rps']:.0f}"
        figures = f"{run['statuses']} | {rps} | {run['cpu_ms']:.3f} ms | {share} | {at_3} | {at_10}"
        lines.append(f"| {NAMES[key]} | {figures} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = command_line(__doc__, ["digits"], 15.0, "closed-loop load").parse_args()
    text = report(measure(args.duration))
    (RESULTS / "refusal_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
