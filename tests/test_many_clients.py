"""Thousands of requests waiting on one web worker at once (issue 9): each gets its own answer, and what they
cost Redis does not grow with their number.

In-process, one Inbox against the session's Redis, with a thread per waiting request (gunicorn gives each a
greenlet) and the answers pushed by the model servers' own code (ServerQueue.answer). Then the whole stack
as processes: one gunicorn worker holding thousands of real HTTP connections from a gevent client.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import requests

from scripts.processes import REPO, wait_until
from serving import connections, queue, wire
from serving.results import Inbox
from settings import Settings
from tests.conftest import DIGITS, frozen, held, in_inbox, post_image, probabilities

MODELS = (wire.ModelKeys("digits", 1), wire.ModelKeys("digits", 2))
# The name every connection of the Inbox's client gives itself, so CLIENT LIST tells them from the
# connections earlier tests' clients may still hold on the session's Redis.
READERS = "many-clients-inbox"
GONE = "a-worker-that-died"  # answers a model server pushes for a worker that is no longer there
OTHERS = 100  # requests whose clients gave up, and answers for the worker that died


@pytest.fixture
def inbox(redis_url: str) -> Iterator[Inbox]:
    _, readers = connections.for_web_worker(redis_url)  # the client a web worker gives its Inbox
    readers.connection_pool.connection_kwargs["client_name"] = READERS
    box = Inbox(readers)
    yield box
    box.close()


def reader_connections(r: redis.Redis) -> int:
    return sum(1 for client in r.client_list() if client["name"] == READERS)


def answer_for(n: int, request_id: str) -> wire.Result:
    """An answer no other request gets: its class and probability name the request's number."""
    return wire.Result(request_id, top=((n % 10, (n + 1) / 1e6),))


class Waiting:
    """Requests waiting in one Inbox for their answers, each in a thread of its own."""

    def __init__(self, inbox: Inbox, requests: list[tuple[wire.ModelKeys, str]], timeout_s: float) -> None:
        self.got: dict[str, wire.Result | None] = {}
        self._threads = [
            threading.Thread(target=self._wait, args=(inbox, keys, request_id, timeout_s), daemon=True)
            for keys, request_id in requests
        ]
        for thread in self._threads:
            thread.start()

    def _wait(self, inbox: Inbox, keys: wire.ModelKeys, request_id: str, timeout_s: float) -> None:
        with inbox.expect(keys, [request_id]) as expected:
            self.got[request_id] = expected.wait(timeout_s).get(request_id)

    def join(self) -> dict[str, wire.Result | None]:
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a request is still waiting"
        return self.got


def requests_of(prefix: str, count: int) -> list[tuple[wire.ModelKeys, str]]:
    """`count` request ids, spread over both models (one reader each)."""
    return [(MODELS[n % len(MODELS)], f"{prefix}-{n}") for n in range(count)]


def push_answers(r: redis.Redis, answers: list[tuple[wire.ModelKeys, str, wire.Result]], ttl_s: float) -> None:
    """Answer as model servers do, a batch of 32 at a time per model, each batch through ServerQueue.answer
    from the in-flight list its jobs were taken into (stand-ins here: the answers carry what counts)."""
    servers = {keys: queue.ServerQueue(r, keys, f"server-{keys.version}") for keys in MODELS}
    for start in range(0, len(answers), 32):
        for keys, server in servers.items():
            batch = [(reply_to, result) for k, reply_to, result in answers[start : start + 32] if k == keys]
            if batch:
                r.lpush(keys.inflight(server.server_id, 0), *(["taken"] * len(batch)))
                assert server.answer(0, batch, ttl_s)


@pytest.mark.parametrize("count", [10, 5000])
def test_every_waiting_request_gets_its_own_answer_over_one_connection_per_model(r, inbox, count):
    ttl_s = Settings().result_ttl_s
    for keys in MODELS:  # their models have live servers: nobody is answered "unavailable"
        r.set(keys.alive, 1)
    waits, left, gone = requests_of("waits", count), requests_of("gave-up", OTHERS), requests_of("gone", OTHERS)
    gave_up = Waiting(inbox, left, timeout_s=0).join()  # their clients left before the answers came
    waiting = Waiting(inbox, waits, timeout_s=60)
    wait_until(lambda: inbox.waiting == count, 30, "every request waiting")
    wait_until(lambda: reader_connections(r) == len(MODELS), 10, "a reader per model")  # they connect lazily
    assert inbox.waiting == count and reader_connections(r) == len(MODELS)  # while all of them wait

    own = {request_id: answer_for(n, request_id) for n, (_, request_id) in enumerate(waits)}
    answers = [(keys, inbox.worker_id, own[request_id]) for keys, request_id in waits]
    answers += [(keys, inbox.worker_id, answer_for(n, request_id)) for n, (keys, request_id) in enumerate(left)]
    answers += [(keys, GONE, answer_for(n, request_id)) for n, (keys, request_id) in enumerate(gone)]
    answers.append((MODELS[0], inbox.worker_id, answer_for(0, "never-asked")))
    random.Random(count).shuffle(answers)
    half = len(answers) // 2
    push_answers(r, answers[:half], ttl_s)
    r.xadd(MODELS[0].inbox(inbox.worker_id), wire.inbox_entry(["not json", '{"top": [[3, 1.0]]}']))  # no request id
    push_answers(r, answers[half:], ttl_s)

    assert waiting.join() == own  # every one its own answer, none missing, none another's
    assert set(gave_up.values()) == {None} and inbox.waiting == 0
    # What nobody waited for was read and dropped: no answer for this worker stays in Redis.
    wait_until(lambda: not any(in_inbox(r, keys.inbox(inbox.worker_id)) for keys in MODELS), 10, "every answer read")
    # A dead worker's answers wait for nobody: they are gone RESULT_TTL_S after the last was pushed.
    for keys in MODELS:
        assert len(in_inbox(r, keys.inbox(GONE))) == OTHERS // len(MODELS)
        assert 0 < r.pttl(keys.inbox(GONE)) <= ttl_s * 1000


# ---------------------------------------------------------------- the whole stack, as processes

HELD = 3000  # connections one gunicorn worker holds at once, every one waiting for its answer
FEW = 100


class Clients:
    """A gevent process holding `count` connections at once (tests/many_clients.py)."""

    def __init__(self, url: str, count: int, out: pathlib.Path) -> None:
        self.out = out
        command = [sys.executable, "-m", "tests.many_clients", f"{url}/predict", str(count), str(out)]
        self.process = subprocess.Popen(command, cwd=REPO)

    def answers(self) -> list[dict]:
        assert self.process.wait(timeout=120) == 0
        return json.loads(self.out.read_text())


@pytest.fixture
def clients(tmp_path: pathlib.Path) -> Iterator[Callable[[str, int], Clients]]:
    """clients(url, count) -> Clients; any still running at the end (a failed test) are killed."""
    started: list[Clients] = []

    def start(url: str, count: int) -> Clients:
        started.append(Clients(url, count, tmp_path / f"clients-{len(started)}.json"))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait()


def connected(r: redis.Redis) -> int:
    return r.info("clients")["connected_clients"]


@pytest.mark.processes
def test_one_web_worker_holds_thousands_of_requests_on_a_few_redis_connections(make_stack, clients):
    stack = make_stack(WEB_WORKERS="1", HEARTBEAT_TTL_S="60", NO_SERVER_GRACE_S="60")  # alive while frozen
    model = stack.model_server()
    url = stack.web_server()
    samples = [(REPO / "samples" / f"digit_{digit}.png").read_bytes() for digit in range(10)]
    reference = [probabilities(post_image(url, sample, top_k=10).json()) for sample in samples]
    r = stack.redis()
    idle = connected(r)  # before the load: the model server's, this test's, the web worker's reader and command one

    with frozen(model):  # nothing is answered: every request stays held by the web worker
        few = clients(url, FEW)
        wait_until(lambda: len(held(r, DIGITS)) == FEW, 60, f"{FEW} requests held", few.process)
        with_few = connected(r)
        many = clients(url, HELD - FEW)
        # One gunicorn worker accepts at most worker_connections at once (serving/gunicorn_conf.py).
        wait_until(lambda: len(held(r, DIGITS)) == HELD, 60, f"{HELD} requests held by one web worker", many.process)
        with_all = connected(r)
    got = few.answers() + many.answers()

    print(f"Redis clients: {idle} idle, {with_few} with {FEW} requests held, {with_all} with {HELD}")
    # However many wait, the worker holds one reader per model and at most its pool of command connections.
    assert max(with_few, with_all) <= idle + connections.WEB_COMMAND_CONNECTIONS
    assert [answer.get("status") for answer in got] == [200] * HELD, {a.get("status", a.get("error")) for a in got}
    for answer in got:
        np.testing.assert_allclose(probabilities(answer["body"]), reference[answer["digit"]], atol=1e-5)
    ids = [answer["request_id"] for answer in got]
    assert ids == [answer["body"]["request_id"] for answer in got] and len(set(ids)) == HELD
    stack.wait_logged(ids, timeout_s=60)
    computed = [request_id for _, batch in stack.batches() for request_id in batch]
    assert len(computed) == len(set(computed)) == HELD + len(samples)  # each computed once, for its own request


@pytest.mark.processes
def test_a_request_whose_client_left_while_the_web_worker_was_busy_is_not_computed(make_stack):
    stack = make_stack(WEB_WORKERS="1")
    stack.model_server()
    url = stack.web_server()
    master = stack.processes[-1].pid
    (worker,) = map(int, pathlib.Path(f"/proc/{master}/task/{master}/children").read_text().split())
    digit = (REPO / "samples" / "digit_3.png").read_bytes()
    upload = requests.Request("POST", f"{url}/predict", files={"image": ("digit.png", digit)}).prepare()
    head = "".join(f"{name}: {value}\r\n" for name, value in upload.headers.items())
    address = urllib.parse.urlsplit(url)

    os.kill(worker, signal.SIGSTOP)  # busy: the kernel takes the connection and the request, nobody reads them
    try:
        with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
            connection.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + upload.body)
            # and the client gives up
    finally:
        os.kill(worker, signal.SIGCONT)
    served = post_image(url, digit)

    assert served.status_code == 200
    logged = [line for line in stack.logged(stack.web_logs[0], "request") if line["path"] == "/predict"]
    assert sorted(line["status"] for line in logged) == [200, 499]
    stack.wait_logged([served.json()["request_id"]])
    assert [ids for _, ids in stack.batches()] == [[served.json()["request_id"]]]
