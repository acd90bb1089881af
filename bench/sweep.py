"""`make sweep`: this system's throughput and latency over BATCH_SIZE and BATCH_WAIT_MS, per model.

BATCH_SIZE is swept under heavy load (where it decides throughput); BATCH_WAIT_MS at light and
moderate load (where waiting for company costs latency or buys batching). Each model's sweep
replaces its own entry in bench/results/sweep.{json,md}; the defaults in settings.py come from
these tables.

    .venv/bin/python -m bench.sweep [--models resnet50 mobilenet_v2 digits] [--duration 10]
"""

from __future__ import annotations

import json
import time

from bench.common import RESULTS, ModelSpec, command_line, load_curve, model_spec, our_stack

BATCH_SIZES = (1, 4, 8, 16, 32, 64)
BATCH_SIZE_LOAD = 64  # concurrent clients while sweeping BATCH_SIZE
WAITS_MS = (0, 2, 5, 10, 25, 50)
WAIT_LOADS = (1, 8, 32)


def measure(spec: ModelSpec, loads: tuple[int, ...], duration: float, **env: str) -> dict[int, dict]:
    stack, url = our_stack(spec, **env)
    try:
        return load_curve(url, spec.image, loads, duration)
    finally:
        stack.close()


def sweep(spec: ModelSpec, duration: float) -> dict:
    sizes = {b: measure(spec, (BATCH_SIZE_LOAD,), duration, BATCH_SIZE=str(b), BATCH_WAIT_MS="0") for b in BATCH_SIZES}
    waits = {w: measure(spec, WAIT_LOADS, duration, BATCH_WAIT_MS=str(w)) for w in WAITS_MS}
    return {"batch_size": sizes, "batch_wait_ms": waits}


def report(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        lines += [
            f"**{name}**: measured {r['when']} with `{r['command']}`.",
            "",
            f"BATCH_SIZE at {BATCH_SIZE_LOAD} concurrent clients (BATCH_WAIT_MS=0):",
            "",
            "| BATCH_SIZE | req/s | p50 ms | p99 ms |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for b, points in r["batch_size"].items():
            p = points[str(BATCH_SIZE_LOAD)]
            lines.append(f"| {b} | {p['rps']:.1f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} |")
        head = " | ".join(f"c={c} req/s | c={c} p50 ms" for c in WAIT_LOADS)
        lines += ["", "BATCH_WAIT_MS (BATCH_SIZE=32):", "", f"| BATCH_WAIT_MS | {head} |"]
        lines.append("| ---: |" + " ---: |" * (2 * len(WAIT_LOADS)))
        for w, points in r["batch_wait_ms"].items():
            cells = " | ".join(f"{points[str(c)]['rps']:.1f} | {points[str(c)]['p50_ms']:.1f}" for c in WAIT_LOADS)
            lines.append(f"| {w} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def save(name: str, entry: dict) -> dict:
    """Add one model's sweep to bench/results/sweep.json, keeping the other models' last sweeps."""
    path = RESULTS / "sweep.json"
    results = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results["models"][name] = json.loads(json.dumps(entry))  # as stored: keys become strings
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "sweep.md").write_text(report(results))
    return results


def main() -> None:
    parser = command_line(__doc__, ["resnet50", "mobilenet_v2", "digits"], 10.0, "load")
    args = parser.parse_args()
    command = f"python -m bench.sweep --models {' '.join(args.models)} --duration {args.duration:g}"
    for name in args.models:
        print(f"sweeping {name}", flush=True)
        entry = {"when": time.strftime("%Y-%m-%d"), "command": command, **sweep(model_spec(name), args.duration)}
        results = save(name, entry)
    print(report(results))


if __name__ == "__main__":
    main()
