"""The web tier's errors, answered as the contract's JSON: {"success": false, "error": {code, message}}.

Routes under a prefix with a protocol of its own answer in that protocol's shape instead (the Open
Inference Protocol's {"error": message} under /v2), whatever raised the error, routing included. What
gunicorn refuses before the app sees it (serving.gunicorn_worker.json_error) has no path yet, and
answers in the contract's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger("web")


class ApiError(Exception):
    """A client-facing error: an HTTP status, a machine code and a message for a person."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# (code, message) -> the JSON body of an error answer.
Shape = Callable[[str, str], dict]


def contract_shape(code: str, message: str) -> dict:
    return {"success": False, "error": {"code": code, "message": message}}


def code_for(status: int, reason: str) -> str:
    """The machine code of an HTTP error nothing named more precisely: its reason phrase, as "uri_too_long"."""
    return "bad_request" if status == 400 else reason.lower().replace(" ", "_")


def register(app: Flask, max_upload_mb: float, shapes: Mapping[str, Shape] | None = None) -> None:
    """Every error, whatever raised it, leaves the app as JSON, none as an HTML page: in the shape of
    `shapes` for a path under one of its prefixes, else in the contract's."""

    def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
        path = request.path
        under = (shape for prefix, shape in (shapes or {}).items() if path == prefix or path.startswith(f"{prefix}/"))
        response = jsonify(next(under, contract_shape)(code, message))
        response.status_code = status
        response.headers.update(headers or {})
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: RequestEntityTooLarge) -> Response:
        length = request.content_length
        if length is not None and length <= app.config["MAX_CONTENT_LENGTH"]:  # within the limit: Flask's form limit
            message = f"the form has more than {app.config['MAX_FORM_PARTS']:,} parts; send the image and the options"
        else:
            message = f"the upload is over {max_upload_mb:g} MB; send a smaller image"
        return error_response(413, "too_large", message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = code_for(exc.code or 400, exc.name or "error")
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # e.g. Allow on 405
        return error_response(exc.code or 400, code, exc.description or exc.name, headers)

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: redis.RedisError) -> Response:
        log.warning("redis unavailable: %s", exc)
        message = "the queue (Redis) is unavailable; try again shortly"
        return error_response(503, "unavailable", message, {"Retry-After": "1"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in request %s", g.get("request_id"))
        return error_response(500, "internal", "an unexpected error happened on the server; it has been logged")
