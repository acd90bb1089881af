"""`make bench-overload`: what the server does with more than it can do.

For each model, in one stack: its capacity measured closed loop, a light closed-loop run, then open
loop (stress_test.py --rate) from 0.5x to 10x that capacity, each for --duration seconds of
arrivals: goodput (200s a second until the last 200, over the capacity), the shares of 200, 503
and 504, the p99 of every answer and of the 503s, and the refusals by reason from /metrics; then
the light run again, to show normal service right after. For digits, also a burst of 5,000
clients at once against a default stack, compared with what its measured rate and deadline allow.
The model tier is what the README recommends on a CPU host, one single-threaded model server per
core; --model-servers N --model-threads T runs N of T threads each (MODEL_THREADS; 0: every core).
The model servers run at nice 10 (--model-nice): both tiers share this machine's two cores, and so
a refusal does not wait behind TensorFlow's threads, as on hosts of their own. Writes
bench/results/<--out, default overload>.{json,md,png}.

    .venv/bin/python -m bench.overload [--models resnet50 digits] [--duration 20] [--levels 0.5 1 3 10]
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time
import urllib.request
from dataclasses import dataclass

from bench.common import CORES, RESULTS, command_line, cpu_seconds, model_spec, our_stack, stress
from scripts.processes import Stack

LEVELS = (0.5, 0.6, 1.0, 2.0, 3.0, 5.0, 10.0)
TIMEOUT_S = 10  # REQUEST_TIMEOUT_S of the sweep, as in issue 10
# Per model server. ResNet50: a batch computing and the next filling as its answers come back (one
# server kept 21.1 req/s with 32 clients and 21.7 with 64); digits, whose limit is the web tier: enough
# to keep the web workers busy. No more: past the deadline's depth (0.8 x REQUEST_TIMEOUT_S x rate)
# admission refuses, a closed loop's refused clients retry at once, and the refusals, not the model,
# take the cores. 96 ResNet50 clients did that to one server on a day this machine ran it at 12 req/s:
# 33 answers in 15 s, 25,440 refusals; so did 160 to two servers at 20.
CAPACITY_CLIENTS = {"resnet50": 48, "digits": 128}
LIGHT_CLIENTS = 4
CAPACITY_S = 15.0
WARM_UP_S = 10.0
LIGHT_S = 5.0
# Open loop: connections enough for every accepted request waiting at once plus the refusals in flight.
CONNECTIONS = 4000
BURST = 5000
# Both tiers share this machine's two cores; on separate hosts a refusal never waits for TensorFlow's
# threads. The model server runs at this nice value so that the web tier's CPU comes first, as it would
# on hosts of its own (the model keeps its throughput: the web tier needs little of the CPU).
MODEL_NICE = 10
# The /metrics counters read after each point, summed over their labels but `reason` (or `status`).
COUNTED = ("serving_refused_total", "serving_expired_total", "serving_late_total", "serving_finished_late_total")
GONE = "serving_requests_total/499"  # requests read after their client had closed the connection, not computed


def counters(url: str) -> dict[str, float]:
    """The COUNTED figures now, e.g. {"serving_refused_total/wait": 12.0, "serving_late_total": 3.0}, and GONE."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in COUNTED or (name == "serving_requests_total" and 'status="499"' in rest):
            reason = re.search(r'(?:reason|status)="([^"]+)"', rest)
            key = f"{name}/{reason.group(1)}" if reason else name
            found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in sorted(after) if after[key] != before.get(key, 0.0)}


def goodput_rps(run: dict) -> float:
    """200s a second until the last 200 (stress_test.py's goodput_rps); 0 when none came."""
    return run["goodput_rps"] or 0.0


def point(run: dict, capacity: float) -> dict:
    """The figures of one open- or closed-loop run, shares of every request sent."""
    n = run["requests"]
    statuses = run["status_counts"]
    shares = {code: statuses.get(code, 0) / n for code in ("200", "503", "504")}
    shares["other"] = 1 - sum(shares.values())  # other statuses, and no answer at all (e.g. "TimeoutError")
    by_status = run.get("latency_ms_by_status", {})
    # Over the run's whole duration, the open loop past the web tier's pace adds a drain of client-side
    # timeouts while the server idles; goodput_rps ends at the last 200 instead.
    ok_rps = goodput_rps(run)
    return {
        "requests": n,
        "ok_rps": ok_rps,
        "ok_rps_with_drain": run["ok"] / run["duration_s"],
        "goodput": ok_rps / capacity,
        "shares": shares,
        "errors": run["errors"],
        "error_codes": run.get("error_codes", {}),
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": run["latency_ms"]["p99"],
        "p99_503_ms": by_status.get("503", {}).get("p99"),
        "p99_200_ms": by_status.get("200", {}).get("p99"),
        # The load generator shares the machine: at 100% of its core it sends late and offers less than asked.
        "client_cpu_percent": run.get("client_cpu_percent"),
        "send_lag_p99_ms": run.get("schedule_lag_ms", {}).get("p99"),
    }


@dataclass(frozen=True)
class ModelTier:
    """How the sweep runs the model tier: how many model servers, their MODEL_THREADS, their nice value."""

    # On a CPU host the sweep runs what the README recommends there: one single-threaded model server per
    # core. A predict over every core waits at each op's end for its slowest thread, and under overload
    # the web tier's refusals interrupt one of them all the time (README: Scaling and tuning).
    servers: int = CORES
    threads: int = 1  # MODEL_THREADS: 0 is the backend's own choice, every core
    nice: int = MODEL_NICE

    def capacity_clients(self, name: str) -> int:
        return CAPACITY_CLIENTS[name] * self.servers

    def describe(self) -> str:
        threads = f"MODEL_THREADS={self.threads}" if self.threads else "each using every core"
        return f"{self.servers} model server{'s' if self.servers > 1 else ''} ({threads}) at nice {self.nice}"


def stack_for(name: str, tier: ModelTier, **env: str) -> tuple[Stack, str]:
    """A stack serving `name`, every thread of its model servers at the tier's nice value; the web URL."""
    stack, url = our_stack(model_spec(name), tier.servers, MODEL_THREADS=str(tier.threads), **env)
    for model_server in stack.processes[: tier.servers]:
        for thread in os.listdir(f"/proc/{model_server.pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread), tier.nice)
    return stack, url


def sweep(name: str, levels: tuple[float, ...], duration: float, tier: ModelTier) -> dict:
    spec = model_spec(name)
    stack, url = stack_for(name, tier, REQUEST_TIMEOUT_S=str(TIMEOUT_S))
    try:
        cpu = Cores(stack, tier)
        clients = tier.capacity_clients(name)
        closed = measure_capacity(url, spec.image, clients)
        capacity = goodput_rps(closed)
        entry = {
            "capacity_rps": capacity,
            "capacity_clients": clients,
            "capacity_statuses": closed["status_counts"],
            "capacity_cores": cpu.since_last(),
            # against each point's: the load generator's CPU at 10x comes out of the web tier's cores
            "capacity_client_cpu_percent": closed["client_cpu_percent"],
            "points": {},
        }
        entry["light_before"] = light(url, spec.image, capacity)
        for level in levels:
            rate = level * capacity
            print(f"{name}: {level:g}x capacity = {rate:.1f} req/s", flush=True)
            before = counters(url)
            cpu.since_last()
            run = stress(url, spec.image, *open_loop(rate, duration))
            figures = {"metrics": delta(before, counters(url)), "cores": cpu.since_last()}
            entry["points"][str(level)] = {"offered_rps": rate, **point(run, capacity), **figures}
        entry["light_after"] = light(url, spec.image, capacity)
        # What the overload admitted is answered or expired within its deadline; then service must be normal.
        time.sleep(TIMEOUT_S)
        entry["light_after_deadline"] = light(url, spec.image, capacity)
        return entry
    finally:
        stack.close()


class Cores:
    """The cores the model servers and the web tier (gunicorn and its workers) used between two calls."""

    def __init__(self, stack: Stack, tier: ModelTier) -> None:
        self.model_pids = [process.pid for process in stack.processes[: tier.servers]]
        self.web_pid = stack.processes[tier.servers].pid
        self.last = (time.monotonic(), self._seconds())

    def since_last(self) -> dict[str, float]:
        (then, before), now, seconds = self.last, time.monotonic(), self._seconds()
        self.last = (now, seconds)
        return {part: round((seconds[part] - before[part]) / (now - then), 2) for part in seconds}

    def _seconds(self) -> dict[str, float]:
        return {"model": sum(map(cpu_seconds, self.model_pids)), "web": cpu_seconds(self.web_pid)}


def measure_capacity(url: str, image: pathlib.Path, clients: int) -> dict:
    """The closed-loop run whose 200s a second are the capacity, after a warm-up at the same load (a new stack
    gets faster for seconds). Its statuses matter too: a closed loop refused by admission retries at once, and
    its refusals then take the cores from the model."""
    stress(url, image, "--duration", str(WARM_UP_S), "--concurrency", str(clients))
    return stress(url, image, "--duration", str(CAPACITY_S), "--concurrency", str(clients))


def open_loop(rate: float, duration: float, connections: int = CONNECTIONS) -> list[str]:
    return ["--rate", f"{rate:.3f}", "--duration", str(duration), "--connections", str(connections),
            "--timeout", str(TIMEOUT_S + 10)]  # fmt: skip


def light(url: str, image: pathlib.Path, capacity: float) -> dict:
    run = stress(url, image, "--duration", str(LIGHT_S), "--concurrency", str(LIGHT_CLIENTS))
    return point(run, capacity)


def burst(tier: ModelTier) -> dict:
    """BURST digits clients at once against a default stack (REQUEST_TIMEOUT_S 30): who was refused, and
    how many the measured rate could have answered within the deadline."""
    spec = model_spec("digits")
    stack, url = stack_for("digits", tier)
    try:
        capacity = goodput_rps(measure_capacity(url, spec.image, tier.capacity_clients("digits")))
        before = counters(url)
        run = stress(url, spec.image, "--rate", "100000", "--requests", str(BURST), "--connections", str(BURST),
                     "--timeout", "60")  # fmt: skip
        deadline_s = 30.0
        return {
            "capacity_rps": capacity,
            "deadline_s": deadline_s,
            "servable_in_time": min(BURST, int(capacity * deadline_s)),
            **point(run, capacity),
            "duration_s": run["duration_s"],
            "metrics": delta(before, counters(url)),
        }
    finally:
        stack.close()


REFUSALS = ("serving_refused_total/wait", "serving_refused_total/queue_limit")
DROPS = ("serving_late_total", "serving_finished_late_total", "serving_expired_total")


def counted(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return " / ".join(f"{metrics.get(key, 0):.0f}" for key in keys)


def report(results: dict) -> str:
    lines = [
        f"Measured {results['when']} on {results['machine']} with `{results['command']}`; REQUEST_TIMEOUT_S="
        f"{TIMEOUT_S}, everything else default; {results['model_tier']}. Shares are of "
        "every request sent; goodput is 200s a second, from the first request to the last 200, over "
        "the capacity measured closed loop just before, in the same stack.",
        "",
    ]
    for name, r in results["models"].items():
        lines += [
            f"**{name}**: capacity {r['capacity_rps']:.1f} req/s closed loop ({r['capacity_clients']} clients; "
            f"statuses {r['capacity_statuses']}; cores used: {cores(r['capacity_cores'])}; load generator "
            f"CPU {r['capacity_client_cpu_percent']:.0f}%).",
            "",
            "| offered | req/s | requests | goodput | 200 | 503 | 504 | other | p99 ms | p99 of 503 ms "
            "| refused (wait / queue_limit) | late / finished late / expired | client gone (499) "
            "| load generator CPU, send lag p99 | cores: model / web |",
            "|" + " ---: |" * 15,
        ]
        for level, p in r["points"].items():
            s = p["shares"]
            p503 = "-" if p["p99_503_ms"] is None else f"{p['p99_503_ms']:.0f}"
            lines.append(
                f"| {float(level):g}x | {p['offered_rps']:.1f} | {p['requests']} | {p['goodput']:.0%} "
                f"| {s['200']:.1%} | {s['503']:.1%} | {s['504']:.1%} | {s['other']:.1%} | {p['p99_ms']:.0f} | {p503} "
                f"| {counted(p['metrics'], REFUSALS)} | {counted(p['metrics'], DROPS)} "
                f"| {counted(p['metrics'], (GONE,))} | {generator(p)} "
                f"| {p['cores']['model']:.2f} / {p['cores']['web']:.2f} |"
            )
        b, a, d = r["light_before"], r["light_after"], r["light_after_deadline"]
        lines += [
            "",
            f"Light load ({LIGHT_CLIENTS} clients closed loop, {LIGHT_S:g} s) before the sweep: {light_line(b)}; "
            f"right after the last point: {light_line(a)}; {TIMEOUT_S} s later (the deadline of what the last point "
            f"admitted): {light_line(d)}.",
            "",
        ]
    if "burst" in results:
        b = results["burst"]
        shares = ", ".join(f"{share:.1%} {code}" for code, share in b["shares"].items())
        lines += [
            f"**digits, {BURST} clients at once** (REQUEST_TIMEOUT_S {b['deadline_s']:g}, everything default): "
            f"capacity {b['capacity_rps']:.0f} req/s closed loop, so about {b['servable_in_time']} could be answered "
            f"within the deadline and {BURST - b['servable_in_time']} could not. Got: {shares}; errors {b['errors']}; "
            f"p99 {b['p99_ms']:.0f} ms; all done in {b['duration_s']:.1f} s; counters {b['metrics']}.",
            "",
        ]
    return "\n".join(lines)


def cores(used: dict[str, float]) -> str:
    return f"model servers {used['model']:.2f}, web tier {used['web']:.2f}"


def generator(p: dict) -> str:
    """How hard the load generator worked, e.g. "97%, 412 ms": near 100% it could not send on schedule."""
    if p.get("client_cpu_percent") is None:
        return "-"
    lag = "-" if p["send_lag_p99_ms"] is None else f"{p['send_lag_p99_ms']:.0f} ms"
    return f"{p['client_cpu_percent']:.0f}%, {lag}"


def light_line(p: dict) -> str:
    codes = f" (the rest: {p['error_codes']})" if p.get("error_codes") else ""
    return f"{p['ok_rps']:.1f} req/s, p50 {p['p50_ms']:.0f} ms, {p['shares']['200']:.0%} answered 200{codes}"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    for column, (name, r) in enumerate(models.items()):
        levels = [float(level) for level in r["points"]]
        points = list(r["points"].values())
        shares, latency = axes[0][column], axes[1][column]
        shares.plot(levels, [p["goodput"] for p in points], "o-", color="black", label="goodput (200/s / capacity)")
        for code, color in (("200", "tab:green"), ("503", "tab:orange"), ("504", "tab:red"), ("other", "tab:grey")):
            shares.plot(levels, [p["shares"][code] for p in points], ".--", color=color, label=f"share {code}")
        shares.axhline(0.9, color="black", linestyle=":", linewidth=0.8)
        shares.set(title=f"{name}: capacity {r['capacity_rps']:.1f} req/s", xscale="log", ylim=(0, 1.1),
                   xlabel="offered load (x capacity)", ylabel="fraction")  # fmt: skip
        latency.plot(levels, [p["p99_ms"] for p in points], "o-", label="p99, every answer")
        latency.plot(levels, [p["p99_503_ms"] or float("nan") for p in points], "o-", label="p99 of 503s")
        latency.axhline(50, color="tab:orange", linestyle=":", label="50 ms")
        latency.set(xscale="log", yscale="log", xlabel="offered load (x capacity)", ylabel="ms")
        for ax in (shares, latency):
            ax.set_xticks(levels, [f"{level:g}" for level in levels])
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = command_line(__doc__, ["resnet50", "digits"], 20.0, "arrivals")
    parser.add_argument("--levels", nargs="+", type=float, default=list(LEVELS))
    parser.add_argument("--no-burst", action="store_true", help="leave out the burst of 5,000 digits clients")
    parser.add_argument("--model-nice", type=int, default=MODEL_NICE, help="the model servers' nice value")
    parser.add_argument("--model-servers", type=int, default=CORES, help="model servers per model (one per core)")
    parser.add_argument("--model-threads", type=int, default=1, help="MODEL_THREADS of each (0: every core)")
    parser.add_argument("--out", default="overload", help="results go to bench/results/OUT.{json,md,png}")
    args = parser.parse_args()
    tier = ModelTier(args.model_servers, args.model_threads, args.model_nice)
    results = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{CORES} CPU cores, no GPU",
        "command": " ".join(["python -m bench.overload", *sys.argv[1:]]),
        "model_tier": tier.describe(),
        "models": {name: sweep(name, tuple(args.levels), args.duration, tier) for name in args.models},
    }
    if not args.no_burst:
        print(f"digits: {BURST} clients at once", flush=True)
        results["burst"] = burst(tier)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(report(results))
    plot(results, str(RESULTS / f"{args.out}.png"))
    print(report(results))


if __name__ == "__main__":
    main()
