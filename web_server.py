"""The web tier: accept an image, queue it for the model servers, answer with their predictions.

`python web_server.py` runs it in production (gunicorn with gevent workers, WEB_WORKERS of them,
on PORT); `web_server:app` is a plain WSGI app for any other server. It never imports TensorFlow:
what it knows of the model comes from what the model servers publish in Redis.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import sys
import time
import uuid

import redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import settings
from serving import images, logs, metrics, queue, wire
from serving.pages import pages
from serving.upload import ApiError, parse_top_k, read_image

log = logging.getLogger("web")
app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = int(settings.MAX_UPLOAD_MB * 1024 * 1024)
app.json.sort_keys = False  # keep "success" first, as the contract shows it
app.register_blueprint(pages)

# How long a web worker trusts the model info it read from Redis before reading it again.
MODEL_INFO_TTL_S = 2.0


@functools.cache
def _redis() -> redis.Redis:
    """For quick commands: a dead Redis shows up in seconds, not at the request timeout."""
    return queue.connect(settings.REDIS_URL, socket_timeout=5.0)


@functools.cache
def _redis_blocking() -> redis.Redis:
    """For the blocking wait on a result, which may last the whole request timeout."""
    return queue.connect(settings.REDIS_URL, socket_timeout=settings.REQUEST_TIMEOUT_S + 5)


_model_info_cache: tuple[float, wire.ModelInfo | None] = (0.0, None)


def model_info() -> wire.ModelInfo:
    global _model_info_cache
    fetched_at, info = _model_info_cache
    if info is None or time.monotonic() - fetched_at > MODEL_INFO_TTL_S:
        info = queue.model_info(_redis())
        _model_info_cache = (time.monotonic(), info)
    if info is None:
        raise ApiError(503, "unavailable", "no model server has started yet; try again shortly")
    return info


@app.before_request
def _start() -> None:
    g.request_id = str(uuid.uuid4())
    g.started = time.monotonic()


@app.after_request
def _finish(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.request_id
    elapsed = time.monotonic() - g.started
    metrics.observe_request(request.url_rule.rule if request.url_rule else "other", response.status_code, elapsed)
    logs.event(
        log,
        "request",
        request_id=g.request_id,
        method=request.method,
        path=request.path,
        status=response.status_code,
        ms=round(elapsed * 1000, 1),
    )
    return response


def _check_api_key() -> None:
    if not settings.API_KEYS:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not any(hmac.compare_digest(given, key.encode()) for key in settings.API_KEYS):
        raise ApiError(
            401,
            "unauthorized",
            "send a valid API key as 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )


@app.post("/predict")
def predict() -> Response:
    deadline = time.time() + settings.REQUEST_TIMEOUT_S  # from arrival: decoding counts too
    _check_api_key()
    data, raw_top_k = read_image(request)
    info = model_info()
    top_k = parse_top_k(raw_top_k, settings.TOP_K, info.num_classes)
    try:
        pixels = images.decode(data, info.height, info.width, info.channels)
    except images.InvalidImage as exc:
        raise ApiError(400, "invalid_image", f"{exc}; send a JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF file") from None
    job = wire.Job(g.request_id, pixels, deadline, top_k)
    _submit(job)
    result = queue.wait_result(_redis_blocking(), job.request_id, job.deadline)
    if result is None:
        raise ApiError(
            504, "timeout", f"no answer within {settings.REQUEST_TIMEOUT_S:g} s; the server is busy, try again later"
        )
    if "error" in result:
        raise ApiError(500, "model_error", f"the model failed on this batch: {result['error']}")
    return jsonify(success=True, request_id=job.request_id, model=info.name, predictions=result["predictions"])


def _submit(job: wire.Job) -> None:
    status = queue.submit(_redis(), job, settings.QUEUE_LIMIT)
    if status is queue.Submitted.FULL:
        raise ApiError(503, "overloaded", "the server is at capacity; retry after a second", {"Retry-After": "1"})
    if status is queue.Submitted.NO_SERVER:
        raise ApiError(503, "unavailable", "no model server is running; try again later")


@app.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@app.get("/ready")
def ready() -> tuple[Response, int]:
    try:
        r = _redis()
        servers, depth = queue.live_servers(r), queue.queue_depth(r)
    except redis.RedisError as exc:
        return jsonify(ready=False, reason=f"redis does not answer: {exc}"), 503
    if servers == 0:
        return jsonify(ready=False, reason="no model server is alive", queue_depth=depth), 503
    return jsonify(ready=True, model_servers=servers, queue_depth=depth), 200


@app.get("/metrics")
def prometheus_metrics() -> Response:
    return Response(metrics.render(_redis()), mimetype="text/plain; version=0.0.4")


def _error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    response = jsonify(success=False, error={"code": code, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


@app.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return _error(exc.status, exc.code, exc.message, exc.headers)


@app.errorhandler(RequestEntityTooLarge)
def _too_large(_: RequestEntityTooLarge) -> Response:
    return _error(413, "too_large", f"the upload is over {settings.MAX_UPLOAD_MB:g} MB; send a smaller image")


@app.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    code = "bad_request" if exc.code == 400 else (exc.name or "error").lower().replace(" ", "_")
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
    return _error(exc.code or 400, code, exc.description or exc.name, headers)


@app.errorhandler(redis.RedisError)
def _redis_down(exc: redis.RedisError) -> Response:
    log.warning("redis unavailable: %s", exc)
    return _error(503, "unavailable", "the queue (Redis) is unavailable; try again shortly", {"Retry-After": "1"})


@app.errorhandler(Exception)
def _unexpected(exc: Exception) -> Response:
    log.exception("unexpected error in request %s", g.get("request_id"))
    return _error(500, "internal", "an unexpected error happened on the server; it has been logged")


def main() -> None:
    """Replace this process with gunicorn, so its master gets our signals directly."""
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # gunicorn imports web_server from here
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:serving.gunicorn_conf", "web_server:app"]
    os.execv(sys.executable, argv)


logs.setup("web")

if __name__ == "__main__":
    main()
