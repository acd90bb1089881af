"""Admission by predicted wait: the estimate from published speeds, and refusals through the app on a real Redis.

Most tests publish a speed themselves (as a model server's heartbeat does) and run no model server,
so the queue stays as they filled it and the depth the deadline allows is known: at one image a
second and REQUEST_TIMEOUT_S=10.5, the last of n queued images is answered after n + 1 s, and
HEADROOM (0.8) of 10.5 s is 8.4 s, so the queue may hold 7 images, the new request's included.
"""

from __future__ import annotations

import base64
import io
import pathlib
import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from scripts.processes import wait_until
from serving import admission, queue, registry, shedding, wire
from serving.admission import Estimate, batch_time
from serving.catalog import REFRESH_S
from serving.inference import Refused
from tests.conftest import refusals, upload

DIGIT = (pathlib.Path(__file__).resolve().parent.parent / "samples" / "digit_3.png").read_bytes()
INFO = wire.ModelInfo("digits", 1, 8, 8, 1, tuple("0123456789"))
KEYS = wire.ModelKeys("digits", 1)
ONE_A_SECOND = wire.Speed(batch_size=1, batch_seconds={1: 1.0})
TIMEOUT_S = 10.5
ALLOWED = 7  # images the queue may hold at ONE_A_SECOND within TIMEOUT_S, see above


def announce(r, speed: wire.Speed | None = None, server_id: str = "measured") -> None:
    """A live model server of digits, as its heartbeat shows it, with `speed` published; it computes nothing."""
    seconds, _ = r.time()
    registry.Registration(r, INFO, server_id).beat(float(seconds), ttl_s=120, grace_s=120, speed=speed)


def fill(r, n: int) -> None:
    jobs = [wire.Job(f"queued-{i}", "nobody", np.zeros((8, 8, 1), np.uint8), 1e12, 3) for i in range(n)]
    assert queue.submit(r, KEYS, jobs, limit=10**6)[0] is queue.Submitted.QUEUED


# --- the estimate -----------------------------------------------------------------------------------------

MEASURED = wire.Speed(batch_size=32, batch_seconds={1: 0.01, 8: 0.03, 32: 0.1}, extra_seconds=0.005)


def test_batch_time_interpolates_between_measured_sizes_and_keeps_the_cost_per_image_beyond():
    assert batch_time(MEASURED, 8) == pytest.approx(0.035)
    assert batch_time(MEASURED, 20) == pytest.approx(0.03 + 12 / 24 * 0.07 + 0.005)
    assert batch_time(MEASURED, 64) == pytest.approx(0.2 + 0.005)
    only_full = wire.Speed(batch_size=32, batch_seconds={32: 0.1})
    assert batch_time(only_full, 1) == pytest.approx(0.1)  # no smaller batch measured: no cheaper guess


def test_the_rate_adds_up_every_servers_full_batches():
    slow = wire.Speed(batch_size=8, batch_seconds={8: 0.5})
    estimate = Estimate([MEASURED, slow])
    assert estimate.rate == pytest.approx(32 / 0.105 + 8 / 0.5)
    # The last batch may land on the slower server.
    assert estimate.wait_s(100) == pytest.approx(100 / estimate.rate + 0.5)
    assert estimate.wait_s(1) == pytest.approx(1 / estimate.rate + 0.5)


@pytest.mark.parametrize("budget_s", [0.02, 0.3, 1.0, 7.7, 30.0])
def test_the_allowed_depth_is_the_deepest_queue_answered_within_the_budget(budget_s):
    estimate = Estimate([MEASURED])
    depth = estimate.depth_within(budget_s)
    assert depth == 0 or estimate.wait_s(depth) <= budget_s
    assert estimate.wait_s(depth + 1) > budget_s


def test_noisy_measurements_never_make_a_bigger_batch_cheaper_than_a_smaller_one():
    """Each size's time is its own moving estimate: on a busy machine a small batch can read slower than a big
    one. A request an idle tier can answer in time must still fit the depth admission allows (CI once
    answered 20 images on an empty queue with a 503 "overloaded" so)."""
    noisy = wire.Speed(batch_size=32, batch_seconds={1: 0.001, 2: 0.001, 4: 0.001, 8: 0.001, 16: 0.004, 32: 0.002})
    times = [batch_time(noisy, n) for n in range(1, 65)]
    assert times == sorted(times)
    for remaining_s in np.arange(0.0005, 0.01, 0.00002):
        depth = admission.limit(Estimate([noisy]), remaining_s, queue_limit=10**6).depth
        assert all(count <= depth for count in range(1, 65) if admission.feasible([noisy], count, remaining_s))


def test_without_a_measured_speed_nothing_is_known_and_only_queue_limit_binds():
    just_started = wire.Speed(batch_size=32, batch_seconds={})
    for estimate in (Estimate([]), Estimate([just_started])):
        assert not estimate.known
        assert admission.limit(estimate, remaining_s=0.001, queue_limit=50) == admission.Limit(50, "queue_limit")


# --- through the app --------------------------------------------------------------------------------------


def test_a_request_the_deadline_allows_is_queued_and_answered(r, make_app, model_servers, digits):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED - 1)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, client, DIGIT)
        wait_until(lambda: r.llen(KEYS.queue) == ALLOWED, 30, "the request queued")
        model_servers.start(digits)  # now someone computes the queue
        response = pending.result(timeout=60)

    assert response.status_code == 200, response.json
    assert response.json["request_id"] in model_servers.computed


def test_a_request_the_deadline_does_not_allow_is_refused_at_once_and_nothing_is_queued(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    before = refusals(client, "wait")

    response = upload(client, DIGIT)

    assert response.status_code == 503
    error = response.json["error"]
    assert error["code"] == "overloaded"
    assert "7 images are queued ahead and 0 in the model servers' hands" in error["message"]
    assert response.headers["Retry-After"] == "1"  # one image too many, at one a second
    assert r.llen(KEYS.queue) == ALLOWED
    assert refusals(client, "wait") == before + 1


def test_images_the_servers_hold_already_count_ahead_of_the_queue(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED)
    held = queue.ServerQueue(r, KEYS, "measured").take(slot=0, size=3, wait_s=0, block_s=0.1)  # computing those
    assert len(held) == 3 and r.llen(KEYS.queue) == ALLOWED - 3
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()

    response = upload(client, DIGIT)

    assert response.status_code == 503
    assert "4 images are queued ahead and 3 in the model servers' hands" in response.json["error"]["message"]
    assert r.llen(KEYS.queue) == ALLOWED - 3


def test_once_a_worker_saw_the_queue_full_it_refuses_before_decoding(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    assert upload(client, DIGIT).status_code == 503  # refused by the queue itself: this worker now knows

    # Not an image at all: a decoded one would be a 400, so a 503 shows no decoding was spent on it.
    response = upload(client, b"this is not an image")

    assert response.status_code == 503 and response.json["error"]["code"] == "overloaded"
    assert r.llen(KEYS.queue) == ALLOWED


def test_what_a_worker_saw_of_the_queue_counts_until_the_registry_is_read_again(r, make_app):
    """A worker that refuses on its own view sends nothing to Redis, so that view must not outlive a
    registry read: a queue drained faster than the estimate says is then seen at once."""
    announce(r, wire.Speed(batch_size=1, batch_seconds={1: 2.0}))  # the queue may hold 3; nothing drains in 1.5 s
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    assert client.get("/models").status_code == 200  # the worker reads the registry: an empty queue
    fill(r, 3)
    assert upload(client, DIGIT).status_code == 503  # refused by the queue itself: this worker now knows
    r.delete(KEYS.queue)  # drained by means this worker did not see

    assert upload(client, b"this is not an image").status_code == 503  # its own view, no decoding spent
    time.sleep(1.5 * REFRESH_S)
    assert upload(client, b"this is not an image").status_code == 400  # the registry's empty queue


def test_near_the_limit_a_worker_reads_the_queue_before_decoding(r, make_app):
    """Other workers fill the queue unseen, and it drains a batch at a time: near the limit a worker's view
    is least sure, so it reads the queue's length rather than decode an image the submit would refuse."""
    announce(r, wire.Speed(batch_size=1, batch_seconds={1: 10.0}))  # in 105 s: room for 7; none drains in 9 s
    client = make_app(request_timeout_s=105).test_client()
    fill(r, 6)
    assert client.get("/models").status_code == 200  # the worker reads the registry: 6 queued, room for one
    fill(r, 1)  # another worker's request takes it

    response = upload(client, b"this is not an image")  # decoded, it would be a 400

    assert response.status_code == 503 and response.json["error"]["code"] == "overloaded"
    assert "7 images are queued ahead" in response.json["error"]["message"]
    assert r.llen(KEYS.queue) == 7


def test_retry_after_is_the_time_until_the_queue_has_drained_enough(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED + 9)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()

    response = upload(client, DIGIT)

    assert response.status_code == 503
    # 10 images too many at one a second; as far as this worker knows, one may have drained since its
    # cached read of the queue (up to a second old), so it may say 9.
    assert response.headers["Retry-After"] in ("9", "10")
    assert r.llen(KEYS.queue) == ALLOWED + 9


def test_the_memory_cap_refuses_with_its_own_reason(r, make_app):
    announce(r, wire.Speed(batch_size=32, batch_seconds={32: 0.01}))  # fast: the deadline would allow thousands
    fill(r, 5)
    client = make_app(queue_limit=5).test_client()
    before = refusals(client, "queue_limit")

    response = upload(client, DIGIT)

    assert response.status_code == 503 and response.json["error"]["code"] == "overloaded"
    assert "limit of 5 images (QUEUE_LIMIT)" in response.json["error"]["message"]
    assert r.llen(KEYS.queue) == 5
    assert refusals(client, "queue_limit") == before + 1


def test_without_a_published_speed_only_queue_limit_refuses(r, make_app):
    announce(r, speed=None)  # a server that has not measured a batch yet
    fill(r, 1000)  # at ONE_A_SECOND this would be refused; without a speed it is not
    client = make_app(queue_limit=1001).test_client()

    accepted = upload(client, DIGIT, timeout_ms="100")  # accepted, then nobody computes it in time
    refused = upload(client, DIGIT, timeout_ms="100")

    assert accepted.status_code == 504
    assert refused.status_code == 503 and "QUEUE_LIMIT" in refused.json["error"]["message"]
    assert r.llen(KEYS.queue) == 1001


def test_a_deadline_no_empty_queue_could_meet_is_a_504_at_once_not_a_retry(r, make_app):
    announce(r, ONE_A_SECOND)  # one image takes a second
    client = make_app().test_client()
    before = refusals(client, "deadline")

    response = upload(client, DIGIT, timeout_ms="500")

    assert response.status_code == 504 and response.json["error"]["code"] == "timeout"
    assert "needs about 2000 ms" in response.json["error"]["message"]  # its own batch after one ahead
    assert "Retry-After" not in response.headers
    assert r.llen(KEYS.queue) == 0
    assert refusals(client, "deadline") == before + 1


@pytest.mark.parametrize("path", ["/predict", "/v2/models/digits/infer"])
def test_a_waiting_request_gets_503_once_no_server_of_its_model_is_alive(r, make_app, path):
    seconds, _ = r.time()  # a server that beat once and then died: its model counts as alive for 2 s more
    registry.Registration(r, INFO, "died").beat(float(seconds), ttl_s=0.5, grace_s=2.0)
    client = make_app(request_timeout_s=20).test_client()
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}

    response = upload(client, DIGIT) if path == "/predict" else client.post(path, json={"inputs": [image]})

    assert response.status_code == 503 and response.headers["Retry-After"] == "1", response.text
    message = response.json["error"] if path != "/predict" else response.json["error"]["message"]
    assert "no model server of this version is alive" in message
    if path == "/predict":
        assert response.json["error"]["code"] == "unavailable"
    assert r.llen(KEYS.queue) == 0  # it was queued, and taken back: a server of its version must not compute it
    assert r.exists(KEYS.alive) == 0  # refused only once the model had no server for NO_SERVER_GRACE_S


def test_several_images_of_one_request_are_admitted_whole_or_not_at_all(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED - 2)
    app = make_app(request_timeout_s=TIMEOUT_S)
    tier = app.extensions["serving"]
    model = tier.catalog.resolve("digits", None)
    images = [np.zeros((8, 8, 1), np.uint8)] * 3

    with pytest.raises(Refused) as refused:
        tier.inference.infer("three", model, images, 3, tier.clock.now() + TIMEOUT_S)

    assert refused.value.reason == "overloaded"
    assert r.llen(KEYS.queue) == ALLOWED - 2


def test_json_requests_are_refused_alike(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, ALLOWED)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()

    response = client.post("/predict", json={"image": base64.b64encode(DIGIT).decode()})

    assert response.status_code == 503 and response.headers["Retry-After"] == "1"


def test_metrics_show_the_wait_estimate_of_each_model(r, make_app):
    announce(r, ONE_A_SECOND)
    fill(r, 4)
    client = make_app().test_client()

    text = client.get("/metrics").text

    # A new image behind 4 at one a second: 5 s of queue, then its own batch of a second.
    assert 'serving_wait_estimate_seconds{model="digits",version="1"} 6.0' in text.splitlines()


# --- refused before the body is read (serving.shedding) ---------------------------------------------------


def post_unread(client, path: str, headers: dict[str, str] | None = None, connection: socket.socket | None = None):
    """POST a multipart upload of DIGIT to `path`, over `connection` as gunicorn gives the app the client's
    socket; the response, and how many bytes of the body were read."""
    boundary = "b0undary"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n\r\n'.encode()
    body = io.BytesIO(part + DIGIT + f"\r\n--{boundary}--\r\n".encode())
    response = client.post(
        path,
        input_stream=body,
        content_length=len(body.getvalue()),
        content_type=f"multipart/form-data; boundary={boundary}",
        headers=headers,
        environ_overrides={"gunicorn.socket": connection} if connection else None,
    )
    return response, body.tell()


# Queued beyond what the deadline allows by more than a worker's cached view may have drained since.
OVERFULL = ALLOWED + 5


def overloaded_app(r, make_app, **settings: object):
    announce(r, ONE_A_SECOND)
    fill(r, OVERFULL)
    return make_app(request_timeout_s=TIMEOUT_S, **settings)


def requests_counted(client, route: str, status: int) -> float:
    text = client.get("/metrics").text
    found = re.search(rf'^serving_requests_total{{route="{re.escape(route)}",status="{status}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/predict", "/predict"),
        ("/v2/models/digits/infer", "/v2/models/<name>/infer"),
        ("/v2/models/digits/versions/1/infer", "/v2/models/<name>/versions/<version>/infer"),
    ],
)
def test_an_overloaded_models_request_is_refused_from_its_url_and_headers_alone(r, make_app, path, route):
    client = overloaded_app(r, make_app).test_client()
    before = refusals(client, "wait"), requests_counted(client, route, 503)

    response, reads = post_unread(client, path)

    assert (response.status_code, reads) == (503, 0)
    error = response.json["error"]
    message = error if path.startswith("/v2") else error["message"]  # each protocol's error shape
    assert re.match(r"digits is overloaded: 1[01] images are queued ahead and 0 in the model servers' hands", message)
    if not path.startswith("/v2"):
        assert response.json["success"] is False and error["code"] == "overloaded"
    assert response.headers["Retry-After"] in ("4", "5") and response.mimetype == "application/json"
    assert uuid.UUID(response.headers["X-Request-ID"]).version == 4
    assert (refusals(client, "wait"), requests_counted(client, route, 503)) == (before[0] + 1, before[1] + 1)
    assert r.llen(KEYS.queue) == OVERFULL


def test_a_shorter_deadline_in_the_header_refuses_alike_and_a_bad_one_is_the_apps_400(r, make_app):
    client = overloaded_app(r, make_app).test_client()

    shorter, reads = post_unread(client, "/predict", {"X-Request-Timeout-Ms": "9000"})
    bad, _ = post_unread(client, "/predict", {"X-Request-Timeout-Ms": "soon"})

    assert (shorter.status_code, reads) == (503, 0)
    assert bad.status_code == 400 and "X-Request-Timeout-Ms" in bad.json["error"]["message"]


def test_without_a_valid_api_key_the_refusal_is_the_apps_401(r, make_app):
    client = overloaded_app(r, make_app, api_keys=("k1",)).test_client()

    anonymous, _ = post_unread(client, "/predict")
    keyed, reads = post_unread(client, "/predict", {"Authorization": "Bearer k1"})

    assert anonymous.status_code == 401
    assert (keyed.status_code, reads) == (503, 0)


def test_what_only_the_body_decides_is_left_to_the_app(r, make_app):
    """With two models the body may name the one that has room: its request is read, queued, and (no
    server computing it here) times out by the deadline its body asks for."""
    client = overloaded_app(r, make_app).test_client()
    colours = wire.ModelInfo("colours", 1, 4, 4, 3, ("red", "green"))
    seconds, _ = r.time()
    registry.Registration(r, colours, "colours-server").beat(float(seconds), ttl_s=120, grace_s=120, speed=None)
    time.sleep(1.5 * REFRESH_S)  # the worker's catalog now holds both models

    elsewhere = upload(client, DIGIT, model="colours", timeout_ms="200")
    here = upload(client, DIGIT, model="digits")
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}
    unknown = client.post("/v2/models/nothing/infer", json={"inputs": [image]})

    assert elsewhere.status_code == 504 and elsewhere.json["error"]["code"] == "timeout"
    assert here.status_code == 503 and here.json["error"]["code"] == "overloaded"  # through the app
    assert unknown.status_code == 404 and "no model named 'nothing'" in unknown.json["error"]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("?model=nothing", 404, "unknown_model"),
        ("?version=7", 404, "unknown_model"),
        ("?top_k=many", 400, "bad_request"),
        ("?timeout_ms=soon", 400, "bad_request"),
    ],
)
def test_what_the_query_gets_wrong_is_the_apps_answer_also_under_overload(r, make_app, query, status, code):
    client = overloaded_app(r, make_app).test_client()

    response, _ = post_unread(client, f"/predict{query}")

    assert (response.status_code, response.json["error"]["code"]) == (status, code)


def test_a_query_the_app_would_serve_is_refused_unread_with_its_own_shorter_deadline(r, make_app):
    client = overloaded_app(r, make_app).test_client()

    response, reads = post_unread(client, "/predict?model=digits&version=1&top_k=3&timeout_ms=9000")

    assert (response.status_code, reads) == (503, 0)


def test_a_body_its_headers_show_empty_or_too_large_is_the_apps_400_or_413_also_under_overload(r, make_app):
    client = overloaded_app(r, make_app, max_upload_mb=0.001).test_client()  # 1,048 bytes
    sent = {"content_type": "multipart/form-data; boundary=b0undary"}

    empty = client.post("/predict", input_stream=io.BytesIO(b""), content_length=0, **sent)
    large = client.post("/predict", input_stream=io.BytesIO(b"x" * 2000), content_length=2000, **sent)

    assert (empty.status_code, empty.json["error"]["code"]) == (400, "missing_image")
    assert (large.status_code, large.json["error"]["code"]) == (413, "too_large")


# --- nobody waits any more (serving.webtier.client_gone) ---------------------------------------------------


def post_over(client, connection: socket.socket):
    """POST /predict with DIGIT, the app given `connection` as gunicorn gives it the client's socket."""
    data = {"image": (io.BytesIO(DIGIT), "digit.png")}
    return client.post("/predict", data=data, environ_overrides={"gunicorn.socket": connection})


@pytest.mark.parametrize("closed_end", ["client", "server"])
def test_a_request_whose_connection_is_closed_is_neither_decoded_nor_queued(r, make_app, closed_end):
    """The client left, or the server has closed its socket already."""
    announce(r, ONE_A_SECOND)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    server_end, client_end = socket.socketpair()
    (client_end if closed_end == "client" else server_end).close()
    counted = requests_counted(client, "/predict", 499)  # the process' metrics: earlier tests count too

    response = post_over(client, server_end)
    server_end.close()
    client_end.close()

    assert response.status_code == 499
    assert response.json["error"]["code"] == "client_closed"
    assert r.llen(KEYS.queue) == 0
    assert requests_counted(client, "/predict", 499) == counted + 1


def tcp_connection() -> tuple[socket.socket, socket.socket]:
    """(server end, client end) of a TCP connection on localhost, whose kernel tells when data last came."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_end = socket.create_connection(listener.getsockname())
        return listener.accept()[0], client_end


@pytest.mark.parametrize(
    ("path", "route"), [("/predict", "/predict"), ("/v2/models/digits/infer", "/v2/models/<name>/infer")]
)
def test_a_request_read_late_whose_client_is_gone_is_answered_before_its_body_is_read(
    r, make_app, monkeypatch, path, route
):
    """Under overload a worker reads some requests only after their clients gave up; read through the app,
    each took the cores a refusal there does from the clients still waiting."""
    monkeypatch.setattr(shedding, "READ_LATE_S", 0.2)
    announce(r, ONE_A_SECOND)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    counted = requests_counted(client, route, 499)
    server_end, client_end = tcp_connection()
    with server_end:
        client_end.sendall(b"POST ...")  # what gunicorn reads before the app's turn
        client_end.close()
        server_end.recv(100)
        time.sleep(0.3)

        response, reads = post_unread(client, path, connection=server_end)

    assert (response.status_code, reads) == (499, 0)
    error = response.json["error"]
    assert (error if path.startswith("/v2") else error["message"]).startswith("the connection was closed")
    assert requests_counted(client, route, 499) == counted + 1
    assert r.llen(KEYS.queue) == 0


def test_a_request_read_at_once_whose_client_closed_goes_through_the_app(r, make_app):
    """The client may have closed only its sending side, and read its own answer to a bad body: a 400
    (tests/test_serving.py). This body is good: read, then 499 before it is decoded."""
    announce(r, ONE_A_SECOND)
    client = make_app(request_timeout_s=TIMEOUT_S).test_client()
    server_end, client_end = tcp_connection()
    with server_end:
        client_end.sendall(b"POST ...")
        client_end.shutdown(socket.SHUT_WR)
        server_end.recv(100)

        response, reads = post_unread(client, "/predict", connection=server_end)
        client_end.close()

    assert (response.status_code, response.json["error"]["code"]) == (499, "client_closed")
    assert reads > 0 and r.llen(KEYS.queue) == 0


def test_a_client_that_waits_or_sent_its_next_request_is_served_and_one_that_half_closed_is_told(client, served):
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        assert post_over(client, server_end).status_code == 200  # open, nothing more sent
        client_end.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined behind this one
        assert post_over(client, server_end).status_code == 200
        server_end.recv(1024)  # the next request read, as gunicorn would before its turn
        client_end.shutdown(socket.SHUT_WR)  # still reading, but its end of sending reads as a close
        assert post_over(client, server_end).status_code == 499
