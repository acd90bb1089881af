"""`make bench-model`: how fast one model server drains a full queue, against its model's own predict ceiling.

For each model and BATCH_SIZE: the ceiling is the servable's predict (the one the server calls:
uint8 in, preprocessing inside) on a ready batch of that size, same backend, same process: the mean
of one measure just before the drain and one just after, since on a shared machine a measure on one
side alone moves the ratio with whatever else ran meanwhile. The model tier's figure is a model
server (in-process, real Redis) draining a queue pre-filled with 224x224 colour jobs exactly as the
web tier writes them, from its first take to its last answer.
Each batch's time is split into take, decode, predict and answer from the server's own Batch
records; preprocessing inside predict is the servable's time minus the inner model's on ready
float32 input. Each run also records the cores the server's process and Redis used while it
drained, and the floor of its take: one MGET of as many job-sized values from the same Redis.
Also measures what a batch size not seen before costs with and without padding. Each backend runs
in its own process (KERAS_BACKEND is read once, at import); `tensorflow-xla` is TensorFlow with
its predict compiled by XLA, as Keras compiles it on a GPU and not on a CPU.

    .venv/bin/python -m bench.model_tier [--models near_free mobilenet_v2 resnet50] [--batches 1 8 32]
        [--backends tensorflow tensorflow-xla jax] [--system SECONDS] [--out NAME]
        ->  bench/results/NAME.{md,json,png} (default NAME: model_tier)

Last, the whole system on these 2 cores (Redis, one model server of the near-free model, the web
tier) under stress_test.py, with the CPU each part used.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from bench.common import RESULTS, WORK, cpu_seconds
from scripts.processes import REPO, free_port, start_redis, stop, wait_until

MODELS = ("no_model", "near_free", "mobilenet_v2", "resnet50")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
# Beside TensorFlow, each backend runs only what it shows. JAX is the GPU path shown on CPU: the
# near-free model's feed rate and ResNet50 at the size that matters. XLA, as on a GPU, makes the
# near-free model's predict several times faster on CPU; it slows convolutions here (README).
ONLY_RUNS = {"jax": {"near_free": BATCHES, "resnet50": (32,)}, "tensorflow-xla": {"near_free": BATCHES}}
CEILING_S = 2.0  # timed predicts per batch size: at least this long, and at least 3 batches
DRAIN_S = 4.0  # jobs queued per run: about this many seconds of ceiling work, at least 4 batches
MAX_JOBS = 6144  # 1.2 GB in Redis
UNSEEN = (3, 5, 12, 24)  # batch sizes a fresh model has not run, for the first-seen shape cost
PREPROCESS = {"near_free": "caffe", "mobilenet_v2": "tf", "resnet50": "caffe"}


class NoModel:
    """A servable that computes nothing: what the model tier's host side alone can feed."""

    def __init__(self) -> None:
        from serving import wire

        self.info = wire.ModelInfo("no_model", 1, 224, 224, 3, tuple(str(i) for i in range(1000)))
        # Distinct probabilities, as a real model's: rows of 1000 equal ones are all ties, which the
        # answers' top-k (serving.batch.top_classes) costs differently from a real model's rows.
        self.rows = np.random.default_rng(0).dirichlet(np.ones(1000), 8).astype(np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.resize(self.rows, (len(batch), 1000))


def servable_of(name: str):
    from serving import zoo

    if name == "no_model":
        return NoModel()
    servable = zoo.load(model_file(name), preprocess=PREPROCESS[name], name=name)
    if os.environ.get("BENCH_XLA"):  # set for the tensorflow-xla worker; the inner model for preprocess_ms
        servable.served.jit_compile = servable.model.jit_compile = True
    return servable


def model_file(name: str) -> str:
    """The near-free model (pooling and one dense layer on 224x224x3) or a random-weights application."""
    path = WORK / f"{name}_random.keras"
    if not path.exists():
        import keras

        WORK.mkdir(parents=True, exist_ok=True)
        keras.utils.set_random_seed(0)
        if name == "near_free":
            inputs = keras.Input((224, 224, 3))
            pooled = keras.layers.GlobalAveragePooling2D()(inputs)
            keras.Model(inputs, keras.layers.Dense(1000, activation="softmax")(pooled)).save(path)
        else:
            from serving import zoo

            getattr(keras.applications, zoo.APPLICATIONS[name].constructor)(weights=None).save(path)
    return str(path)


def rate(run, batch: np.ndarray) -> float:
    """Images a second of run(batch) repeated, after one untimed call."""
    run(batch)
    done, started = 0, time.perf_counter()
    while done < 3 * len(batch) or time.perf_counter() - started < CEILING_S:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def first_seen_costs(name: str) -> dict[str, dict[int, float]]:
    """ms of the first call at each unseen size on a fresh model, of a warm call, and of the padded call."""
    from serving import speed

    servable = servable_of(name)
    sizes = speed.allowed_sizes(32)
    x = np.zeros((32, 224, 224, 3), np.uint8)
    servable.predict(x[:1])
    costs: dict[str, dict[int, float]] = {"first": {}, "warm": {}, "padded": {}}
    for n in UNSEEN:
        costs["first"][n] = _ms(servable.predict, x[:n])
        costs["warm"][n] = _ms(servable.predict, x[:n])
    for size in sizes:  # what warm-up does, so that a batch of any size runs a compiled shape
        servable.predict(x[:size])
    for n in UNSEEN:
        costs["padded"][n] = _ms(servable.predict, x[: speed.padded(n, sizes)])
    return costs


def _ms(run, batch: np.ndarray) -> float:
    started = time.perf_counter()
    run(batch)
    return round((time.perf_counter() - started) * 1000, 1)


def jobs(count: int, deadline: float, bgr: bool = False) -> list:
    """`count` jobs of 224x224 colour pixels, as the web tier queues them: in the model's channel order."""
    from serving import wire

    images = np.random.default_rng(1).integers(0, 256, (8, 224, 224, 3), np.uint8)
    return [wire.Job(f"job-{i}", "bench", images[i % 8], deadline, 5, bgr) for i in range(count)]


def drain(servable, redis_url: str, redis_pid: int, batch_size: int, count: int) -> dict:
    """A model server draining `count` queued jobs: images a second, its batches' stage split, and
    the cores this process (the server) and Redis used meanwhile."""
    from serving import connections, queue, wire
    from serving.clock import RedisClock
    from serving.modelserver import ModelServer
    from settings import Settings

    r = connections.connect(redis_url, socket_timeout=30)
    r.flushall()
    keys = wire.ModelKeys(servable.info.name, servable.info.version)
    r.set(keys.alive, 1)
    prepared = jobs(count, RedisClock(r).now() + 3600, servable.info.bgr)
    for start in range(0, count, 64):  # as web workers write them: one request's jobs in one call
        queue.submit(r, keys, prepared[start : start + 64], limit=count)
    records = []
    settings = Settings(redis_url=redis_url, batch_size=batch_size, model_name=servable.info.name)
    server = ModelServer(servable, connections.connect(redis_url, socket_timeout=30), settings, on_batch=records.append)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(server.started.is_set, 600, "warm-up")
    server_before, redis_before = time.process_time(), cpu_seconds(redis_pid)
    started = time.perf_counter()
    inbox = keys.inbox("bench")
    # The inbox holds an entry per answered batch, answered in the order on_batch records them.
    wait_until(lambda: sum(len(b.jobs) for b in records[: r.xlen(inbox)]) >= count, 600, "the queue drained")
    seconds = time.perf_counter() - started
    server_cores = (time.process_time() - server_before) / seconds
    redis_cores = (cpu_seconds(redis_pid) - redis_before) / seconds
    server.stop()
    thread.join()
    full = [b for b in records[1:] if len(b.jobs) == batch_size] or records  # steady state: full batches
    stages = {
        stage: statistics.mean(getattr(b, f"{stage}_seconds") for b in full) * 1000
        for stage in ("take", "decode", "model", "answer")
    }
    return {
        "images_per_s": count / seconds,
        "jobs": count,
        "batches": len(records),
        "stage_ms": stages,
        "cores": {"server": round(server_cores, 2), "redis": round(redis_cores, 2)},
    }


def transfer_ms(redis_url: str, batch_size: int) -> float:
    """ms of one MGET of a full batch of job-sized values from Redis, alone: the floor of a take of that batch."""
    from serving import connections

    r = connections.connect(redis_url, socket_timeout=30)
    names = [f"{{transfer}}:{n}" for n in range(batch_size)]
    r.mset(dict.fromkeys(names, jobs(1, 0.0)[0].encode()))
    r.mget(names)
    repeats, started = max(10, 2048 // batch_size), time.perf_counter()
    for _ in range(repeats):
        r.mget(names)
    seconds = (time.perf_counter() - started) / repeats
    r.delete(*names)
    r.close()
    return seconds * 1000


def preprocess_ms(servable, name: str, batch: np.ndarray, ceiling: float) -> float:
    """The in-graph cast and preprocessing's share of one predict: the servable minus the inner model alone."""
    from keras.applications import imagenet_utils

    inner = servable.model
    x = imagenet_utils.preprocess_input(batch.astype(np.float32), data_format="channels_last", mode=PREPROCESS[name])
    return max(0.0, len(batch) / ceiling - len(batch) / rate(inner.predict_on_batch, x)) * 1000


def worker(models: list[str], batches: list[int]) -> dict:
    """Every figure of one backend (this process's KERAS_BACKEND)."""
    port = free_port()
    redis_process = start_redis(port, hz=100)
    redis_url = f"redis://127.0.0.1:{port}/0"
    results: dict = {}
    try:
        for name in models:
            print(f"{name}: first-seen shapes", file=sys.stderr, flush=True)
            entry = {"first_seen_ms": first_seen_costs(name) if name != "no_model" else {}, "batches": {}}
            servable = servable_of(name)
            for b in batches:
                x = np.random.default_rng(2).integers(0, 256, (b, 224, 224, 3), np.uint8)
                ceilings = [rate(servable.predict, x)] if name != "no_model" else []  # no model: no ceiling
                count = min(MAX_JOBS, max(4 * b, round(ceilings[0] * DRAIN_S / b) * b)) if ceilings else MAX_JOBS
                tier = drain(servable, redis_url, redis_process.pid, b, count)
                if ceilings:  # and after: a machine that got busier or quieter meanwhile shows, and averages out
                    ceilings.append(rate(servable.predict, x))
                ceiling = statistics.mean(ceilings) if ceilings else None
                tier["ceiling_images_per_s"] = ceiling
                tier["ceilings_before_after"] = ceilings
                tier["stage_ms"]["transfer_floor"] = transfer_ms(redis_url, b)
                if ceiling:
                    tier["stage_ms"]["preprocess_in_model"] = preprocess_ms(servable, name, x, ceiling)
                entry["batches"][b] = tier
                print(f"{name} batch {b}: {tier['images_per_s']:.0f}/s, ceiling {ceiling}", file=sys.stderr)
            results[name] = entry
    finally:
        stop(redis_process)
    return results


def whole_system(duration: float, concurrency: int) -> dict:
    """stress_test.py against /predict of the whole stack on this machine, and where the CPU went."""
    import resource

    from bench.common import ModelSpec, our_stack, photo, stress, summary

    spec = ModelSpec("near_free", pathlib.Path(model_file("near_free")), "caffe", "", photo())
    stack, url = our_stack(spec, BATCH_SIZE="64")
    try:
        model, web = stack.processes
        parts = {"web tier": web.pid, "model server": model.pid, "redis": stack.redis_process.pid}
        stress(url, spec.image, "--requests", "200", "--concurrency", "16")  # warm connections, not measured
        before = {name: cpu_seconds(pid) for name, pid in parts.items()}
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = stress(url, spec.image, "--duration", str(duration), "--concurrency", str(concurrency))
        client = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in parts.items()}
        cpu["stress_test.py"] = client.ru_utime + client.ru_stime - client_before.ru_utime - client_before.ru_stime
        sizes = [size for size, _ in stack.batches()]
    finally:
        stack.close()
    seconds = run["duration_s"]
    return {
        **summary(run),
        "concurrency": concurrency,
        "cores_used": {name: round(c / seconds, 2) for name, c in cpu.items()},
        "mean_batch": round(statistics.mean(sizes), 1) if sizes else 0,
    }


def run_backend(backend: str, models: list[str], batches: list[int]) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)  # no model file may have made it yet (--models no_model)
    out = WORK / f"model_tier_{backend}.json"
    command = [sys.executable, "-m", "bench.model_tier", "--worker", "--json", str(out), "--models", *models]
    keras_backend, _, xla = backend.partition("-")
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if xla:
        env["BENCH_XLA"] = "1"
    subprocess.run([*command, "--batches", *map(str, batches)], check=True, cwd=REPO, env=env)
    return json.loads(out.read_text())


def report(results: dict) -> str:
    lines = [
        "One model server draining a full queue of 224x224 colour jobs (real Redis; BGR for caffe models, "
        "as the web tier packs them), against the same "
        "servable's predict on ready uint8 batches (`make bench-model`), measured before and after the drain, "
        "their mean the ceiling. Stage times are per full batch; "
        "the take's floor is one MGET of as many job-sized values from the same Redis, alone; cores are what the "
        "server's process and Redis used while it drained.",
        "",
        "| backend | model | batch | model tier img/s | ceiling img/s (before, after) | tier / ceiling "
        "| take ms (floor) | decode ms | predict ms | (preprocess in it) ms | answer ms | cores: server + Redis |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for backend, models in backends(results):
        for name, entry in models.items():
            for b, t in entry["batches"].items():
                s, ceiling = t["stage_ms"], t["ceiling_images_per_s"]
                share = f"{ceiling:.0f}{_spread(t)} | {t['images_per_s'] / ceiling:.0%}" if ceiling else "- | -"
                lines.append(
                    f"| {backend} | {name} | {b} | {t['images_per_s']:.0f} | {share} "
                    f"| {s['take']:.1f} ({s['transfer_floor']:.1f}) | {s['decode']:.1f} | {s['model']:.1f} "
                    f"| {s.get('preprocess_in_model', 0):.1f} | {s['answer']:.1f} "
                    f"| {t['cores']['server']:.2f} + {t['cores']['redis']:.2f} |"
                )
    if system := results.get("system"):
        cores = ", ".join(f"{name} {n:.2f}" for name, n in system["cores_used"].items())
        lines += [
            "",
            f"Whole system, near_free model, BATCH_SIZE=64, `stress_test.py --concurrency {system['concurrency']}` "
            f"with a 640x480 JPEG: {system['rps']:.0f} req/s, p50 {system['p50_ms']:.0f} ms, "
            f"p99 {system['p99_ms']:.0f} ms, {system['ok']}/{system['requests']} ok, "
            f"mean batch {system['mean_batch']}. Cores used: {cores} (of 2).",
        ]
    lines += [
        "",
        "A batch size not seen before (ms): its first call on a fresh model, a warm call at that size, and the "
        "call the server makes instead (padded to an allowed size compiled at warm-up).",
        "",
        "| backend | model | size | first call | warm call | padded call (after warm-up) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for backend, models in backends(results):
        for name, entry in models.items():
            costs = entry["first_seen_ms"]
            for n in costs.get("first", {}):
                lines.append(
                    f"| {backend} | {name} | {n} | {costs['first'][n]} | {costs['warm'][n]} | {costs['padded'][n]} |"
                )
    return "\n".join(lines) + "\n"


def _spread(run: dict) -> str:
    """The ceiling measured on each side of the drain, as " (before, after)", where both were."""
    ceilings = run.get("ceilings_before_after", [])
    return f" ({ceilings[0]:.0f}, {ceilings[1]:.0f})" if len(ceilings) == 2 else ""


def backends(results: dict) -> list[tuple[str, dict]]:
    return [(backend, models) for backend, models in results.items() if backend != "system"]


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(backend, name) for backend, models in backends(results) for name in models]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (backend, name) in zip(axes[0], panels, strict=True):
        runs = results[backend][name]["batches"]
        sizes = [int(b) for b in runs]
        if all(runs[b]["ceiling_images_per_s"] for b in runs):
            ceilings = [runs[b]["ceiling_images_per_s"] for b in runs]
            ax.plot(sizes, ceilings, "k:", marker=".", label="predict ceiling")
        ax.plot(sizes, [runs[b]["images_per_s"] for b in runs], marker="o", label="model tier")
        ax.set(xscale="log", yscale="log", xlabel="BATCH_SIZE", ylabel="images/s", title=f"{name} ({backend})")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    choices = ["tensorflow", "tensorflow-xla", "jax", "torch"]
    parser.add_argument("--backends", nargs="+", default=choices[:3], choices=choices)
    parser.add_argument("--system", type=float, default=20.0, help="seconds of the whole-system run (0: none)")
    parser.add_argument("--out", default="model_tier", help="results' name in bench/results/")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        results = worker(args.models, args.batches)
        with open(args.json, "w") as f:
            json.dump(results, f)
        return
    results = {}
    for backend in args.backends:
        if only := ONLY_RUNS.get(backend):
            runs = {m: [b for b in args.batches if b in only[m]] for m in args.models if m in only}
            results[backend] = {}
            for name, batches in runs.items():
                results[backend].update(run_backend(backend, [name], batches) if batches else {})
        else:
            results[backend] = run_backend(backend, args.models, args.batches)
    if args.system:
        print("whole system", file=sys.stderr, flush=True)
        results["system"] = whole_system(args.system, concurrency=64)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    (RESULTS / f"{args.out}.md").write_text(report(results))
    plot(results, str(RESULTS / f"{args.out}.png"))
    print(report(results))


if __name__ == "__main__":
    main()
