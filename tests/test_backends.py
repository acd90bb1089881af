"""The model server on JAX, end to end: a real model_server.py process with KERAS_BACKEND=jax behind the web tier;
and MODEL_THREADS reaching the backend before it computes.

The core serving tests run on TensorFlow; the first shows the Keras 3 code path is the same on
another backend, down to the probabilities.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from scripts.processes import REPO, Stack, start_python, stop, wait_until
from serving import registry
from tests.conftest import DIGITS, png, upload


@pytest.mark.processes
def test_a_jax_model_server_answers_as_tensorflow_does_in_process(r, redis_url, client, digits, holdout, tmp_path):
    # One thread a predict (MODEL_THREADS): the limit reaches JAX too, through XLA's flags.
    env = {"KERAS_BACKEND": "jax", "MODEL": "digits", "REDIS_URL": redis_url, "BATCH_SIZE": "8", "LOG_FORMAT": "json"}
    env["MODEL_THREADS"] = "1"
    server = start_python("model_server.py", env, tmp_path / "model.log", inherit_settings=False)
    try:
        wait_until(lambda: registry.state(r, DIGITS).ready, 180, "the JAX model server", server)
        images = holdout[0][:12]

        responses = [upload(client, png(image), top_k=10) for image in images]

        assert [response.status_code for response in responses] == [200] * len(images)
        served = np.zeros((len(images), 10))
        for row, response in zip(served, responses, strict=True):
            for prediction in response.json["predictions"]:
                row[int(prediction["label"])] = prediction["probability"]
        np.testing.assert_allclose(served, digits.predict(images), atol=1e-5)
        (loaded,) = [line for line in Stack.log_lines(tmp_path / "model.log") if line["message"] == "loaded"]
        assert loaded["backend"] == "jax" and loaded["threads"] == 1
    finally:
        assert stop(server) == 0


def predict_threads_after(*setup: str) -> str:
    """What model_server.predict_threads() reports in a fresh process after `setup` (TensorFlow)."""
    code = "; ".join(["import model_server", *setup, "print(model_server.predict_threads())"])
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def test_model_threads_reaches_tensorflow_before_it_computes():
    assert predict_threads_after() == "all"  # the backend's own choice: every core
    assert predict_threads_after("model_server.use_threads(1)") == "1"
    # The limit holds for what the model server then loads and computes.
    load = "digits = model_server.load(__import__('settings').Settings(model='digits'))"
    predict = "digits.predict(__import__('numpy').zeros((1, *digits.info.shape), 'uint8'))"
    assert predict_threads_after("model_server.use_threads(1)", load, predict) == "1"
