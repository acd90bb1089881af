"""The web tier's Flask app, built from its settings and (in tests) the Redis clients it should use.

`create_app` runs once per web worker process: the inbox it creates belongs to that process, so a
server that preloads the app before forking workers must not be used (gunicorn's default is right).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

import redis
from flask import Flask, Response, current_app, g, request

from serving import connections, errors, logs, metrics, v2
from serving.api import api
from serving.catalog import Catalog
from serving.clock import RedisClock
from serving.errors import ApiError
from serving.inference import InferenceClient
from serving.pages import pages
from serving.results import Inbox
from serving.webtier import WebTier
from settings import Settings

log = logging.getLogger("web")


def create_app(
    settings: Settings,
    r: redis.Redis | None = None,
    readers: redis.Redis | None = None,
    clock: RedisClock | None = None,
) -> Flask:
    """The app; `r` for quick commands and `readers` for the inbox's blocking reads (made from REDIS_URL when None);
    `clock` reads Redis' time through `r` unless given (tests give one whose host clock is off)."""
    if r is None or readers is None:
        r, readers = connections.for_web_worker(settings.redis_url)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False  # keep "success" first, as the contract shows it
    clock = clock or RedisClock(r)
    inference = InferenceClient(r, Inbox(readers), clock, settings.queue_limit)
    app.extensions["serving"] = WebTier(settings, r, clock, Catalog(r, clock, settings.default_model), inference)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(v2.v2)
    errors.register(app, settings.max_upload_mb, {v2.PREFIX: v2.error_shape})
    app.before_request(_start)
    app.before_request(_authorize)
    app.after_request(_finish)
    return app


def _start() -> None:
    g.request_id = str(uuid.uuid4())
    g.started = time.monotonic()


def _authorize() -> None:
    """Every route needs a key when API_KEYS is set, unless it is marked @public."""
    keys = current_app.extensions["serving"].settings.api_keys
    view = current_app.view_functions.get(request.endpoint or "")
    if not keys or view is None or getattr(view, "public", False):
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        message = "send a valid API key as 'Authorization: Bearer <key>'"
        raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def _finish(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.request_id
    elapsed = time.monotonic() - g.started
    route = request.url_rule.rule if request.url_rule else "other"
    metrics.observe_request(route, response.status_code, elapsed, g.get("model"))
    logs.event(
        log,
        "request",
        request_id=g.request_id,
        method=request.method,
        path=request.path,
        status=response.status_code,
        ms=round(elapsed * 1000, 1),
        model=g.model.member if g.get("model") else "",  # the model version chosen for it, as name:version
    )
    return response
