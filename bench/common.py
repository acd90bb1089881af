"""What the benchmark and the sweep share: the models under test, their inputs, and one load run."""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from scripts.processes import REPO, Stack
from serving import zoo

WORK = REPO / "bench" / "work"  # generated model files and images (git-ignored)
RESULTS = REPO / "bench" / "results"
CORES = len(os.sched_getaffinity(0))  # the CPU cores this process may run on: the machine a result names


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: pathlib.Path
    preprocess: str
    labels: str
    image: pathlib.Path

    @property
    def env(self) -> dict[str, str]:
        return {"MODEL": str(self.path), "PREPROCESS": self.preprocess, "LABELS": self.labels}


def command_line(doc: str, models: list[str], duration_s: float, per_point: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: which models, and how long each point lasts."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=models)
    parser.add_argument("--duration", type=float, default=duration_s, help=f"seconds of {per_point} per point")
    return parser


def model_spec(name: str) -> ModelSpec:
    """digits as shipped; the Keras applications with random weights (no download), built once."""
    WORK.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        return ModelSpec(name, zoo.DIGITS, "none", "", REPO / "samples" / "digit_3.png")
    path = WORK / f"{name}_random.keras"
    if not path.exists():
        import keras

        keras.utils.set_random_seed(0)
        getattr(keras.applications, zoo.APPLICATIONS[name].constructor)(weights=None).save(path)
    return ModelSpec(name, path, zoo.APPLICATIONS[name].preprocess, str(zoo.IMAGENET_CLASSES), photo())


def photo() -> pathlib.Path:
    """A 640x480 JPEG with smooth gradients and edges, sized like a typical upload, not random noise."""
    path = WORK / "photo.jpg"
    if not path.exists():
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x * 255 / 640, y * 255 / 480, 128 + 100 * np.sin(x / 40) * np.cos(y / 30)], axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
    return path


def stress(url: str, image: pathlib.Path, *args: str, path: str = "/predict") -> dict:
    """One stress_test.py run against url + path; its JSON summary."""
    out = WORK / "stress.json"
    command = [sys.executable, str(REPO / "stress_test.py"), "--url", f"{url}{path}", "--image", str(image)]
    subprocess.run([*command, "--json", str(out), *args], check=False, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def load_curve(url: str, image: pathlib.Path, loads: tuple[int, ...], duration: float) -> dict[int, dict]:
    """A warm-up, then a closed-loop run of `duration` seconds at each number of concurrent clients."""
    stress(url, image, "--requests", "20", "--concurrency", "4")  # traces and connections, not measured
    runs = {c: stress(url, image, "--duration", str(duration), "--concurrency", str(c)) for c in loads}
    return {c: summary(run) for c, run in runs.items()}


def our_stack(spec: ModelSpec, model_servers: int = 1, **env: str) -> tuple[Stack, str]:
    """Redis, `model_servers` model servers and the web tier for spec; the web URL."""
    stack = Stack(WORK / "stack", **spec.env, **env)
    try:
        for _ in range(model_servers):
            stack.model_server()
        return stack, stack.web_server()
    except BaseException:
        stack.close()
        raise


def summary(run: dict) -> dict:
    """The figures a table shows from a stress run."""
    return {
        "rps": run["throughput_rps"],
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": run["latency_ms"]["p99"],
        "ok": run["ok"],
        "requests": run["requests"],
    }


def children(pid: int) -> list[int]:
    """The process IDs of a process' children (gunicorn's workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (gunicorn's workers) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for each in (pid, *children(pid)):
        with open(f"/proc/{each}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total
