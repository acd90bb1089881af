"""Fixtures. Most tests run in-process against one real redis-server started for the session and
flushed before each test: the web tier through Flask's test client (or, where a test needs real
HTTP, a werkzeug server in a thread), model servers as threads recording every batch they ran.
Tests about processes (signals, SIGKILL, outages, gunicorn) start real ones with scripts.processes.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import signal
import subprocess
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.test import TestResponse

from scripts.processes import REPO, Stack, free_port, start_redis, stop
from serving import connections, wire, zoo
from serving.app import create_app
from serving.modelserver import Batch, ModelServer
from settings import Settings
from tests.live_server import serving

# In-process model servers notice a stop this soon (the session's Redis checks timeouts at 100 Hz).
TEST_BLOCK_S = 0.05
DIGITS = wire.ModelKeys("digits", 1)
DIGIT = (REPO / "samples" / "digit_3.png").read_bytes()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (make test), tests that start server processes share one worker: run side by
    side, their TensorFlow start-ups and timed phases would fight over the machine's cores."""
    for item in items:
        if item.get_closest_marker("processes"):
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the session; the `r` fixture flushes it before each test that uses it.

    It runs in cluster mode, one node owning every slot: a Lua script, MULTI or command whose keys are not
    all of one slot fails the test that ran it, so the layout stays one that Redis Cluster can serve.
    """
    port = free_port()
    process = start_redis(port, hz=100, cluster_dir=tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process, timeout_s=10)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = connections.connect(redis_url, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, model="digits")


@pytest.fixture(scope="session")
def digits() -> zoo.KerasServable:
    return zoo.load("digits")


class ModelServers:
    """Model servers running as threads of the test process; every batch they ran is in `batches`."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.redis_url = redis_url
        self.settings = settings.replace(redis_url=redis_url)
        self.batches: list[Batch] = []
        self.batches_of: dict[str, list[Batch]] = {}  # by server id
        self._running: list[tuple[ModelServer, threading.Thread]] = []

    def start(self, servable: zoo.Servable, block_s: float = TEST_BLOCK_S, **changes: object) -> ModelServer:
        """One more server of `servable`, with settings changed as given; back once it takes jobs."""
        r = connections.connect(self.redis_url, socket_timeout=10)
        settings = self.settings.replace(**changes)
        server_id = uuid.uuid4().hex
        own = self.batches_of.setdefault(server_id, [])

        def record(batch: Batch) -> None:
            self.batches.append(batch)
            own.append(batch)

        server = ModelServer(servable, r, settings, server_id, on_batch=record, block_s=block_s)
        thread = threading.Thread(target=server.run, name=f"model server {server_id}", daemon=True)
        thread.start()
        self._running.append((server, thread))  # stopped at the end even if it is slow to start
        # Warming up ResNet50's batch sizes took over 30 s on a loaded machine.
        assert server.started.wait(120), "the model server did not start"
        return server

    @property
    def computed(self) -> list[str]:
        """The request ids of every job computed, in order, once per computation."""
        return [request_id for batch in self.batches for request_id in batch.request_ids]

    def counted(self, name: str) -> int:
        """How many jobs the servers counted as `name` (metrics.COUNTERS: expired, malformed, ...)."""
        return sum(batch.counts[name] for batch in self.batches)

    def running(self, server: ModelServer) -> bool:
        return any(thread.is_alive() for running, thread in self._running if running is server)

    def stop(self, server: ModelServer) -> None:
        for running, thread in self._running:
            if running is server:
                server.stop()
                thread.join(30)
                assert not thread.is_alive(), "the model server did not stop"

    def close(self) -> None:
        for server, _ in self._running:
            self.stop(server)

    def __enter__(self) -> ModelServers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@pytest.fixture
def model_servers(r: redis.Redis, redis_url: str, settings: Settings) -> Iterator[ModelServers]:
    servers = ModelServers(redis_url, settings)
    yield servers
    servers.close()


@pytest.fixture
def served(model_servers: ModelServers, digits: zoo.KerasServable) -> ModelServers:
    """One digits model server running."""
    model_servers.start(digits)
    return model_servers


@pytest.fixture
def make_app(r: redis.Redis, settings: Settings) -> Iterator[Callable[..., Flask]]:
    """Web tiers in-process: make_app(**setting changes) -> a Flask app (on the session's Redis unless
    redis_url is changed)."""
    apps: list[Flask] = []

    def make(**changes: object) -> Flask:
        apps.append(create_app(settings.replace(**changes)))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["serving"].inference.inbox.close()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app().test_client()


def upload(
    client: FlaskClient, data: bytes, query: str = "", headers: dict[str, str] | None = None, **form: object
) -> TestResponse:
    """POST /predict with `data` as the multipart file 'image', like curl -F image=@file."""
    return client.post(f"/predict{query}", data={"image": (io.BytesIO(data), "image.png"), **form}, headers=headers)


def send(client: FlaskClient, method: str = "POST", path: str = "/predict", **kwargs: object) -> TestResponse:
    """The request `requests.request(method, url, **kwargs)` would send (files=, data=, json=, params=,
    headers=), byte for byte, through the test client."""
    prepared = requests.Request(method, f"http://localhost{path}", **kwargs).prepare()
    url = urllib.parse.urlsplit(prepared.url)
    body = prepared.body.encode("iso-8859-1") if isinstance(prepared.body, str) else prepared.body  # as http.client
    headers = list(prepared.headers.items())
    return client.open(url.path, method=method, query_string=url.query, headers=headers, data=body)


def in_parallel(app: Flask, calls: list[Callable[[FlaskClient], TestResponse]], workers: int) -> list[TestResponse]:
    """Run each call with a test client of its own, `workers` at a time; the responses in order."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: call(app.test_client()), calls))


def _inflight_jobs(r: redis.Redis, keys: wire.ModelKeys) -> list[wire.Job]:
    found = []
    every_server = keys.inflight("*", 0).removesuffix(":0")  # a pattern: any server id, any slot
    for key in r.scan_iter(match=every_server):
        found += [wire.Job.decode(raw) for raw in r.lrange(key, 0, -1)]
    return found


def inflight(r: redis.Redis, keys: wire.ModelKeys) -> list[str]:
    """The request ids in every model server's in-flight lists of one model."""
    return [job.request_id for job in _inflight_jobs(r, keys)]


def in_inbox(r: redis.Redis, inbox: str) -> list[wire.Result]:
    """Every answer waiting in one web worker's inbox, oldest first."""
    return [wire.Result.decode(raw) for _, entry in r.xrange(inbox) for raw in entry.values()]


def held(r: redis.Redis, keys: wire.ModelKeys) -> list[wire.Job]:
    """Every job of one model not answered yet: queued, or in a model server's in-flight lists."""
    return [wire.Job.decode(raw) for raw in r.lrange(keys.queue, 0, -1)] + _inflight_jobs(r, keys)


@contextlib.contextmanager
def frozen(process: subprocess.Popen) -> Iterator[None]:
    """A model server process stopped (SIGSTOP) within the block, then running on (SIGCONT): requests queue
    meanwhile. Its heartbeat stops too: give the stack HEARTBEAT_TTL_S and NO_SERVER_GRACE_S longer than the block,
    or it counts as dead."""
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def assert_rejected(
    r: redis.Redis, served: ModelServers, response: TestResponse | requests.Response, status: int, code: str
) -> dict:
    """The contract's JSON error, and proof that the request never reached the model servers: its id is
    in no batch, and nothing of the model is queued or in flight."""
    text = response.text
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json() if isinstance(response, requests.Response) else response.json
    assert body["success"] is False and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers["X-Request-ID"] not in served.computed
    assert r.llen(DIGITS.queue) == 0 and inflight(r, DIGITS) == []
    return body["error"]


@pytest.fixture
def serve_http() -> Iterator[Callable[[Flask], str]]:
    """serve_http(app) -> the base URL of a real HTTP server (werkzeug's, threaded) running the app."""
    with contextlib.ExitStack() as servers:
        yield lambda app: servers.enter_context(serving(app))


@pytest.fixture
def live_url(served: ModelServers, make_app: Callable[..., Flask], serve_http: Callable[[Flask], str]) -> str:
    """The web tier over real HTTP, a digits model server behind it."""
    return serve_http(make_app())


@pytest.fixture
def own_redis() -> Iterator[Callable[..., tuple[str, object]]]:
    """own_redis(password=None) -> (url, process): a redis-server of the test's own, to stop or protect."""
    processes = []

    def start(password: str | None = None) -> tuple[str, object]:
        port = free_port()
        processes.append(start_redis(port, password, hz=100))
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{port}/0", processes[-1]

    yield start
    for process in processes:
        stop(process, timeout_s=10)


@pytest.fixture
def make_stack(tmp_path: pathlib.Path) -> Iterator[Callable[..., Stack]]:
    """A stack of the test's own (Redis, model and web server processes), for tests about processes."""
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stacks.append(Stack(tmp_path / f"stack-{len(stacks)}", **env))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.close()


def answered_by(stack: Stack) -> set[str]:
    """The web worker processes that answered a POST /predict with 200, from the web log's fields."""
    return {
        line["process"]
        for line in Stack.log_lines(stack.web_logs[0])
        if line["message"] == "request" and line["path"] == "/predict" and line["status"] == 200
    }


@pytest.fixture(scope="session")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    """The digits the shipped model never saw in training: (uint8 images N x 8 x 8 x 1, labels)."""
    from sklearn.model_selection import train_test_split

    from scripts.train_digits import SPLIT, digit_images

    x, y = digit_images()
    _, x_test, _, y_test = train_test_split(x, y, stratify=y, **SPLIT)
    return x_test, y_test


def probabilities(body: dict) -> np.ndarray:
    """The ten probabilities of a digits answer asked with top_k=10, in class order."""
    found = np.zeros(10)
    for prediction in body["predictions"]:
        found[int(prediction["label"])] = prediction["probability"]
    return found


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def over_http(method: str, url: str, **kwargs: object) -> requests.Response:
    """One request on a connection of its own, which the server closes once it has answered: requests keeps
    a connection open while its Response lives, and even an idle one holds a SIGTERM'd gunicorn worker for
    up to its keep-alive time."""
    kwargs.setdefault("timeout", 60)
    headers = {"Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, **kwargs)


def post_image(url: str, data: bytes, timeout: float = 60, **form: object) -> requests.Response:
    return over_http("POST", f"{url}/predict", files={"image": ("image.png", data)}, data=form, timeout=timeout)


@pytest.fixture(scope="session")
def slow_model_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A model for digit-sized images that takes long enough per batch to be caught mid-batch."""
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Resizing(192, 192),  # about 0.4 s for a batch of 8 on two cores
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("slow") / "slow.keras"
    model.save(path)
    return path


COLOURS = ("red", "green", "blue")


@pytest.fixture(scope="session")
def colours_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A second model, on another input shape than digits: the dominant colour of a 16x16 RGB image.

    Built, not trained: the mean of each channel, scaled, into a softmax. Returns (model file, labels file).
    """
    import keras

    model = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")]
    )
    model.layers[-1].set_weights([np.eye(3, dtype=np.float32) * 0.05, np.zeros(3, np.float32)])
    folder = tmp_path_factory.mktemp("colours")
    model.save(folder / "colours.keras")
    (folder / "colours.txt").write_text("\n".join(COLOURS) + "\n")
    return folder / "colours.keras", folder / "colours.txt"


@pytest.fixture(scope="session")
def colours(colours_file: tuple[pathlib.Path, pathlib.Path]) -> zoo.KerasServable:
    model, labels = colours_file
    return zoo.load(str(model), labels=str(labels), name="colours")


def solid(colour: tuple[int, int, int], size: int = 16) -> np.ndarray:
    """An image of one colour, size x size RGB."""
    return np.tile(np.array(colour, np.uint8), (size, size, 1))


def refusals(client: FlaskClient, reason: str) -> float:
    """What /metrics counts of digits version 1's requests refused for `reason` (wait, deadline, ...)."""
    text = client.get("/metrics").text
    found = re.search(rf'^serving_refused_total{{model="digits",reason="{reason}",version="1"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0
