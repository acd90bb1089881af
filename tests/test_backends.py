"""The model server on JAX, end to end: a real model_server.py process with KERAS_BACKEND=jax behind the web tier.

The core serving tests run on TensorFlow; this one shows the Keras 3 code path is the same on
another backend, down to the probabilities.
"""

from __future__ import annotations

import numpy as np
import pytest

from scripts.processes import Stack, start_python, stop, wait_until
from serving import registry
from tests.conftest import DIGITS, png, upload


@pytest.mark.processes
def test_a_jax_model_server_answers_as_tensorflow_does_in_process(r, redis_url, client, digits, holdout, tmp_path):
    env = {"KERAS_BACKEND": "jax", "MODEL": "digits", "REDIS_URL": redis_url, "BATCH_SIZE": "8", "LOG_FORMAT": "json"}
    server = start_python("model_server.py", env, tmp_path / "model.log")
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
        assert any(line.get("backend") == "jax" for line in Stack.log_lines(tmp_path / "model.log"))
    finally:
        assert stop(server) == 0
