"""/metrics sums every gunicorn worker and every model server; logs follow a request across tiers."""

from __future__ import annotations

import json
import re

import requests

from scripts.processes import REPO, wait_until

DIGIT = (REPO / "samples" / "digit_3.png").read_bytes()


def metric(text: str, name: str) -> float:
    """The value of one sample line, e.g. 'serving_requests_total{route="/predict",status="200"}'."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_metrics_add_up_across_web_workers_and_model_servers(make_stack):
    stack = make_stack(WEB_WORKERS="2")
    stack.model_server()
    url = stack.web_server()
    responses = [requests.post(f"{url}/predict", files={"image": DIGIT}, timeout=30) for _ in range(40)]
    assert [r.status_code for r in responses] == [200] * 40  # a new connection each: both workers take some
    stack.wait_logged([r.json()["request_id"] for r in responses])  # logged after their figures are added
    requests.get(f"{url}/nowhere", timeout=10)

    text = requests.get(f"{url}/metrics", timeout=10).text

    assert metric(text, 'serving_requests_total{route="/predict",status="200"}') == 40
    assert metric(text, 'serving_requests_total{route="other",status="404"}') == 1
    assert metric(text, 'serving_request_seconds_count{model="digits",route="/predict",status="200",version="1"}') == 40
    assert metric(text, "serving_images_total") == 40
    assert metric(text, "serving_batch_size_count") == len(stack.batches())
    assert metric(text, "serving_batch_size_sum") == 40
    assert metric(text, "serving_model_seconds_count") == len(stack.batches())
    assert metric(text, "serving_model_servers") == 1 and metric(text, "serving_queue_depth") == 0
    web_log = next(stack.workdir.glob("web-*.log")).read_text()
    workers = set(re.findall(r"web\[(\d+)\] request .*path=/predict status=200", web_log))
    assert len(workers) == 2, "both workers must have answered for the sum to mean anything"


def test_json_logs_follow_a_request_across_both_tiers(make_stack):
    stack = make_stack(LOG_FORMAT="json")
    stack.model_server()
    url = stack.web_server()

    response = requests.post(f"{url}/predict", files={"image": DIGIT}, timeout=30)

    request_id = response.json()["request_id"]
    assert response.headers["X-Request-ID"] == request_id
    wait_until(lambda: request_id in stack.model_logs[0].read_text(), 15, "the batch logged")
    # Every line of the web tier is JSON, gunicorn's own included (the model server's C++
    # libraries print a few plain lines at start-up, before Python's logging exists).
    web_lines = [json.loads(line) for line in next(stack.workdir.glob("web-*.log")).read_text().splitlines()]
    assert any(line.get("request_id") == request_id and line["status"] == 200 for line in web_lines)
    model_lines = [json.loads(line) for line in stack.model_logs[0].read_text().splitlines() if line.startswith("{")]
    batch = next(line for line in model_lines if request_id in line.get("request_ids", ""))
    assert batch["message"] == "batch" and batch["size"] == 1 and batch["model_ms"] > 0
