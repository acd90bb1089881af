"""POST /predict in-process: the Flask app through its test client, a digits model server as a thread."""

from __future__ import annotations

import pathlib

from tests.conftest import upload

DIGIT = (pathlib.Path(__file__).resolve().parent.parent / "samples" / "digit_3.png").read_bytes()


def test_a_digit_is_classified(served, client):
    response = upload(client, DIGIT, top_k=3)

    assert response.status_code == 200, response.json
    body = response.json
    assert body["success"] is True and body["model"] == "digits"
    assert body["predictions"][0]["label"] == "3" and len(body["predictions"]) == 3
    assert served.computed == [body["request_id"]] == [response.headers["X-Request-ID"]]
