"""The serving core end to end in-process: the web tier's app, the Redis queue and batching model servers."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
import requests
from PIL import Image
from werkzeug.test import TestResponse

from scripts.processes import REPO, Stack, free_port, http_ok, start_python, stop, wait_until
from serving import gunicorn_worker, wire, zoo
from tests.conftest import assert_rejected, in_parallel, png, probabilities, upload


@pytest.fixture(scope="module")
def reference(digits: zoo.KerasServable, holdout: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What the digits model says in-process about each held-out image."""
    return digits.predict(holdout[0])


def distribution(response: TestResponse) -> np.ndarray:
    """The ten probabilities of a top_k=10 answer, in class order."""
    assert response.status_code == 200, response.text
    body = response.json
    assert body["success"] is True and body["model"] == "digits"
    return probabilities(body)


def test_held_out_digits_get_the_in_process_answer(served, make_app, holdout, reference):
    images, labels = holdout
    calls = [lambda c, image=image: upload(c, png(image), top_k=10) for image in images]

    responses = in_parallel(make_app(), calls, workers=8)

    answers = np.stack([distribution(r) for r in responses])
    np.testing.assert_allclose(answers, reference, atol=1e-5)
    assert (answers.argmax(axis=1) == reference.argmax(axis=1)).all()
    accuracy = (answers.argmax(axis=1) == labels).mean()
    assert accuracy >= 0.95, accuracy


def test_answers_are_sorted_top_k_floats(served, client, holdout):
    body = upload(client, png(holdout[0][0]), top_k=3).json
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in probabilities)
    assert len(upload(client, png(holdout[0][0])).json["predictions"]) == 5  # TOP_K


def test_json_base64_upload_and_top_k_in_query(served, client, holdout):
    body = {"image": base64.b64encode(png(holdout[0][1])).decode()}
    response = client.post("/predict?top_k=2", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json["predictions"]) == 2


def test_200_requests_in_flight_each_get_their_own_answer(served, make_app, holdout, reference):
    images = holdout[0]
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    chosen = sorted(first)[:200]  # 200 different images, so a swapped answer would show
    start = threading.Barrier(len(chosen))

    def send(client, i: int) -> TestResponse:
        start.wait()
        return upload(client, png(images[i]), top_k=10)

    responses = in_parallel(make_app(), [lambda c, i=i: send(c, i) for i in chosen], workers=len(chosen))

    answers = np.stack([distribution(r) for r in responses])
    np.testing.assert_allclose(answers, reference[chosen], atol=1e-5)
    ids = [r.json["request_id"] for r in responses]
    assert len(set(ids)) == len(chosen)
    sizes = [len(batch.jobs) for batch in served.batches]  # this test's batches only: its own model server
    print("batch sizes under 200 concurrent requests:", sizes)
    assert max(sizes) > 1 and sum(sizes) == len(chosen) and sorted(served.computed) == sorted(ids)


def test_two_model_servers_answer_every_request_exactly_once(model_servers, make_app, digits, holdout):
    model_servers.start(digits)
    model_servers.start(zoo.load("digits"))  # a model of its own: two servers never share one Keras model
    images = holdout[0][:240]

    responses = in_parallel(make_app(), [lambda c, image=image: upload(c, png(image)) for image in images], 48)

    assert [r.status_code for r in responses] == [200] * len(images)
    assert sorted(model_servers.computed) == sorted(r.json["request_id"] for r in responses)  # each once, none twice
    per_server = [len(batches) for batches in model_servers.batches_of.values()]
    assert len(per_server) == 2 and all(count > 0 for count in per_server), per_server


def test_error_answers_are_contract_json(r, served, client):
    cases = [
        (client.post("/predict"), 400, "missing_image"),
        (upload(client, b"this is not an image"), 400, "invalid_image"),
        (upload(client, b"\0" * (17 * 1024 * 1024)), 413, "too_large"),
        (upload(client, png(np.zeros((8, 8, 1), np.uint8)), top_k=11), 400, "bad_request"),
    ]
    for response, status, code in cases:
        assert_rejected(r, served, response, status, code)


@pytest.mark.processes
def test_a_web_server_stopped_while_its_worker_boots_exits_at_once(redis_url, tmp_path):
    """Not once graceful_timeout has passed (a day here): a booting worker lost the SIGTERM, and the arbiter
    waited for it."""
    log = tmp_path / "web.log"
    env = {"REDIS_URL": redis_url, "PORT": str(free_port()), "WEB_WORKERS": "1", "REQUEST_TIMEOUT_S": "86400"}
    process = start_python("web_server.py", env, log, inherit_settings=False)
    try:
        wait_until(lambda: "Booting worker" in log.read_text(), 60, "a worker booting", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        stop(process, timeout_s=10)


@pytest.mark.processes
def test_a_web_server_stopping_closes_the_connections_kept_alive_between_requests(redis_url, tmp_path):
    """They kept a stopping worker for gunicorn's keepalive (30 s) after their last answer."""
    port = free_port()
    env = {"REDIS_URL": redis_url, "PORT": str(port), "WEB_WORKERS": "1"}
    process = start_python("web_server.py", env, tmp_path / "web.log", inherit_settings=False)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the web server", process)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as kept:  # 20 s: less than keepalive
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: b'"ok"' in kept.recv(4096, socket.MSG_PEEK), 10, "the answer")
            kept.recv(4096)
            process.send_signal(signal.SIGTERM)
            assert kept.recv(4096) == b""  # closed by the server, not left to time out
        assert process.wait(timeout=20) == 0
        assert "Traceback" not in (tmp_path / "web.log").read_text()
    finally:
        stop(process, timeout_s=10)


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
QUIET = gunicorn_worker.QUIET_S + 0.2  # long enough a pause for a stopping worker to close a kept-alive connection


def sent_unread_when_the_stop_comes(kept: socket.socket, worker: int) -> None:
    os.kill(worker, signal.SIGSTOP)  # so that the stop comes before the worker has read the request
    time.sleep(QUIET)
    kept.sendall(HEALTH)
    os.kill(worker, signal.SIGTERM)
    os.kill(worker, signal.SIGCONT)


def sent_just_after_the_stop(kept: socket.socket, worker: int) -> None:
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.1)  # the worker has acted on it
    kept.sendall(HEALTH)


def sent_half_read_when_the_stop_comes(kept: socket.socket, worker: int) -> None:
    time.sleep(QUIET)
    kept.sendall(HEALTH[:22])  # the request line, which gunicorn reads at once: no longer in the kernel's buffer
    time.sleep(0.1)
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.1)
    kept.sendall(HEALTH[22:])


@pytest.mark.processes
@pytest.mark.parametrize(
    "send", [sent_unread_when_the_stop_comes, sent_just_after_the_stop, sent_half_read_when_the_stop_comes]
)
def test_a_request_on_a_kept_alive_connection_as_the_worker_stops_is_answered(redis_url, tmp_path, send):
    """A graceful stop or reload (SIGHUP: gunicorn stops its old workers with SIGTERM) closed such connections
    too: under load a few requests a reload were lost, those already received logged as their clients' 499."""
    port = free_port()
    env = {"REDIS_URL": redis_url, "PORT": str(port), "WEB_WORKERS": "1"}
    process = start_python("web_server.py", env, tmp_path / "web.log", inherit_settings=False)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the web server", process)
        worker = int(pathlib.Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as kept:
            kept.sendall(HEALTH)
            wait_until(lambda: b'"ok"' in kept.recv(4096, socket.MSG_PEEK), 10, "the answer")
            kept.recv(4096)
            send(kept, worker)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200 ")
            assert kept.recv(4096) in (b"", b'{"status":"ok"}\n')  # and then closed
    finally:
        stop(process, timeout_s=10)


@pytest.mark.processes
def test_a_request_whose_body_stalls_has_its_connection_closed_once_past_its_deadline(make_stack):
    """Not held for good: enough such clients took every connection a web worker may hold."""
    url = urlparse(make_stack().web_server(REQUEST_TIMEOUT_S="1"))  # closed STALL_SLACK_S (15 s) after it
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=60) as stalled:
        stalled.sendall(f"{head}Content-Length: 1000\r\n\r\n--b\r\n".encode())  # 996 bytes never come
        assert stalled.recv(1024) == b""
    assert http_ok(f"http://{url.netloc}/health")


@contextlib.contextmanager
def one_worker(redis_url: str, tmp_path: pathlib.Path, **env: str) -> Iterator[int]:
    """The port of a web server of one worker, which gunicorn must not have had to kill by the block's end."""
    port = free_port()
    env = {"REDIS_URL": redis_url, "PORT": str(port), "WEB_WORKERS": "1", **env}
    process = start_python("web_server.py", env, tmp_path / "web.log", inherit_settings=False)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the web server", process)
        yield port
    finally:
        stop(process, timeout_s=10)
    assert "WORKER TIMEOUT" not in (tmp_path / "web.log").read_text()


@contextlib.contextmanager
def flooded(sock: socket.socket, payload: bytes) -> Iterator[None]:
    """`payload` sent on `sock` again and again, as fast as it goes, within the block."""
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        with contextlib.suppress(OSError):  # the server closes it, in the end
            while flooding.is_set():
                sock.sendall(payload)

    threading.Thread(target=flood, daemon=True).start()
    try:
        yield
    finally:
        flooding.clear()


ENDLESS_BODIES = {  # a header announcing it, and what comes of it again and again
    "declared 1 TB": (b"Content-Length: 1099511627776", b"x" * 2**20),
    "chunked": (b"Transfer-Encoding: chunked", b"100000\r\n" + b"x" * 2**20 + b"\r\n"),
}


@pytest.mark.processes
@pytest.mark.parametrize("body", ENDLESS_BODIES.values(), ids=ENDLESS_BODIES.keys())
def test_a_client_sending_a_body_nobody_reads_leaves_the_worker_to_its_other_clients(redis_url, tmp_path, body):
    """After its answer gunicorn read what was left of the body without yielding: a client sending one endless
    body at full speed held every other connection of its worker until gunicorn killed it."""
    announced, again = body
    with one_worker(redis_url, tmp_path) as port, socket.create_connection(("127.0.0.1", port), timeout=20) as endless:
        endless.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + announced + b"\r\n\r\n")
        assert endless.recv(4096).startswith(b"HTTP/1.1 200 ")  # answered without reading the body
        with flooded(endless, again):
            answer = requests.get(f"http://127.0.0.1:{port}/health", timeout=20)  # gunicorn's kill came at 60 s
    assert answer.status_code == 200


# 1-byte chunks, each with the longest extension gunicorn takes: bytes always waiting, little data, much parsing.
TINY_CHUNKS = (b"1;a=" + b"b" * 8180 + b"\r\nx\r\n") * 128


@pytest.mark.processes
def test_a_chunked_body_of_tiny_chunks_leaves_the_worker_to_its_other_clients(redis_url, tmp_path):
    """gunicorn parses chunks in Python without a pause while bytes keep coming: the app's read of such a body
    held every other client of the worker until gunicorn killed it."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with (
        one_worker(redis_url, tmp_path, REQUEST_TIMEOUT_S="5") as port,
        socket.create_connection(("127.0.0.1", port), timeout=20) as endless,
    ):
        endless.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        with flooded(endless, TINY_CHUNKS):
            answers = [requests.get(f"http://127.0.0.1:{port}/health", timeout=20) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200] * 3  # gunicorn's kill came at 35 s


@pytest.mark.processes
def test_a_v2_request_of_many_images_lets_its_worker_answer_others_between_them(make_stack):
    """It held them all until its deadline: up to 1,024 images, each decoded without a pause."""
    stack = make_stack(WEB_WORKERS="1")
    stack.model_server()
    url = stack.web_server()
    picture = io.BytesIO()
    Image.new("1", (2000, 2000)).save(picture, "PNG")  # 566 bytes, 10 ms to decode here
    images = [base64.b64encode(picture.getvalue()).decode()] * 1000
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": images}]}
    with ThreadPoolExecutor(1) as pool:
        many = pool.submit(
            requests.post, f"{url}/v2/models/digits/infer", json=body, headers={"X-Request-Timeout-Ms": "2000"}
        )
        time.sleep(0.5)  # its images are being decoded
        assert requests.get(f"{url}/health", timeout=60).status_code == 200
        answered_first = many.done()
        assert many.result(timeout=60).status_code == 504  # its deadline came while decoding
    assert not answered_first


@pytest.mark.processes
def test_a_body_its_client_cut_short_is_counted_as_499_not_as_a_bad_request(make_stack):
    stack = make_stack()
    stack.model_server()
    url = stack.web_server()
    parts, form = urlparse(url), b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n\x89PNG'
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as cut:
        cut.sendall(f"{head}Content-Length: 5000\r\n\r\n".encode() + form)  # and gone

    with socket.create_connection((parts.hostname, parts.port), timeout=10) as cut:  # chunked, cut in a chunk
        cut.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n1000\r\n".encode() + form)

    def counted() -> str:
        return requests.get(f"{url}/metrics", timeout=10).text

    wait_until(lambda: 'route="/predict",status="499"} 2.0' in counted(), 30, "both counted as 499")
    assert 'route="/predict",status="400"' not in counted()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as whole:  # all sent, then half-closed
        whole.sendall(f"{head}Content-Length: {len(form)}\r\n\r\n".encode() + form)
        whole.shutdown(socket.SHUT_WR)
        assert whole.recv(100).startswith(b"HTTP/1.1 400 ")  # its own answer: the body came whole


@pytest.mark.processes
def test_a_model_server_stopped_while_it_loads_its_model_exits_0(redis_url, r, tmp_path):
    env = {"REDIS_URL": redis_url, "LOG_FORMAT": "json", "MODEL": "digits"}
    process = start_python("model_server.py", env, tmp_path / "model.log", inherit_settings=False)
    # Its version counts as alive from the start of its load (registry.starting), long before it serves.
    wait_until(lambda: r.exists(wire.ModelKeys("digits", 1).alive), 60, "the model server loading", process)

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=60) == 0
    assert "serving" not in [line["message"] for line in Stack.log_lines(tmp_path / "model.log")]  # never served


# Runs model_server.py and, at its first import of Keras, says whether its version is listed as starting.
LISTED_AT_FIRST_IMPORT = """
import os, runpy, sys
import redis

key, member = sys.argv[1:]

class FirstImport:
    def find_spec(self, name, path=None, target=None):
        if name == "keras":
            listed = redis.Redis.from_url(os.environ["REDIS_URL"]).zscore(key, member)
            print("listed" if listed else "not listed", flush=True)
            os._exit(0)

sys.meta_path.insert(0, FirstImport())
sys.argv = ["model_server.py"]
runpy.run_path("model_server.py", run_name="__main__")
"""


@pytest.mark.parametrize("threads", ["0", "1"])
@pytest.mark.processes
def test_a_model_server_lists_its_version_as_starting_before_it_imports_keras(redis_url, r, threads):
    # Importing the backend takes seconds; a version not listed meanwhile was a 404 "has no version" to clients.
    env = {"REDIS_URL": redis_url, "MODEL": "digits", "MODEL_THREADS": threads}
    command = [sys.executable, "-c", LISTED_AT_FIRST_IMPORT, wire.STARTING, wire.ModelKeys("digits", 1).member]
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "listed", done.stdout + done.stderr


@pytest.mark.processes
def test_missing_imagenet_weights_stop_the_model_server_with_directions(redis_url, tmp_path):
    # A dead proxy makes sure no test ever downloads weights, with or without internet.
    env = {"REDIS_URL": redis_url, "LOG_FORMAT": "json", "MODEL": "resnet50", "KERAS_HOME": str(tmp_path)}
    env["https_proxy"] = "http://127.0.0.1:9"

    process = start_python("model_server.py", env, tmp_path / "model.log", inherit_settings=False)

    assert process.wait(timeout=120) == 2
    (error,) = [line for line in Stack.log_lines(tmp_path / "model.log") if line["level"] == "ERROR"]
    message = error["message"]
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in message
    assert str(tmp_path / "models") in message and "MODEL=digits" in message


@pytest.mark.processes
def test_stack_processes_get_only_the_settings_the_test_names(make_stack, monkeypatch):
    monkeypatch.setenv("API_KEYS", "k")  # exported by the user who runs the tests: not the stack's setting
    stack = make_stack()

    assert requests.get(f"{stack.web_server()}/models", timeout=10).status_code == 200
    assert requests.get(f"{stack.web_server(API_KEYS='k')}/models", timeout=10).status_code == 401  # named: kept


# scripts/run.py (make run) as a user starts it. It runs in a session of its own, so that the teardown can
# reach whatever it started (each in a process group of its own), even a Redis it left behind.
class Run(NamedTuple):
    process: subprocess.Popen
    log: pathlib.Path  # its output
    port: int  # its PORT


@pytest.fixture
def make_run(tmp_path: pathlib.Path) -> Iterator[Callable[[str], Run]]:
    """make_run(redis_url, model="digits", port=a free one) -> run.py serving the model on PORT with that
    REDIS_URL."""
    started: list[subprocess.Popen] = []

    def start(redis_url: str, model: str = "digits", port: int = 0) -> Run:
        port, log = port or free_port(), tmp_path / f"run-{len(started)}.log"
        env = {**os.environ, "REDIS_URL": redis_url, "MODEL": model, "PORT": str(port)}
        with log.open("wb") as out:
            command = [sys.executable, str(REPO / "scripts" / "run.py")]
            started.append(subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True))
        return Run(started[-1], log, port)

    yield start
    for process in started:
        for pid in session(process.pid):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGKILL)
        process.wait()


def session(sid: int) -> list[int]:
    """The processes still running in session `sid` (a zombie has ended, killed with a parent that cannot
    reap it: this machine's init may take its time)."""
    members = []
    for entry in pathlib.Path("/proc").iterdir():
        with contextlib.suppress(ValueError, OSError):  # not a process, or one that ended meanwhile
            running = (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
            if os.getsid(int(entry.name)) == sid and running:
                members.append(int(entry.name))
    return members


def listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        return s.connect_ex((host, port)) == 0


def serves_then_stops(run: Run, redis_url: str) -> None:
    """run.py comes up with a Redis that lets a client of redis_url in, says it serves once the model answers,
    and Ctrl-C stops all it started, in order and quietly."""
    wait_until(lambda: "Ctrl-C stops" in run.log.read_text(), 60, "make run", run.process)
    assert redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()  # as the model and web servers do
    image = {"image": (REPO / "samples" / "digit_3.png").read_bytes()}
    answer = requests.post(f"http://127.0.0.1:{run.port}/predict", files=image, timeout=30)
    assert answer.status_code == 200, answer.text
    os.killpg(run.process.pid, signal.SIGINT)  # Ctrl-C: a terminal signals its whole foreground process group
    assert run.process.wait(timeout=90) == 0, run.log.read_text()
    assert session(run.process.pid) == []
    parts = urlparse(redis_url)
    assert not listening(parts.hostname, parts.port)  # its Redis stopped with it
    text = run.log.read_text()
    assert "Traceback" not in text and "could not leave cleanly" not in text, text


@pytest.mark.processes
def test_make_run_starts_redis_with_the_password_its_clients_send(make_run):
    url = f"redis://:p%40ss@127.0.0.1:{free_port()}/0"  # redis-py sends the password p@ss
    serves_then_stops(make_run(url), url)


@pytest.mark.processes
def test_make_run_starts_redis_on_the_ipv6_loopback_it_is_asked_for(make_run):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    url = f"redis://[::1]:{free_port()}/0"
    serves_then_stops(make_run(url), url)


@pytest.mark.processes
def test_make_run_stopped_by_a_second_ctrl_c_leaves_nothing_behind(make_run):
    run = make_run(f"redis://127.0.0.1:{free_port()}/0")
    wait_until(lambda: "Ctrl-C stops" in run.log.read_text(), 60, "make run", run.process)

    os.killpg(run.process.pid, signal.SIGINT)
    time.sleep(0.2)  # it stops the web tier, which takes a moment
    with contextlib.suppress(ProcessLookupError):  # it was done already
        os.killpg(run.process.pid, signal.SIGINT)

    assert run.process.wait(timeout=90) == 0
    assert session(run.process.pid) == [] and "Traceback" not in run.log.read_text()


@pytest.mark.processes
def test_make_run_never_says_serving_when_the_model_server_cannot_start(make_run):
    run = make_run(f"redis://127.0.0.1:{free_port()}/0", model="no-such-model")
    assert run.process.wait(timeout=120) == 1
    text = run.log.read_text()
    assert "starting no-such-model" in text and "Ctrl-C stops" not in text, text
    assert "the model server exited with status 2: stopping the rest" in text, text
    assert session(run.process.pid) == []  # its web tier and Redis stopped with it


def refused(run: Run, setting: str = "REDIS_URL") -> str:
    """What run.py said when it stopped before starting any server: a message naming the setting, not a
    traceback."""
    assert run.process.wait(timeout=30) != 0
    text = run.log.read_text()
    assert setting in text and "Traceback" not in text and "Ctrl-C stops" not in text, text
    return text


@pytest.mark.processes
def test_make_run_on_a_port_another_server_holds_starts_nothing_and_says_so(make_run):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with socket.socket() as other:  # another web server, say, which would answer /ready for this one
        other.bind(("127.0.0.1", 0))
        other.listen()
        run = make_run(url, port=other.getsockname()[1])
        assert f"PORT={run.port} is taken" in refused(run, "PORT")
    assert session(run.process.pid) == [] and not listening("127.0.0.1", urlparse(url).port)  # no Redis started


@pytest.mark.processes
def test_make_run_leaves_a_redis_that_refuses_it_alone(make_run, own_redis):
    protected, process = own_redis(password="secret")
    port = urlparse(protected).port
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:nope123@127.0.0.1:{port}/0"):  # NOAUTH, WRONGPASS
        text = refused(make_run(url))
        assert "password" in text and "starting redis-server" not in text and "nope123" not in text, text
    assert process.poll() is None and redis.Redis.from_url(protected).ping()


@pytest.mark.processes
def test_make_run_stops_the_redis_it_started_when_that_refuses_the_url(make_run):
    port = free_port()
    # The Redis run.py starts has a password for its default user only: no user "someone".
    text = refused(make_run(f"redis://someone:pw@127.0.0.1:{port}/0"))
    assert "starting redis-server" in text and "refuses" in text, text
    assert not listening("127.0.0.1", port)


@pytest.mark.processes
def test_make_run_says_so_when_something_that_is_not_redis_holds_the_port(make_run):
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        text = refused(make_run(f"redis://localhost:{silent.getsockname()[1]}/0"))
    assert "starting redis-server" in text and "failed" in text, text
