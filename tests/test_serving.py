"""The serving core end to end: web tier, Redis queue and batching model servers, over real HTTP."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from serving import zoo
from tests.conftest import png, post_image


@pytest.fixture(scope="module")
def reference(holdout: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What the digits model says in-process about each held-out image."""
    return zoo.load("digits").predict(holdout[0])


def distribution(response: requests.Response) -> np.ndarray:
    """The ten probabilities of a top_k=10 answer, in class order."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["model"] == "digits"
    probabilities = np.zeros(10)
    for prediction in body["predictions"]:
        probabilities[int(prediction["label"])] = prediction["probability"]
    return probabilities


def test_held_out_digits_get_the_in_process_answer(digits_stack, holdout, reference):
    images, labels = holdout
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: post_image(digits_stack.url, png(images[i]), top_k=10), range(len(images))))
    served = np.stack([distribution(r) for r in responses])
    np.testing.assert_allclose(served, reference, atol=1e-5)
    assert (served.argmax(axis=1) == reference.argmax(axis=1)).all()
    accuracy = (served.argmax(axis=1) == labels).mean()
    assert accuracy >= 0.95, accuracy


def test_answers_are_sorted_top_k_floats(digits_stack, holdout):
    body = post_image(digits_stack.url, png(holdout[0][0]), top_k=3).json()
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert all(isinstance(p, float) and 0 <= p <= 1 for p in probabilities)
    assert len(post_image(digits_stack.url, png(holdout[0][0])).json()["predictions"]) == 5  # TOP_K


def test_json_base64_upload_and_top_k_in_query(digits_stack, holdout):
    import base64

    body = {"image": base64.b64encode(png(holdout[0][1])).decode()}
    response = requests.post(f"{digits_stack.url}/predict?top_k=2", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 2


def test_200_requests_in_flight_each_get_their_own_answer(digits_stack, holdout, reference):
    images = holdout[0]
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    chosen = sorted(first)[:200]  # 200 different images, so a swapped answer would show
    batches_before = len(digits_stack.batches())
    start = threading.Barrier(len(chosen))

    def send(i: int) -> requests.Response:
        start.wait()
        return post_image(digits_stack.url, png(images[i]), top_k=10)

    with ThreadPoolExecutor(len(chosen)) as pool:
        responses = list(pool.map(send, chosen))
    served = np.stack([distribution(r) for r in responses])
    np.testing.assert_allclose(served, reference[chosen], atol=1e-5)
    assert len({r.json()["request_id"] for r in responses}) == len(chosen)
    digits_stack.wait_logged([r.json()["request_id"] for r in responses])
    sizes = [size for size, _ in digits_stack.batches()[batches_before:]]
    print("batch sizes under 200 concurrent requests:", sizes)
    assert max(sizes) > 1 and sum(sizes) == len(chosen)


def test_two_model_servers_answer_every_request_exactly_once(make_stack, holdout):
    stack = make_stack()
    stack.model_server()
    stack.model_server()
    url = stack.web_server()
    images = holdout[0][:240]
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda image: post_image(url, png(image)), images))
    assert [r.status_code for r in responses] == [200] * len(images)
    stack.wait_logged([r.json()["request_id"] for r in responses])
    answered = [request_id for _, ids in stack.batches() for request_id in ids]
    assert sorted(answered) == sorted(r.json()["request_id"] for r in responses)  # each once, none twice
    per_server = [sum(1 for line in log.read_text().splitlines() if " batch size=" in line) for log in stack.model_logs]
    assert all(count > 0 for count in per_server), per_server


def test_error_answers_are_contract_json(digits_stack):
    url = digits_stack.url
    cases = [
        (requests.post(f"{url}/predict", timeout=30), 400, "missing_image"),
        (post_image(url, b"this is not an image"), 400, "invalid_image"),
        (post_image(url, b"\0" * (17 * 1024 * 1024)), 413, "too_large"),
        (post_image(url, png(np.zeros((8, 8, 1), np.uint8)), top_k=11), 400, "bad_request"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert body["success"] is False and body["error"]["code"] == code and body["error"]["message"]


def test_missing_imagenet_weights_stop_the_model_server_with_directions(make_stack, tmp_path):
    stack = make_stack()
    # A dead proxy makes sure no test ever downloads weights, with or without internet.
    env = {"MODEL": "resnet50", "KERAS_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9"}
    from scripts.processes import start_python

    process = start_python("model_server.py", {**stack.env, **env}, tmp_path / "model.log")
    assert process.wait(timeout=120) == 2
    message = (tmp_path / "model.log").read_text()
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in message
    assert str(tmp_path / "models") in message and "MODEL=digits" in message
