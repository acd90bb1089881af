"""The REST API of the contract: POST /predict, GET /models, and the health, readiness and metrics routes."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, g, jsonify, request

from serving import metrics, wire
from serving.dispatch import admit_early, infer, pixels_of, routed
from serving.registry import ModelState
from serving.upload import TIMEOUT_HEADER, Upload, parse_timeout, parse_top_k, read_image
from serving.webtier import arrival, public, tier

api = Blueprint("api", __name__)


@api.post("/predict")
def predict() -> Response:
    arrived = arrival()  # the deadline counts from arrival: reading and decoding count too
    upload = read_image(request)
    return routed(
        upload.options.get("model"),
        upload.options.get("version"),
        lambda model, movable: _predicted(upload, model, arrived, movable),
    )


def _predicted(upload: Upload, model: ModelState, arrived: float, movable: bool) -> Response:
    t, info = tier(), model.info
    top_k = parse_top_k(upload.options.get("top_k"), t.settings.top_k, info.num_classes)
    timeout_s = parse_timeout(t.settings.request_timeout_s, upload.timeouts, request.headers.get(TIMEOUT_HEADER))
    deadline = arrived + timeout_s
    admit_early(model, 1, deadline, timeout_s)  # before decoding, the expensive part: refusals stay cheap
    (result,) = infer(model, [pixels_of(upload.image, info)], top_k, deadline, timeout_s, movable)
    predictions = [{"label": info.labels[i], "probability": p} for i, p in result.top]
    response = jsonify(success=True, request_id=g.request_id, model=info.name, predictions=predictions)
    response.headers["X-Model-Version"] = str(model.keys.version)  # which version answered, e.g. in a rollout
    return response


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
        states = tier().catalog.read()
    except redis.RedisError as exc:
        return jsonify(ready=False, reason=f"redis does not answer: {exc}"), 503
    servers = sum(state.live_servers for state in states)
    ready_models = [state.keys.member for state in states if state.ready]
    body = {"model_servers": servers, "queue_depth": sum(state.queued for state in states), "models": ready_models}
    if servers == 0:
        reason = _refusing_writes(tier().r) or tier().catalog.why_none_ready()
        return jsonify(ready=False, reason=reason, **body), 503
    return jsonify(ready=True, **body), 200


def _refusing_writes(r: redis.Redis) -> str | None:
    """Why Redis refuses writes, if it does (out of memory, a read-only replica): the model servers' heartbeats
    fail then, and "no model server is alive" would send an operator to the wrong place."""
    try:
        r.set(f"{wire.PREFIX}:ready-probe", 1, px=1000)
    except redis.ResponseError as exc:
        return f"redis refuses writes ({exc}), so no model server can announce itself"
    return None


@api.get("/metrics")
@public
def prometheus_metrics() -> Response:
    t = tier()
    return Response(metrics.render(t.r, t.clock), mimetype="text/plain; version=0.0.4")
