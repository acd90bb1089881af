"""Per-request timeouts (timeout_ms, X-Request-Timeout-Ms) and deadlines that hold when a web host's clock is off.

A job's deadline is on Redis' clock, so it is checked here against Redis' TIME read before and after
the request: the web tier's clock reads Redis' time to within a round trip (TOLERANCE_S).
"""

from __future__ import annotations

import base64
import io
import itertools
import pathlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask.testing import FlaskClient

from scripts.processes import wait_until
from serving import registry, wire
from serving.app import create_app
from serving.clock import RedisClock
from serving.webtier import ARRIVED
from tests.conftest import refusals, upload

DIGIT = (pathlib.Path(__file__).resolve().parent.parent / "samples" / "digit_3.png").read_bytes()
INFO = wire.ModelInfo("digits", 1, 8, 8, 1, tuple("0123456789"))
KEYS = wire.ModelKeys("digits", 1)
TOLERANCE_S = 0.01


def redis_now(r) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def announce(r) -> None:
    """digits looks served (a live heartbeat, no speed) but nothing computes: every accepted request waits."""
    registry.Registration(r, INFO, "idle").beat(redis_now(r), ttl_s=120, grace_s=120)


def queued_deadline(r) -> float:
    (raw,) = r.lrange(KEYS.queue, 0, -1)
    return wire.Job.decode(raw).deadline


def post(client: FlaskClient, headers: dict[str, str] | None = None, **form: str):
    return client.post("/predict", data={"image": (io.BytesIO(DIGIT), "digit.png"), **form}, headers=headers)


def send(client: FlaskClient, where: str, value: object):
    if where == "query":
        return upload(client, DIGIT, query=f"?timeout_ms={value}")
    if where == "form":
        return post(client, timeout_ms=str(value))
    if where == "json":
        return client.post("/predict", json={"image": base64.b64encode(DIGIT).decode(), "timeout_ms": value})
    return post(client, headers={"X-Request-Timeout-Ms": str(value)})


def timed(r, request: Callable[[], object]) -> tuple[object, float, float]:
    """The response, and Redis' time before it was sent and after it came."""
    before = redis_now(r)
    response = request()
    return response, before, redis_now(r)


def watched(r, request: Callable[[], object]) -> tuple[object, float, float]:
    """The response of a request nobody computes, Redis' time before it was sent, and Redis' time once its job
    was seen in the queue: its deadline is at most its timeout after that, whatever the request waited."""
    before = redis_now(r)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request)
        wait_until(lambda: r.llen(KEYS.queue) > 0 or pending.done(), 30, "the job queued")
        queued_at = redis_now(r)
        return pending.result(timeout=60), before, queued_at


@pytest.mark.parametrize("where", ["query", "form", "json", "header"])
def test_timeout_ms_shortens_the_deadline(r, make_app, where):
    announce(r)
    client = make_app().test_client()  # REQUEST_TIMEOUT_S is 30

    response, before, queued_at = watched(r, lambda: send(client, where, 250))

    assert response.status_code == 504, response.json
    assert "no answer within 0.25 s" in response.json["error"]["message"]
    assert before + 0.25 - TOLERANCE_S <= queued_deadline(r) <= queued_at + 0.25 + TOLERANCE_S


def test_the_header_shortens_the_deadline_of_an_open_inference_protocol_request(r, make_app):
    announce(r)
    client = make_app().test_client()
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}

    def infer() -> object:
        headers = {"X-Request-Timeout-Ms": "250"}
        return client.post("/v2/models/digits/infer", json={"inputs": [tensor]}, headers=headers)

    response, before, queued_at = watched(r, infer)

    assert response.status_code == 504 and "within 0.25 s" in response.json["error"], response.json
    assert before + 0.25 - TOLERANCE_S <= queued_deadline(r) <= queued_at + 0.25 + TOLERANCE_S


def test_the_deadline_counts_from_the_requests_arrival_not_from_its_view(r, make_app):
    """Whatever held a request between the app's outermost layer and its view (a hung Redis) counts too."""
    announce(r)
    client = make_app(request_timeout_s=1.0).test_client()
    held_s = 0.5
    arrived = {ARRIVED: time.monotonic() - held_s}

    response, before, queued_at = watched(
        r, lambda: client.post("/predict", data={"image": (io.BytesIO(DIGIT), "d.png")}, environ_overrides=arrived)
    )

    assert response.status_code == 504
    assert before - held_s + 1.0 - TOLERANCE_S <= queued_deadline(r) <= queued_at - held_s + 1.0 + TOLERANCE_S


def test_a_timeout_never_lengthens_request_timeout_s(r, make_app):
    announce(r)
    client = make_app(request_timeout_s=0.3).test_client()

    response, before, queued_at = watched(r, lambda: send(client, "form", 60_000))

    assert response.status_code == 504 and "within 0.3 s" in response.json["error"]["message"]
    assert before + 0.3 - TOLERANCE_S <= queued_deadline(r) <= queued_at + 0.3 + TOLERANCE_S


def test_the_shorter_of_the_header_and_the_option_wins(r, make_app):
    announce(r)
    client = make_app().test_client()

    response, before, queued_at = watched(r, lambda: post(client, {"X-Request-Timeout-Ms": "200"}, timeout_ms="5000"))

    assert response.status_code == 504 and "within 0.2 s" in response.json["error"]["message"]
    assert before + 0.2 - TOLERANCE_S <= queued_deadline(r) <= queued_at + 0.2 + TOLERANCE_S


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("query", "0"),
        ("query", "-5"),
        ("form", "1.5"),
        ("form", "soon"),
        ("form", "1234567890"),
        ("json", True),
        ("json", 1.5),
        ("json", [100]),
        ("json", "٣"),
        ("header", "abc"),
        ("header", "0"),
    ],
)
def test_a_bad_timeout_is_a_400_and_queues_nothing(r, make_app, where, value):
    announce(r)
    client = make_app().test_client()

    response = send(client, where, value)

    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "bad_request"
    assert ("timeout_ms" if where != "header" else "X-Request-Timeout-Ms") in error["message"]
    assert r.llen(KEYS.queue) == 0


def test_a_deadline_spent_before_the_images_are_queued_is_a_504_counted_as_refused(r, settings):
    announce(r)
    ticks = itertools.count(step=1.0)  # a host clock that moves a second each time it is read
    app = create_app(settings, clock=RedisClock(r, local=lambda: next(ticks)))
    before = refusals(app.test_client(), "deadline")

    response = post(app.test_client(), timeout_ms="500")
    app.extensions["serving"].inference.inbox.close()

    assert response.status_code == 504, response.json
    assert "deadline passed before its images could be queued" in response.json["error"]["message"]
    assert refusals(app.test_client(), "deadline") == before + 1
    assert r.llen(KEYS.queue) == 0


# --- a web host whose clock is off by a minute ----------------------------------------------------------


@pytest.fixture
def skewed(r, settings) -> Iterator[Callable[..., FlaskClient]]:
    """skewed(offset_s, **settings) -> a client of a web tier whose host clock is offset_s off true time."""
    apps = []

    def make(offset_s: float, **changes: object) -> FlaskClient:
        clock = RedisClock(r, local=lambda: time.time() + offset_s)
        apps.append(create_app(settings.replace(**changes), clock=clock))
        return apps[-1].test_client()

    yield make
    for app in apps:
        app.extensions["serving"].inference.inbox.close()


@pytest.mark.parametrize("offset_s", [60.0, -60.0])
def test_a_web_host_a_minute_off_still_gets_answers_with_true_deadlines(r, served, skewed, offset_s):
    client = skewed(offset_s)

    response, before, after = timed(r, lambda: post(client, timeout_ms="5000"))

    assert response.status_code == 200, response.json
    (job,) = [job for batch in served.batches for job in batch.jobs if job.request_id == response.json["request_id"]]
    # On the model servers' clock too, the deadline is 5 s after the request came, not a minute off.
    assert before + 5 - TOLERANCE_S <= job.deadline <= after + 5 + TOLERANCE_S


def test_a_short_timeout_from_a_host_a_minute_ahead_expires_on_time_everywhere(r, model_servers, digits, skewed):
    announce(r)
    client = skewed(60.0)

    late, before, queued_at = watched(r, lambda: post(client, timeout_ms="300"))

    assert late.status_code == 504
    assert redis_now(r) - before >= 0.3 - TOLERANCE_S  # it timed out at its deadline, not at once
    assert before + 0.3 - TOLERANCE_S <= queued_deadline(r) <= queued_at + 0.3 + TOLERANCE_S  # nor a minute later
    # A model server that comes now finds the job expired, and does not spend the model on it.
    model_servers.start(digits)
    wait_until(lambda: r.llen(KEYS.queue) == 0, 30, "the queue taken")
    assert post(client).status_code == 200  # taken after the expired job: its batch is done
    assert late.json["error"]["code"] == "timeout"
    assert late.headers["X-Request-ID"] not in model_servers.computed
