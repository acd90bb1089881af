"""Several models with real processes: model_server.py for each model, the web tier as gunicorn, real HTTP.

And the one-model deployment a client of the first version knew: `curl -F image=@x /predict` answers as before
(over real HTTP, the web tier in-process).
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from scripts.processes import REPO
from tests.conftest import COLOURS, png, post_image, solid

CLIENTS = 50


def colour_images(count: int, seed: int = 12) -> list[tuple[bytes, str]]:
    """Images whose dominant colour is plain: (PNG, the colour's name)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        dominant = rng.randrange(3)
        rgb = [rng.randrange(0, 90) for _ in range(3)]
        rgb[dominant] = rng.randrange(170, 256)
        cases.append((png(solid(tuple(rgb))), COLOURS[dominant]))
    return cases


@pytest.mark.processes
def test_two_models_behind_one_web_tier_each_answer_from_the_model_asked(make_stack, colours_file, holdout):
    model, labels = colours_file
    stack = make_stack()
    stack.model_server()  # digits
    stack.model_server(MODEL=str(model), LABELS=str(labels))  # colours, named after its file
    url = stack.web_server()
    digits, truth = holdout
    jobs = [("digits", png(image), str(label)) for image, label in zip(digits, truth, strict=True)]
    jobs += [("colours", image, colour) for image, colour in colour_images(len(digits))]
    random.Random(3).shuffle(jobs)  # both models' requests interleaved, from every client

    with ThreadPoolExecutor(CLIENTS) as pool:
        responses = list(pool.map(lambda job: post_image(url, job[1], model=job[0]), jobs))

    assert [r.status_code for r in responses] == [200] * len(jobs), {r.status_code for r in responses}
    answers = [r.json() for r in responses]
    for (name, _, _), answer in zip(jobs, answers, strict=True):
        allowed = set(COLOURS) if name == "colours" else {str(d) for d in range(10)}
        assert answer["model"] == name and {p["label"] for p in answer["predictions"]} <= allowed
    right = {name: [] for name in ("digits", "colours")}
    for (name, _, expected), answer in zip(jobs, answers, strict=True):
        right[name].append(answer["predictions"][0]["label"] == expected)
    assert np.mean(right["digits"]) >= 0.95, np.mean(right["digits"])
    assert all(right["colours"])
    # Each model server computed its own model's requests, every one once.
    ids = {name: {a["request_id"] for (n, _, _), a in zip(jobs, answers, strict=True) if n == name} for name in right}
    stack.wait_logged([a["request_id"] for a in answers], timeout_s=60)
    for server, name in enumerate(("digits", "colours")):
        computed = [i for _, batch in stack.batches(server) for i in batch]
        assert sorted(computed) == sorted(ids[name]), name


def test_curl_against_one_model_answers_as_it_always_did(live_url: str):
    """The first version's answer, key for key: curl -F image=@x /predict."""
    done = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-F", f"image=@{REPO / 'samples' / 'digit_3.png'}",
         f"{live_url}/predict"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    text, status = done.stdout.rsplit("\n", 1)
    assert status == "200", text
    body = json.loads(text)
    assert list(body) == ["success", "request_id", "model", "predictions"]
    assert body["success"] is True and body["model"] == "digits"
    assert uuid.UUID(body["request_id"]).version == 4
    assert len(body["predictions"]) == 5 and body["predictions"][0]["label"] == "3"
    assert all(list(p) == ["label", "probability"] and isinstance(p["probability"], float) for p in body["predictions"])
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    models = requests.get(f"{live_url}/models", timeout=10).json()
    assert models == {"models": [{"name": "digits", "versions": [1], "ready": True, "input": [8, 8, 1], "classes": 10}]}
