"""`make bench`: the ceiling, the naive Flask server and this system, side by side, in one run.

For each model: (1) the model's own predict on ready tensors at batch 1 and at the best batch
size, (2) bench/naive_server.py and (3) this system through HTTP, both loaded by stress_test.py
in a closed loop at each concurrency. Writes bench/results/latest.{md,json,png}.

    .venv/bin/python -m bench.run [--models resnet50 digits] [--duration 15]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import CORES, RESULTS, ModelSpec, command_line, load_curve, model_spec, our_stack
from scripts.processes import REPO, free_port, http_ok, start_python, stop, wait_until

CONCURRENCY = (1, 8, 32, 64)
CEILING_BATCHES = (1, 8, 16, 32, 64)


def ceiling(spec: ModelSpec) -> dict[str, dict[int, float]]:
    """Images a second at each batch size, for our predict_on_batch call and Keras' model.predict."""
    command = [sys.executable, str(REPO / "bench" / "ceiling.py"), str(spec.path), spec.preprocess]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*command, *map(str, CEILING_BATCHES)], check=True, capture_output=True, text=True, env=env)
    rates = json.loads(out.stdout.splitlines()[-1])
    return {call: {int(b): rate for b, rate in by_batch.items()} for call, by_batch in rates.items()}


def naive(spec: ModelSpec, duration: float) -> dict[int, dict]:
    port = free_port()
    process = start_python("bench/naive_server.py", {**spec.env, "PORT": str(port), "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/health"), 180, "naive server", process)
        return load_curve(url, spec.image, CONCURRENCY, duration)
    finally:
        stop(process)


def ours(spec: ModelSpec, duration: float) -> dict[int, dict]:
    stack, url = our_stack(spec)
    try:
        curve = load_curve(url, spec.image, CONCURRENCY, duration)
        # This machine's speed drifts by up to 2x within minutes, so our overhead at concurrency 1 is
        # measured against the predicts of the same run: the model server logs each one's time.
        curve[1]["predict_ms"] = statistics.median(stack.model_ms(size=1))
        return curve
    finally:
        stack.close()


def report(results: dict) -> str:
    lines = [
        f"Measured {results['when']} on {results['machine']}; `make bench` (`{results['command']}`).",
        "",
        "Ceiling: images a second of the model's own predict on ready tensors (preprocessing included).",
        "",
        "| model | call | batch 1 | " + " | ".join(f"batch {b}" for b in CEILING_BATCHES[1:]) + " |",
        "| --- | --- |" + " ---: |" * len(CEILING_BATCHES),
    ]
    for name, r in results["models"].items():
        for call, by_batch in r["ceiling"].items():
            cells = " | ".join(f"{by_batch[b]:.1f}" for b in CEILING_BATCHES)
            lines.append(f"| {name} | `{call}` | {cells} |")
    lines += [
        "",
        "Through HTTP, closed loop (`stress_test.py --concurrency C`); ceiling = best `predict_on_batch` batch.",
        "",
        "| model | concurrency | naive req/s | naive p50 / p99 ms | ours req/s | ours p50 / p99 ms "
        "| ours / naive | ours / ceiling |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["models"].items():
        top = max(r["ceiling"]["predict_on_batch"].values())
        for c in CONCURRENCY:
            n, o = r["naive"][c], r["ours"][c]
            lines.append(
                f"| {name} | {c} | {n['rps']:.1f} | {n['p50_ms']:.0f} / {n['p99_ms']:.0f} | {o['rps']:.1f} "
                f"| {o['p50_ms']:.0f} / {o['p99_ms']:.0f} | {o['rps'] / n['rps']:.2f} | {o['rps'] / top:.0%} |"
            )
    lines += [
        "",
        "Our overhead at concurrency 1: the client's median latency minus the median time of the batch-1",
        "predicts the model server logged in the same run (so machine-speed drift between runs cancels).",
        "",
        "| model | ours p50 ms | batch-1 predict in the server, median ms | overhead ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results["models"].items():
        p50, predict = r["ours"][1]["p50_ms"], r["ours"][1]["predict_ms"]
        lines.append(f"| {name} | {p50:.1f} | {predict:.1f} | {p50 - predict:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items(), strict=True):
        for system, style in (("naive", "o--"), ("ours", "o-")):
            ax.plot(CONCURRENCY, [r[system][c]["rps"] for c in CONCURRENCY], style, label=system)
        ceiling = r["ceiling"]["predict_on_batch"]
        ax.axhline(max(ceiling.values()), color="grey", linestyle=":", label="ceiling (best batch)")
        ax.axhline(ceiling[1], color="grey", linestyle="-.", label="predict at batch 1")
        ax.set(title=name, xlabel="concurrent clients", ylabel="requests / s", xscale="log", ylim=(0, None))
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = command_line(__doc__, ["resnet50", "digits"], 15.0, "load")
    args = parser.parse_args()
    results = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{CORES} CPU cores, no GPU",
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "models": {},
    }
    for name in args.models:
        spec = model_spec(name)
        print(f"{name}: ceiling", flush=True)
        entry = {"ceiling": ceiling(spec)}
        print(f"{name}: naive server", flush=True)
        entry["naive"] = naive(spec, args.duration)
        print(f"{name}: this system", flush=True)
        entry["ours"] = ours(spec, args.duration)
        results["models"][name] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(report(results))
    plot(results, str(RESULTS / "latest.png"))
    print(report(results))


if __name__ == "__main__":
    main()
