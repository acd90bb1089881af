"""The web tier's Flask app, built from its settings and (in tests) the Redis clients it should use.

`create_app` runs once per web worker process: the inbox it creates belongs to that process, so a
server that preloads the app before forking workers must not be used (gunicorn's default is right).
"""

from __future__ import annotations

import time
import uuid

import redis
from flask import Flask, Response, current_app, g, request

from serving import connections, errors, v2
from serving.api import api
from serving.catalog import Catalog
from serving.clock import RedisClock
from serving.errors import ApiError
from serving.inference import InferenceClient
from serving.pages import pages
from serving.results import Inbox
from serving.shedding import Shedder
from serving.upload import client_bodies
from serving.webtier import ARRIVED, WebTier, authorized, finished
from settings import Settings


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
    # A text field may be as large as the body (Flask's 500 KB default refused base64 images sent as one).
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_upload_bytes
    app.json.sort_keys = False  # keep "success" first, as the contract shows it
    # "//predict" is a 404 in the API's JSON, not Werkzeug's HTML redirect, which API clients do not follow.
    app.url_map.merge_slashes = False
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
    app.wsgi_app = client_bodies(app.wsgi_app)  # a body the server cannot read is a 400, not a 500
    app.wsgi_app = Shedder(app.wsgi_app, app.extensions["serving"])  # in front of Flask: see its docstring
    return app


def _start() -> None:
    g.request_id = str(uuid.uuid4())
    g.started = request.environ.get(ARRIVED, time.monotonic())


def _authorize() -> None:
    """Every route needs a key when API_KEYS is set, unless it is marked @public."""
    keys = current_app.extensions["serving"].settings.api_keys
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None or getattr(view, "public", False) or authorized(request.headers.get("Authorization"), keys):
        return
    message = "send a valid API key as 'Authorization: Bearer <key>'"
    raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def _finish(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.request_id
    route = request.url_rule.rule if request.url_rule else "other"
    model = g.get("model")
    finished(g.request_id, request.method, request.path, route, response.status_code, g.started, model)
    return response
