"""The OpenAPI document: valid OpenAPI, served as is, and true of the web tier.

Schemathesis fuzzes every documented operation over real HTTP (the app in a werkzeug server, a digits
model server behind it) and checks each answer against the document; the error paths a fuzzer
cannot reach (API keys, size limit, no model server, Redis down) are driven by hand and checked
against the same document.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import requests
import schemathesis
from openapi_spec_validator import validate

from scripts.processes import REPO
from serving.app import create_app
from tests.conftest import upload

SPEC_PATH = REPO / "serving" / "static" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())
DIGIT = (REPO / "samples" / "digit_3.png").read_bytes()

# The checks the contract promises: no 500 from any input, and every answer documented.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]


def test_document_is_valid_openapi() -> None:
    validate(SPEC)  # raises with the offending path when the document is not OpenAPI 3


def test_every_route_is_documented(settings) -> None:
    """A route added to the app without a line in the document fails here, not in a client."""
    app = create_app(settings)
    found = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    app.extensions["serving"].inference.inbox.close()
    # Flask writes a path parameter <name> (or <converter:name>), OpenAPI {name}.
    routes = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule), method) for rule, method in found}
    documented = {(path, method.upper()) for path, item in SPEC["paths"].items() for method in item}
    assert routes == documented


def test_served_document_is_the_file(client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json == SPEC


def test_schemathesis_finds_nothing_over_http(live_url: str, tmp_path: pathlib.Path) -> None:
    # Load the document from a file, not from the server's URL: schemathesis leaves out the
    # operation that serves the schema it was loaded from, and /openapi.json should be tested too.
    served = tmp_path / "openapi.json"
    served.write_bytes(requests.get(f"{live_url}/openapi.json", timeout=10).content)
    # A timeout_ms of a few milliseconds is answered 504 as documented: the one 5xx a client may ask for.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[[operations]]\ninclude-path = "/predict"\ninclude-method = "POST"\n'
        'checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]\n'
    )
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", str(served),
        "--url", live_url,
        "--checks", ",".join(CHECKS),
        "--phases", "examples,coverage,fuzzing",  # stateful needs links between operations; there are none
        "--max-examples", "50",
        "--seed", "20261121",  # the same cases on every run, so a failure reproduces
        "--generation-database", "none",  # and nothing remembered from an earlier run changes them
        "--workers", "1",
        "--request-timeout", "30",
        "--no-color",
    ]  # fmt: skip
    # cwd=tmp_path: whatever schemathesis writes (reports, caches) stays out of the repo.
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    operations = sum(len(item) for item in SPEC["paths"].values())
    assert operations == 16 and f"{operations} selected / {operations} total" in result.stdout, result.stdout[-4000:]


def conforms(response: requests.Response, path: str, method: str, status: int) -> dict[str, Any]:
    """Assert `response` has `status`, documented for the operation with its media type and body schema."""
    assert response.status_code == status, response.text
    documented = SPEC["paths"][path][method.lower()]["responses"][str(status)]
    media_type = response.headers["Content-Type"].split(";")[0].strip()
    assert media_type in documented["content"], media_type
    operation = schemathesis.openapi.from_path(SPEC_PATH)[path][method.upper()]
    operation.validate_response(response)  # raises listing every mismatch with the body schema
    return response.json() if media_type == "application/json" else {}


def test_error_answers_a_fuzzer_cannot_reach_match_the_document(own_redis, make_app, serve_http) -> None:
    """API keys, the size limit, no model server, then Redis down: each answer as documented."""
    redis_url, redis_process = own_redis()  # to stop halfway
    # 10 kB, so a big upload is cheap; and no model server at all.
    app = make_app(redis_url=redis_url, api_keys=frozenset({"sesame", "other"}), max_upload_mb=0.01)
    url = serve_http(app)
    files = {"image": ("digit.png", DIGIT)}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2VzYW1lOg=="}):
        response = requests.post(f"{url}/predict", files=files, headers=headers, timeout=10)
        body = conforms(response, "/predict", "POST", 401)
        assert body["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    key = {"Authorization": "Bearer other"}
    big = {"image": ("big.png", b"\0" * 20_000)}
    body = conforms(requests.post(f"{url}/predict", files=big, headers=key, timeout=10), "/predict", "POST", 413)
    assert body["error"]["code"] == "too_large"

    body = conforms(requests.post(f"{url}/predict", files=files, headers=key, timeout=10), "/predict", "POST", 503)
    assert body["error"]["code"] == "unavailable"
    body = conforms(requests.get(f"{url}/ready", timeout=10), "/ready", "GET", 503)
    assert body["ready"] is False and body["queue_depth"] == 0
    body = conforms(requests.get(f"{url}/models", headers=key, timeout=10), "/models", "GET", 200)
    assert body == {"models": []}
    conforms(requests.get(f"{url}/models", timeout=10), "/models", "GET", 401)

    redis_process.terminate()
    redis_process.wait(timeout=10)
    response = requests.post(f"{url}/predict", files=files, headers=key, timeout=30)
    body = conforms(response, "/predict", "POST", 503)
    assert body["error"]["code"] == "unavailable" and response.headers["Retry-After"] == "1"
    body = conforms(requests.get(f"{url}/ready", timeout=30), "/ready", "GET", 503)
    assert body["ready"] is False and "redis" in body["reason"]
    conforms(requests.get(f"{url}/metrics", timeout=30), "/metrics", "GET", 200)
    conforms(requests.get(f"{url}/health", timeout=10), "/health", "GET", 200)


def test_a_top_k_of_thousands_of_digits_is_a_400(served, client) -> None:
    # int() refuses strings of over 4300 digits (Python's int_max_str_digits): once a 500.
    response = upload(client, DIGIT, top_k="9" * 5000)
    assert response.status_code == 400, response.text
    assert response.json["error"]["code"] == "bad_request"
