"""The REST API of the contract: POST /predict, GET /models, and the health, readiness and metrics routes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import redis
from flask import Blueprint, Response, g, jsonify, request

from serving import images, metrics
from serving.catalog import NoModel, NoModelNamed, UnknownModel
from serving.errors import ApiError
from serving.inference import Refused, TimedOut
from serving.registry import ModelState
from serving.upload import TIMEOUT_HEADER, parse_model, parse_timeout, parse_top_k, parse_version, read_image
from serving.webtier import public, tier

api = Blueprint("api", __name__)

# What a model server's failure code means to a client: HTTP status and the contract's code.
_FAILURES = {
    "late": (503, "overloaded"),  # it could not be computed before its deadline
    "model_changed": (503, "model_changed"),
    "malformed": (500, "internal"),
    "model_error": (500, "model_error"),
}


@api.post("/predict")
def predict() -> Response:
    t = tier()
    arrived = t.clock.now()  # the deadline counts from arrival: reading and decoding count too
    upload = read_image(request)
    model = resolve(upload.options.get("model"), upload.options.get("version"))
    info = model.info
    top_k = parse_top_k(upload.options.get("top_k"), t.settings.top_k, info.num_classes)
    asked = upload.options.get("timeout_ms"), request.headers.get(TIMEOUT_HEADER)
    timeout_s = parse_timeout(*asked, t.settings.request_timeout_s)
    deadline = arrived + timeout_s
    with refusals_as_http(timeout_s):  # before decoding, the expensive part: refusals stay cheap
        t.inference.refuse_early(model, 1, deadline)
    try:
        pixels = images.decode(upload.image, info.height, info.width, info.channels)
    except images.InvalidImage as exc:
        raise ApiError(400, "invalid_image", f"{exc}; send a JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF file") from None
    (result,) = infer(model, [pixels], top_k, deadline, timeout_s)
    predictions = [{"label": info.labels[i], "probability": p} for i, p in result.top]
    return jsonify(success=True, request_id=g.request_id, model=info.name, predictions=predictions)


def resolve(raw_model: object, raw_version: object) -> ModelState:
    """The model version a request goes to, with its info; a 4xx or 503 saying why there is none."""
    try:
        model = tier().catalog.resolve(parse_model(raw_model), parse_version(raw_version))
    except UnknownModel as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except NoModelNamed as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except NoModel as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "1"}) from None
    if model.info is None:
        message = f"{model.keys.name} has published nothing readable yet"
        raise ApiError(503, "unavailable", message, {"Retry-After": "1"})
    return model


@contextmanager
def refusals_as_http(timeout_s: float) -> Iterator[None]:
    """Refused as 503 with Retry-After (whole seconds, at least 1), TimedOut as 504."""
    try:
        yield
    except Refused as exc:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        raise ApiError(503, exc.reason, exc.message, headers) from None
    except TimedOut as exc:
        message = exc.message or f"no answer within {timeout_s:g} s; the server is busy, try again later"
        raise ApiError(504, "timeout", message) from None


def infer(
    model: ModelState, pixels: list[np.ndarray], top_k: int | None, deadline: float, timeout_s: float | None = None
) -> list:
    """The model tier's results for these images, or the ApiError that says why not."""
    t = tier()
    with refusals_as_http(t.settings.request_timeout_s if timeout_s is None else timeout_s):
        results = t.inference.infer(g.request_id, model, pixels, top_k, deadline)
    for result in results:
        if result.error_code:
            status, code = _FAILURES.get(result.error_code, (500, "model_error"))
            headers = {"Retry-After": "1"} if status == 503 else {}
            raise ApiError(status, code, f"{model.keys.name}: {result.error}", headers)
    return results


@api.get("/models")
def models() -> Response:
    by_name: dict[str, list[ModelState]] = {}
    for state in tier().catalog.states():
        by_name.setdefault(state.keys.name, []).append(state)
    return jsonify(models=[_describe(name, states) for name, states in sorted(by_name.items())])


def _describe(name: str, states: list[ModelState]) -> dict:
    default = tier().catalog.resolve(name, None)
    info = default.info
    return {
        "name": name,
        "versions": [state.keys.version for state in states],
        "ready": any(state.ready for state in states),
        "input": list(info.shape) if info else None,
        "classes": info.num_classes if info else None,
    }


@api.get("/health")
@public
def health() -> Response:
    return jsonify(status="ok")


@api.get("/ready")
@public
def ready() -> tuple[Response, int]:
    try:
        states = tier().catalog.states()
    except redis.RedisError as exc:
        return jsonify(ready=False, reason=f"redis does not answer: {exc}"), 503
    servers = sum(state.live_servers for state in states)
    ready_models = [state.keys.member for state in states if state.ready]
    body = {"model_servers": servers, "queue_depth": sum(state.queued for state in states), "models": ready_models}
    if servers == 0:
        return jsonify(ready=False, reason="no model server is alive", **body), 503
    return jsonify(ready=True, **body), 200


@api.get("/metrics")
@public
def prometheus_metrics() -> Response:
    t = tier()
    return Response(metrics.render(t.r, t.clock), mimetype="text/plain; version=0.0.4")
