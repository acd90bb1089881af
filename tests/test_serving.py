"""The serving core end to end in-process: the web tier's app, the Redis queue and batching model servers."""

from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
from werkzeug.test import TestResponse

from scripts.processes import Stack, start_python
from serving import zoo
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
def test_missing_imagenet_weights_stop_the_model_server_with_directions(redis_url, tmp_path):
    # A dead proxy makes sure no test ever downloads weights, with or without internet.
    env = {"REDIS_URL": redis_url, "LOG_FORMAT": "json", "MODEL": "resnet50", "KERAS_HOME": str(tmp_path)}
    env["https_proxy"] = "http://127.0.0.1:9"

    process = start_python("model_server.py", env, tmp_path / "model.log")

    assert process.wait(timeout=120) == 2
    (error,) = [line for line in Stack.log_lines(tmp_path / "model.log") if line["level"] == "ERROR"]
    message = error["message"]
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in message
    assert str(tmp_path / "models") in message and "MODEL=digits" in message
