"""/metrics sums every gunicorn worker and every model server; JSON logs follow a request across both tiers.

Real processes: gunicorn's workers are what /metrics must add up, and the logs are those of real servers.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from scripts.processes import Stack, wait_until
from tests.conftest import DIGIT, ModelServers, answered_by, over_http, post_image

IMAGES = 'serving_images_total{model="digits",version="1"}'


def metric(text: str, name: str) -> float:
    """The value of one sample line, e.g. 'serving_requests_total{route="/predict",status="200"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def scrape(url: str) -> str:
    return over_http("GET", f"{url}/metrics", timeout=10).text


@pytest.mark.processes
def test_metrics_add_up_across_web_workers_and_model_servers(make_stack, settings, digits):
    stack = make_stack(WEB_WORKERS="2")
    with ModelServers(stack.redis_url, settings) as servers:
        servers.start(digits)
        url = stack.web_server()
        responses: list = []
        # Each on a new connection, eight at a time, until both workers have answered some: the kernel hands
        # a connection to whichever worker accepts first, and 40 in a row have all gone to one.
        while len(responses) < 40 or len(answered_by(stack)) < 2:
            assert len(responses) < 400, "one worker took every connection"
            with ThreadPoolExecutor(8) as pool:
                responses += pool.map(lambda _: post_image(url, DIGIT), range(8))
        n = len(responses)
        assert [r.status_code for r in responses] == [200] * n
        # A batch's figures are added just after its answers go out.
        wait_until(lambda: metric(scrape(url), IMAGES) >= n, 10, "every batch counted")
        over_http("GET", f"{url}/nowhere", timeout=10)

        text = scrape(url)

    batches = [batch for batch in servers.batches if batch.jobs]
    assert metric(text, 'serving_requests_total{route="/predict",status="200"}') == n
    assert metric(text, 'serving_requests_total{route="other",status="404"}') == 1
    assert metric(text, 'serving_request_seconds_count{model="digits",route="/predict",status="200",version="1"}') == n
    assert metric(text, IMAGES) == n
    assert metric(text, 'serving_batch_size_count{model="digits",version="1"}') == len(batches)
    assert metric(text, 'serving_batch_size_sum{model="digits",version="1"}') == n
    assert metric(text, 'serving_model_seconds_count{model="digits",version="1"}') == len(batches)
    assert metric(text, 'serving_model_servers{model="digits",version="1"}') == 1
    assert metric(text, 'serving_queue_depth{model="digits",version="1"}') == 0
    assert len(answered_by(stack)) == 2  # both workers answered: the sums above add up two processes


@pytest.mark.processes
def test_json_logs_follow_a_request_across_both_tiers(make_stack):
    stack = make_stack(LOG_FORMAT="json")
    stack.model_server()
    url = stack.web_server()

    response = post_image(url, DIGIT)

    request_id = response.json()["request_id"]
    assert response.headers["X-Request-ID"] == request_id
    stack.wait_logged([request_id])
    # Every line of the web tier is JSON, gunicorn's own included (the model server's C++
    # libraries print a few plain lines at start-up, before Python's logging exists).
    web_text = stack.web_logs[0].read_text().splitlines()
    web_lines = Stack.log_lines(stack.web_logs[0])
    assert len(web_lines) == len(web_text) > 0
    assert any(line.get("request_id") == request_id and line["status"] == 200 for line in web_lines)
    (batch,) = [line for line in stack.logged(stack.model_logs[0], "batch") if request_id in line["request_ids"]]
    assert batch["size"] == 1 and batch["model_ms"] > 0
    assert batch["request_ids"].split(",") == [request_id]
    # To the millisecond, with the offset: the lines of several hosts are put in order by it.
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
    assert all(stamp.fullmatch(line["time"]) for line in [*web_lines, batch])
