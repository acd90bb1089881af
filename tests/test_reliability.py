"""Crashes, signals, corrupt messages and outages lose no request.

What only processes show runs with real ones: SIGKILL and SIGTERM of a model server, SIGTERM of
gunicorn, Redis going away and coming back, the last model server gone, overload of the whole
stack. The rest runs in-process: a model server that was alive and stopped leaves its model known
and "alive" for NO_SERVER_GRACE_S, so jobs queue up with nobody taking them until the test starts
the next one.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import redis
import requests
from flask import Flask

import model_server
from scripts.processes import REPO, stop, wait_until
from serving import catalog, connections, queue, wire, zoo
from serving.clock import RedisClock
from serving.results import READ_BLOCK_S, Inbox
from settings import Settings
from tests.conftest import (
    DIGIT,
    DIGITS,
    ModelServers,
    answered_by,
    assert_rejected,
    frozen,
    held,
    in_inbox,
    inflight,
    over_http,
    post_image,
    upload,
)

SLOW = wire.ModelKeys("slow", 1)  # slow_model_file's model: named after the file
DIGIT_PATH = str(REPO / "samples" / "digit_3.png")


def send_many(app: Flask, count: int, concurrency: int) -> list[Future]:
    """Fire `count` requests through the app from `concurrency` clients in the background."""
    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(lambda: upload(app.test_client(), DIGIT)) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


def send_many_over_http(url: str, count: int, concurrency: int) -> list[Future]:
    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(post_image, url, DIGIT) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


def server_id(stack, server: int) -> str:
    (serving,) = stack.logged(stack.model_logs[server], "serving")
    return serving["server_id"]


def paused(model_servers: ModelServers, digits: zoo.KerasServable) -> None:
    """A digits server that announced the model and stopped: requests queue until another one starts."""
    model_servers.stop(model_servers.start(digits))


# ---------------------------------------------------------------- model server processes


@pytest.mark.processes
def test_sigkill_mid_batch_loses_no_request(make_stack, make_app, settings, slow_model_file):
    stack = make_stack(MODEL=str(slow_model_file), BATCH_SIZE="8")
    victim = stack.model_server()
    r = stack.redis()
    futures = send_many(make_app(redis_url=stack.redis_url), 48, concurrency=16)
    wait_until(lambda: inflight(r, SLOW) != [], 30, "a batch in flight")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    held = inflight(r, SLOW)  # what it had taken and not answered: left behind in its in-flight lists

    with ModelServers(stack.redis_url, settings) as replacement:  # it requeues what the dead one held
        replacement.start(model_server.load(Settings(model=str(slow_model_file))), batch_size=8)
        responses = [f.result(timeout=60) for f in futures]

    assert held and [r.status_code for r in responses] == [200] * 48
    ids = [r.json["request_id"] for r in responses]
    answered = [i for _, ids in stack.batches() for i in ids] + replacement.computed
    assert len(answered) == len(set(answered))  # each computed once
    # The victim logs a batch after answering it: killed in between, its last answered batch has no log line.
    assert len(set(ids) - set(answered)) <= 8
    assert set(held) <= set(replacement.computed)  # requeued by the replacement, and answered there
    assert inflight(r, SLOW) == [] and r.llen(SLOW.queue) == 0


@pytest.mark.processes
def test_sigterm_finishes_the_batch_in_hand_and_exits_0(make_stack, make_app, settings, slow_model_file):
    stack = make_stack(MODEL=str(slow_model_file), BATCH_SIZE="8")
    first = stack.model_server()
    r = stack.redis()
    futures = send_many(make_app(redis_url=stack.redis_url), 24, concurrency=24)
    wait_until(lambda: inflight(r, SLOW) != [], 30, "a batch in flight")
    held = set(inflight(r, SLOW))

    assert stop(first) == 0
    first_batches = {i for _, ids in stack.batches(0) for i in ids}
    assert held <= first_batches  # the batch in hand was answered before exiting
    assert r.scard(SLOW.servers) == 0 and inflight(r, SLOW) == []  # it left cleanly, holding nothing
    with ModelServers(stack.redis_url, settings) as second:  # the rest are still queued, for the next server
        second.start(model_server.load(Settings(model=str(slow_model_file))), batch_size=8)
        assert [f.result(timeout=60).status_code for f in futures] == [200] * 24
    assert not first_batches & set(second.computed)


@pytest.mark.processes
def test_without_model_servers_requests_time_out_then_are_refused(make_stack, make_app):
    stack = make_stack(NO_SERVER_GRACE_S="10")  # long enough for the 504 below on a busy machine
    model = stack.model_server()
    client = make_app(redis_url=stack.redis_url, request_timeout_s=2).test_client()
    stop(model)

    ready = client.get("/ready")
    assert ready.status_code == 503 and "model server" in ready.json["reason"]
    timed_out = upload(client, DIGIT)  # queued: one may come back any moment
    assert timed_out.status_code == 504, timed_out.json
    assert "no model server of digits version 1 is serving now" in timed_out.json["error"]["message"]
    wait_until(lambda: not stack.redis().exists(DIGITS.alive), 20, "the grace period over")
    refused = upload(client, DIGIT)
    assert refused.status_code == 503 and refused.json["error"]["code"] == "unavailable"
    assert "no model server of digits version 1 has announced itself" in refused.json["error"]["message"]


@pytest.mark.processes
def test_a_restart_slower_than_the_grace_keeps_the_requests_for_the_replacement(make_stack, make_app):
    # A model server takes longer than the grace to load and warm up; a version counts as alive at least as
    # long as its server counts as live (HEARTBEAT_TTL_S), so that is short too.
    stack = make_stack(NO_SERVER_GRACE_S="1", HEARTBEAT_S="0.2", HEARTBEAT_TTL_S="0.5")
    stop(stack.model_server())  # the only server of digits leaves...
    client = make_app(redis_url=stack.redis_url, request_timeout_s=120).test_client()
    with ThreadPoolExecutor(2) as pool:
        replacement = pool.submit(stack.model_server)  # ...and its replacement starts
        time.sleep(2)  # past the grace of the server that left
        # Importing TensorFlow comes first, and takes longer than that on a busy machine.
        wait_until(lambda: stack.redis().exists(DIGITS.alive), 60, "the replacement holding its version alive")
        assert not replacement.done(), "the replacement started before the grace was over: nothing tested"
        response = pool.submit(upload, client, DIGIT)
        assert response.result(timeout=180).status_code == 200  # queued, and answered once it serves
        replacement.result()


# ---------------------------------------------------------------- gunicorn and the whole stack


@pytest.mark.processes
def test_web_tier_drains_requests_in_flight_on_sigterm(make_stack, settings, digits):
    stack = make_stack()
    with ModelServers(stack.redis_url, settings) as servers:
        paused(servers, digits)
        url = stack.web_server()
        web = stack.processes[-1]
        futures = send_many_over_http(url, 16, concurrency=16)
        wait_until(lambda: stack.redis().llen(DIGITS.queue) == 16, 30, "every request waiting for its answer")

        web.send_signal(signal.SIGTERM)
        servers.start(digits)

        assert [f.result(timeout=60).status_code for f in futures] == [200] * 16
        assert web.wait(timeout=60) == 0
        assert len(servers.computed) == 16


@pytest.mark.processes
def test_redis_outage_answers_503_and_both_tiers_recover(make_stack):
    stack = make_stack()
    stack.model_server()
    url = stack.web_server()
    assert post_image(url, DIGIT).status_code == 200

    stop(stack.redis_process, timeout_s=10)
    # Within 20 s, less than REQUEST_TIMEOUT_S (30): a request that hung until its timeout fails here.
    response = post_image(url, DIGIT, timeout=20)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
    ready = over_http("GET", f"{url}/ready", timeout=10)
    assert ready.status_code == 503 and "redis" in ready.json()["reason"]

    stack.restart_redis()
    wait_until(lambda: over_http("GET", f"{url}/ready", timeout=10).status_code == 200, 30, "ready again")
    time.sleep(catalog.REFRESH_S)  # by then no web worker routes by what it read before the model was back
    again = post_image(url, DIGIT)
    assert again.status_code == 200, again.text
    assert all(p.poll() is None for p in stack.processes)  # nothing was restarted


@pytest.mark.processes
def test_requests_waiting_when_redis_restarts_empty_are_queued_again_and_answered(make_stack):
    stack = make_stack(HEARTBEAT_TTL_S="60", NO_SERVER_GRACE_S="60")  # alive while frozen
    model = stack.model_server()
    url = stack.web_server()
    r = stack.redis()
    with frozen(model):
        futures = send_many_over_http(url, 8, concurrency=8)
        wait_until(lambda: len(held(r, DIGITS)) == 8, 30, "every request held")
        stack.restart_redis()  # the jobs are gone; the web workers still hold the images

    assert [f.result(timeout=60).status_code for f in futures] == [200] * 8
    assert all(p.poll() is None for p in stack.processes)


def test_a_hung_redis_is_waited_out_once_by_concurrent_looks_at_the_models_not_once_each(own_redis):
    url, process = own_redis()
    r = redis.Redis.from_url(url, socket_timeout=0.5)
    models = catalog.Catalog(r, RedisClock(r), refresh_s=60)
    models.states()
    reads = []
    read = models.read
    models.read = lambda: reads.append(1) or read()  # counted, and done as ever
    models.forget()

    with frozen(process), ThreadPoolExecutor(4) as pool:
        looks = [pool.submit(models.states) for _ in range(4)]
        failures = [look.exception(timeout=30) for look in looks]

    assert all(isinstance(failure, redis.RedisError) for failure in failures)
    assert len(reads) == 1  # the other three were told at once; each used to wait its own socket timeout


class RepliesLost:
    """A TCP proxy in front of Redis that, while `losing`, drops what Redis sends back: as a reply is lost when
    Redis stalls past a client's socket timeout, then runs the command the client sent meanwhile."""

    def __init__(self, redis_port: int) -> None:
        self.losing = False
        self.lost = 0  # bytes of replies dropped
        self._redis_port = redis_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self._redis_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        with source, sink:
            try:
                while data := source.recv(65536):
                    if replies and self.losing:
                        self.lost += len(data)
                    else:
                        sink.sendall(data)
            except OSError:  # the other direction closed both
                pass

    def close(self) -> None:
        self._listener.close()


def blocked(r: redis.Redis, name: str) -> bool:
    """Whether a connection of that name waits in a blocking command."""
    return any(client["name"] == name and "b" in client["flags"] for client in r.client_list())


def test_answers_whose_read_reply_was_lost_are_read_again(r, redis_url):
    proxy = RepliesLost(urllib.parse.urlparse(redis_url).port)
    inbox = Inbox(connections.connect(proxy.url, socket_timeout=READ_BLOCK_S + 1, name="lossy-reader"))
    r.set(DIGITS.alive, 1)  # a model server lives: nobody is answered "unavailable"
    server = queue.ServerQueue(r, DIGITS, "s1")
    try:
        with inbox.expect(DIGITS, ["a"]) as expected:
            wait_until(lambda: blocked(r, "lossy-reader"), 10, "the reader waiting for answers")
            proxy.losing = True
            r.lpush(DIGITS.inflight("s1", 0), "taken")  # a job the model server took, answered now
            assert server.answer(0, [(inbox.worker_id, wire.Result("a", top=((3, 1.0),)))], ttl_s=30)
            wait_until(lambda: proxy.lost, 10, "the reply that carried the answer lost")
            proxy.losing = False
            got = expected.wait(30)  # the reader's socket times out, and it reads again
    finally:
        inbox.close()
        proxy.close()
    assert got["a"].top == ((3, 1.0),)  # a pop would have taken it from Redis to nobody


def test_ready_says_when_redis_refuses_writes_rather_than_that_no_model_server_lives(own_redis, settings, make_app):
    url, _ = own_redis()
    client = make_app(redis_url=url).test_client()
    assert client.get("/ready").json["reason"] == "no model server is alive"
    redis.Redis.from_url(url).config_set("maxmemory", 1)  # every write is refused, as when Redis is full

    ready = client.get("/ready")

    assert ready.status_code == 503
    assert "redis refuses writes (command not allowed when used memory" in ready.json["reason"]


def children(pid: int) -> list[int]:
    """The process ids of a process' children (gunicorn's workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def inbox_readers(r: redis.Redis) -> int:
    """Connections whose last command was a web worker's blocking read of its inbox."""
    return sum(1 for client in r.client_list() if client["cmd"] == "xread")


@pytest.mark.processes
def test_a_web_worker_killed_holding_requests_loses_none_of_the_other_workers_answers(make_stack):
    stack = make_stack(WEB_WORKERS="2", HEARTBEAT_TTL_S="60", NO_SERVER_GRACE_S="60")  # alive while frozen
    model = stack.model_server()
    url = stack.web_server()
    r = stack.redis()
    with frozen(model):  # every request stays held by the worker that accepted it
        futures: list[Future] = []
        # The kernel hands each connection to whichever worker accepts first: send until both hold some.
        while len({job.reply_to for job in held(r, DIGITS)}) < 2:
            assert len(futures) < 256, "one worker took every connection"
            futures.extend(send_many_over_http(url, 16, concurrency=16))
            wait_until(lambda: len(held(r, DIGITS)) == len(futures), 30, "every request held")
        jobs: dict[str, set[str]] = {}  # by the worker waiting for them
        for job in held(r, DIGITS):
            jobs.setdefault(job.reply_to, set()).add(job.request_id)
        os.kill(children(stack.processes[-1].pid)[0], signal.SIGKILL)  # one of the two, whichever
        # Until Redis has dropped the dead worker's blocked reader, it may still read answers onto its closed socket.
        wait_until(lambda: inbox_readers(r) == 1, 10, "the dead worker's reader gone")
    outcomes = [f.exception(timeout=60) or f.result() for f in futures]
    answered = [each for each in outcomes if isinstance(each, requests.Response)]
    failed = [each for each in outcomes if not isinstance(each, requests.Response)]
    wait_until(lambda: held(r, DIGITS) == [], 30, "every job answered")

    def with_answers() -> list[str]:  # the live worker deletes what it read with its next read, soon after
        return [worker for worker in jobs if in_inbox(r, DIGITS.inbox(worker))]

    wait_until(lambda: len(with_answers()) == 1, 10, "the live worker's inbox read")
    (dead,) = with_answers()  # its answers wait for nobody
    (alive,) = set(jobs) - {dead}
    assert [response.status_code for response in answered] == [200] * len(answered)
    assert {response.headers["X-Request-ID"] for response in answered} == jobs[alive]  # every one, each its own
    assert all(response.json()["predictions"][0]["label"] == "3" for response in answered)
    assert len(failed) == len(jobs[dead]) and all(isinstance(e, requests.ConnectionError) for e in failed)
    left = [result.request_id for result in in_inbox(r, DIGITS.inbox(dead))]
    assert sorted(left) == sorted(jobs[dead]) and 0 < r.pttl(DIGITS.inbox(dead)) <= Settings().result_ttl_s * 1000
    # gunicorn replaces the dead worker, and the replacement serves (once it has, a SIGTERM finds no worker
    # still booting: one would hold gunicorn's exit until it is killed).
    while len(answered_by(stack)) < 2:  # the survivor, and the replacement (the dead one answered nothing)
        assert len(answered) < 400, "the replacement worker never answered"
        answered.append(post_image(url, DIGIT))
        assert answered[-1].status_code == 200


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (gunicorn's workers), in MB."""
    total = 0.0
    for each in (pid, *children(pid)):
        with open(f"/proc/{each}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return total


def stress(url: str, tmp_path, *args: str) -> dict:
    out = tmp_path / f"stress-{time.monotonic_ns()}.json"
    command = [sys.executable, "stress_test.py", "--url", f"{url}/predict", "--image", DIGIT_PATH, "--json", str(out)]
    subprocess.run([*command, *args], cwd=REPO, check=False, timeout=300, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.processes
def test_three_times_capacity_is_refused_early_not_queued_forever(make_stack, slow_model_file, tmp_path):
    stack = make_stack(MODEL=str(slow_model_file), BATCH_SIZE="8", QUEUE_LIMIT="16", REQUEST_TIMEOUT_S="5")
    model = stack.model_server()
    url = stack.web_server()
    capacity = stress(url, tmp_path, "--requests", "48", "--concurrency", "16")["throughput_rps"]
    memory_before = {p.pid: rss_mb(p.pid) for p in (model, stack.processes[-1], stack.redis_process)}

    run = stress(url, tmp_path, "--duration", "15", "--rate", str(round(3 * capacity, 1)), "--timeout", "30")

    print(f"capacity {capacity:.1f}/s; at 3x: {run}")
    assert run["ok"] > 0 and set(run["errors"]) <= {"503", "504"}, run["errors"]  # no 500, no hang, no reset
    assert run["latency_ms"]["max"] <= 5000 + 2000  # every answer within REQUEST_TIMEOUT_S (and a margin)
    growth = {pid: rss_mb(pid) - before for pid, before in memory_before.items()}
    assert all(mb < 200 for mb in growth.values()), growth
    assert post_image(url, DIGIT).status_code == 200  # serving normally right after


# ---------------------------------------------------------------- in-process


def test_malformed_messages_are_dropped_and_their_batch_answered(r, model_servers, make_app, digits):
    paused(model_servers, digits)
    junk = [
        b"not json",
        pickle.dumps({"id": "x"}),
        json.dumps({"id": "a", "shape": [8, 8, 1], "dtype": "float32", "data": "", "deadline": 1e12, "top_k": 1}),
        json.dumps({"id": "b", "shape": [9, 9, 1], "dtype": "uint8", "data": "AAAA", "deadline": 1e12, "top_k": 1}),
        json.dumps({"id": "c", "shape": [8, 8, 1], "dtype": "uint8", "data": "@@", "deadline": 1e12, "top_k": 1}),
        json.dumps([1, 2, 3]),
    ]
    r.lpush(DIGITS.queue, *junk)
    futures = send_many(make_app(), 4, concurrency=4)
    wait_until(lambda: r.llen(DIGITS.queue) == len(junk) + 4, 10, "all queued")  # so they land in one batch
    server = model_servers.start(digits)

    responses = [f.result(timeout=30) for f in futures]

    assert [r.status_code for r in responses] == [200] * 4
    assert [len(batch.jobs) for batch in model_servers.batches] == [4]  # one batch: the junk's and the real jobs'
    assert sorted(model_servers.computed) == sorted(r.json["request_id"] for r in responses)
    assert model_servers.counted("malformed") == len(junk)
    assert model_servers.running(server)


def test_jobs_a_server_cannot_compute_are_answered_at_once_with_why(r, model_servers, digits):
    """A malformed job that names its client, and one prepared for another input shape (the model was
    replaced under its name), are answered at once rather than left to time out."""
    paused(model_servers, digits)
    bad_data = {"id": "bad", "reply_to": "w1", "shape": [8, 8, 1], "dtype": "uint8", "data": "@@", "deadline": 1e12}
    r.lpush(DIGITS.queue, json.dumps({**bad_data, "top_k": 1}))
    r.lpush(DIGITS.queue, wire.Job("old", "w1", np.zeros((28, 28, 1), np.uint8), 1e12, 3).encode())
    model_servers.start(digits)

    wait_until(lambda: len(in_inbox(r, DIGITS.inbox("w1"))) == 2, 10, "both answered")

    answers = {a.request_id: a for a in in_inbox(r, DIGITS.inbox("w1"))}
    assert {i: a.error_code for i, a in answers.items()} == {"bad": "malformed", "old": "model_changed"}
    assert "(8, 8, 1)" in answers["old"].error
    assert model_servers.computed == [] and model_servers.counted("model_changed") == 1
    assert model_servers.counted("malformed") == 1


def test_expired_jobs_are_not_computed(r, model_servers, make_app, digits):
    paused(model_servers, digits)
    app = make_app(request_timeout_s=1)

    responses = [f.result(timeout=30) for f in send_many(app, 5, concurrency=5)]

    assert [r.status_code for r in responses] == [504] * 5
    assert {r.json["error"]["code"] for r in responses} == {"timeout"}
    assert r.llen(DIGITS.queue) == 5  # still queued: nobody took them in time
    model_servers.start(digits)
    wait_until(lambda: r.llen(DIGITS.queue) == 0 and model_servers.counted("expired") == 5, 10, "five skipped")
    assert not set(model_servers.computed) & {r.headers["X-Request-ID"] for r in responses}


def test_queue_limit_refuses_at_once_with_retry_after(r, model_servers, make_app, digits):
    paused(model_servers, digits)
    app = make_app(queue_limit=3)
    waiting = send_many(app, 3, concurrency=3)
    wait_until(lambda: r.llen(DIGITS.queue) == 3, 10, "queued")

    refused = upload(app.test_client(), DIGIT)

    model_servers.start(digits)
    assert refused.status_code == 503 and refused.json["error"]["code"] == "overloaded"
    assert refused.headers["Retry-After"].isdigit()
    assert [f.result(timeout=30).status_code for f in waiting] == [200] * 3
    assert refused.headers["X-Request-ID"] not in model_servers.computed and len(model_servers.computed) == 3
    assert r.llen(DIGITS.queue) == 0 and inflight(r, DIGITS) == []


def test_api_keys_and_redis_password(own_redis, settings, make_app, digits):
    url, _ = own_redis(password="s3cret pass")
    keys = Settings.from_env({"API_KEYS": "key-one, key-two"}).api_keys
    with ModelServers(url, settings) as servers:
        servers.start(digits)
        client = make_app(redis_url=url, api_keys=keys).test_client()

        assert_rejected(redis.Redis.from_url(url), servers, upload(client, DIGIT), 401, "unauthorized")
        wrong = upload(client, DIGIT, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json["error"]["code"] == "unauthorized"
        for key in ("key-one", "key-two"):
            ok = upload(client, DIGIT, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
        assert len(servers.computed) == 2
