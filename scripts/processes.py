"""Start and stop the processes of a local stack: used by `make run`, the process-level tests and the benchmark.

Not part of the served code (the Docker images do not carry it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import quote

import redis

from settings import Settings

REPO = pathlib.Path(__file__).resolve().parent.parent
# Every variable Settings reads (settings.py: each field's name in capitals).
SETTINGS_VARIABLES = frozenset(f.name.upper() for f in dataclasses.fields(Settings))


class RedisRefused(Exception):
    """A Redis answers at the URL but will not let its client in: a wrong or missing password."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, process: subprocess.Popen | None = None
) -> None:
    """Poll `condition` until true; fail early, with `what`, if `process` dies or time runs out."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > give_up:
            raise TimeoutError(f"{what}: not ready after {timeout_s:g} s")
        time.sleep(0.05)


def redis_answers(url: str) -> bool:
    """True if a Redis at `url` answers and lets us in; False if none answers (refused, timed out).

    Raises RedisRefused if one answers but refuses us: the port is taken, so starting another cannot help.
    """
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.AuthenticationError as exc:  # redis-py's for NOAUTH and WRONGPASS; a ConnectionError, so first
        raise RedisRefused(str(exc)) from exc
    except redis.RedisError:
        return False


def redis_url(port: int, password: str | None = None, host: str = "127.0.0.1") -> str:
    """The URL of a Redis on this machine. The password is quoted because redis-py unquotes the URL's."""
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{f'[{host}]' if ':' in host else host}:{port}/0"


def start_redis(
    port: int,
    password: str | None = None,
    bind: str = "127.0.0.1",
    hz: int = 10,
    url: str | None = None,
    *,
    own_group: bool = False,
    cluster_dir: pathlib.Path | None = None,
) -> subprocess.Popen:
    """A throwaway redis-server that keeps nothing on disk; `hz` is how often it checks blocking timeouts.

    Ready once a client gets in at `url` (by default the address it binds), the URL its clients will use.
    If it does not get ready, it is stopped before the error is raised: a failed start leaves nothing running.
    own_group: in a process group of its own, out of reach of a terminal's Ctrl-C (see start_python).
    cluster_dir: run in cluster mode (its node file there) as the one node, owning every hash slot. It then
    serves as a plain Redis does, except that it refuses a command, MULTI or script whose keys span slots,
    as a Redis Cluster of several nodes would.
    """
    server = shutil.which("redis-server")
    if server is None:
        raise FileNotFoundError(
            "redis-server is not installed. Install it (Debian/Ubuntu: sudo apt-get install redis-server; "
            "macOS: brew install redis), or point REDIS_URL at a running Redis."
        )
    args = [server, "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no", "--hz", str(hz)]
    if password:
        args += ["--requirepass", password]
    if cluster_dir is not None:
        node_file = str(cluster_dir / "nodes.conf")
        args += ["--cluster-enabled", "yes", "--cluster-config-file", node_file, "--cluster-port", str(free_port())]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, process_group=0 if own_group else None)
    ready_url = url or redis_url(port, password, bind)
    try:
        wait_until(lambda: redis_answers(ready_url), 10, "redis-server", process)
        if cluster_dir is not None:
            _own_every_slot(ready_url, process)
    except BaseException:
        stop(process, timeout_s=10)
        raise
    return process


def _own_every_slot(url: str, process: subprocess.Popen) -> None:
    with redis.Redis.from_url(url) as client:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_until(
            lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"),
            10,
            "redis-server owning every cluster slot",
            process,
        )


def environ_without_settings() -> dict[str, str]:
    """This environment less every setting: a test or benchmark stack gets only the settings it names, so
    one the user exported (API_KEYS, TOP_K, ...) cannot change what it checks or measures."""
    return {name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES}


def start_python(
    script: str,
    env: dict[str, str],
    log_path: pathlib.Path | None = None,
    *,
    inherit_settings: bool = True,
    own_group: bool = False,
) -> subprocess.Popen:
    """Run one of the repo's entry points with extra environment, its output to log_path.

    inherit_settings=False leaves out the settings exported here (environ_without_settings); `make run`
    keeps them, since there settings pass through the environment. own_group=True starts it in a process
    group of its own: a terminal's Ctrl-C signals only the foreground group, so the starter alone hears it.
    """
    out = open(log_path, "wb") if log_path else None  # noqa: SIM115 (the child owns it)
    base = os.environ if inherit_settings else environ_without_settings()
    return subprocess.Popen(
        [sys.executable, str(REPO / script)],
        cwd=REPO,
        env={**base, **env},
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        process_group=0 if own_group else None,
    )


def stop(process: subprocess.Popen, timeout_s: float = 40) -> int:
    """SIGTERM, and SIGKILL if it has not exited in time; its exit status."""
    return stop_all([process], timeout_s)[0]


def stop_all(processes: list[subprocess.Popen], timeout_s: float = 40) -> list[int]:
    """SIGTERM to all at once, then SIGKILL to any that has not exited in time; their exit statuses."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    give_up = time.monotonic() + timeout_s
    statuses = []
    for process in processes:
        try:
            statuses.append(process.wait(timeout=max(0.0, give_up - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            statuses.append(process.wait())
    return statuses


class Stack:
    """A throwaway Redis with model and web servers around it, each logging JSON lines to its own file."""

    def __init__(self, workdir: pathlib.Path, redis_password: str | None = None, **env: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis_port = free_port()
        self.redis_password = redis_password
        self.redis_process = start_redis(self.redis_port, redis_password)
        self.redis_url = redis_url(self.redis_port, redis_password)
        # JSON logs: what a server did is read from their fields, never by matching text.
        self.env = {"REDIS_URL": self.redis_url, "MODEL": "digits", "LOG_FORMAT": "json", **env}
        self.processes: list[subprocess.Popen] = []
        self.model_logs: list[pathlib.Path] = []
        self.web_logs: list[pathlib.Path] = []

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def restart_redis(self, down_s: float = 0.0) -> None:
        """Stop Redis (losing what it held, as a crash would), stay down a while, start it again."""
        stop(self.redis_process, timeout_s=10)
        time.sleep(down_s)
        self.redis_process = start_redis(self.redis_port, self.redis_password)

    def model_server(self, **env: str) -> subprocess.Popen:
        """Start one more model server and wait until it takes jobs (it logs "serving" once warmed up)."""
        log_path = self.workdir / f"model-{len(self.model_logs)}.log"
        self.model_logs.append(log_path)
        process = self._start("model_server.py", log_path, env)
        wait_until(lambda: self.logged(log_path, "serving"), 180, f"model server ({log_path})", process)
        return process

    def web_server(self, **env: str) -> str:
        """Start a web server on a free port; its base URL once it answers /health."""
        port = free_port()
        self.web_logs.append(self.workdir / f"web-{port}.log")
        process = self._start("web_server.py", self.web_logs[-1], {"PORT": str(port), **env})
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/health"), 60, f"web server on {port}", process)
        return url

    @staticmethod
    def log_lines(path: pathlib.Path) -> list[dict]:
        """The JSON lines of a log (TensorFlow's C++ start-up lines are not JSON, and are left out)."""
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def logged(self, path: pathlib.Path, message: str) -> list[dict]:
        """Every line of one log whose message is `message`."""
        return [line for line in self.log_lines(path) if line["message"] == message]

    def batches(self, server: int | None = None) -> list[tuple[int, list[str]]]:
        """Every batch the model servers (or the one numbered `server`) logged: (size, request ids)."""
        return [(int(b["size"]), b["request_ids"].split(",")) for b in self._logged_batches(server)]

    def wait_logged(self, request_ids: list[str], timeout_s: float = 15) -> None:
        """Wait until each id shows in a logged batch (a batch is logged just after its answers)."""
        wanted = set(request_ids)
        wait_until(lambda: wanted <= {i for _, ids in self.batches() for i in ids}, timeout_s, "batches logged")

    def model_ms(self, size: int | None = None) -> list[float]:
        """How long each logged predict took (only batches of `size`, if given), in batches() order."""
        return [float(b["model_ms"]) for b in self._logged_batches() if size is None or int(b["size"]) == size]

    def _logged_batches(self, server: int | None = None) -> list[dict]:
        paths = self.model_logs if server is None else [self.model_logs[server]]
        return [batch for path in paths for batch in self.logged(path, "batch")]

    def close(self) -> None:
        stop_all(self.processes, timeout_s=10)
        stop(self.redis_process, timeout_s=10)

    def _start(self, script: str, log_path: pathlib.Path, env: dict[str, str]) -> subprocess.Popen:
        # The user's exported settings are left out: the stack runs with what the test or benchmark names.
        process = start_python(script, {**self.env, **env}, log_path, inherit_settings=False)
        self.processes.append(process)
        return process


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
