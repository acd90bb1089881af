"""Refusing an overloaded model's requests, and those nobody waits for, before their bodies are read: load
shedding in front of Flask.

Under overload most requests are refused, and a refusal through the app (reading and parsing the
upload, Flask's request machinery, the error handlers) costs the web worker about half what an
answer does: CPU the model servers on the same hosts and the requests that are served go without
(bench/results/refusal_cost.md). So a POST to /predict or /v2/.../infer is refused here, from its
URL and headers alone, whenever they already decide that the model it goes to is overloaded:

- the model version must follow without the body: the v2 URL names the model; /predict may name it
  in the body, so only while the catalog holds one model version, the one a request naming none gets
  (any other name or version in the body would be a 404);
- the deadline is the longest the body could leave it: X-Request-Timeout-Ms, the query's timeout_ms or
  REQUEST_TIMEOUT_S (a timeout in the body only ever shortens it, which refuses more);
- one image (a v2 request may hold more, which refuses more).

A request read late (READ_LATE_S) whose client has closed its connection (serving.webtier.client_gone) is
answered 499 here too, whenever its URL decides the model version as above. A web worker with more than its
cores can do reads some requests only after their clients gave up (digits at three times its capacity: 13,488
in 20 s), and through the app each cost what a refusal there does.

What the URL and headers get wrong is the app's to answer, as at any other time: a query naming
another model or version (404) or holding a bad option (400), a body declared empty (400) or over
MAX_UPLOAD_MB (413). Whatever is not certain goes through to the app too. A refused request's body is
not checked for mistakes: the client learns of them once the model has room. The server (gunicorn)
discards the unread body before the connection's next request.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl

import redis
from werkzeug.http import HTTP_STATUS_CODES

from serving import v2
from serving.errors import ApiError, Shape, contract_shape
from serving.registry import ModelState
from serving.upload import TIMEOUT_HEADER, TIMEOUT_OPTION, parse_model, parse_timeout, parse_top_k, parse_version
from serving.webtier import ARRIVED, WebTier, authorized, client_gone, closed_error, finished, refused_error

_INFER = re.compile(rf"^{v2.PREFIX}/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_HEADER = "HTTP_" + TIMEOUT_HEADER.upper().replace("-", "_")
# A worker reads a request within milliseconds of its last bytes unless it holds more than it can do. Read
# this late, a request whose client is gone is answered 499 here, unread. Read sooner, it goes to the app,
# which tells a client that only closed its sending side and still reads its own answer (a 400 for a bad body).
READ_LATE_S = 1.0


class Shedder:
    """WSGI middleware: the refusal for what its URL and headers decide, else the app's answer."""

    def __init__(self, app: Callable, parts: WebTier) -> None:
        self.app = app
        self.parts = parts

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = environ.setdefault(ARRIVED, time.monotonic())  # unless a layer in front of it knew earlier
        try:
            shed = self._shed(environ) if environ["REQUEST_METHOD"] == "POST" else None
        except (redis.RedisError, LookupError, ApiError):  # e.g. a bad header: the app answers what is wrong
            shed = None
        if shed is None:
            return self.app(environ, start_response)
        route, model, shape, error = shed
        request_id = str(uuid.uuid4())
        body = (json.dumps(shape(error.code, error.message), separators=(",", ":")) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers += [*error.headers.items(), ("X-Request-ID", request_id)]
        start_response(f"{error.status} {HTTP_STATUS_CODES.get(error.status, 'Unknown').upper()}", headers)
        finished(request_id, "POST", environ.get("PATH_INFO", ""), route, error.status, started, model.keys)
        return [body]

    def _shed(self, environ: dict) -> tuple[str, ModelState, Shape, ApiError] | None:
        """(route, model version, error shape, the answer) of a request its URL and headers refuse, or whose
        client is gone; None otherwise."""
        settings, path = self.parts.settings, environ.get("PATH_INFO", "")
        query = _query(environ) if path == "/predict" else {}  # the protocol's routes take nothing from it
        target = self._target(path, query)
        if target is None or not authorized(environ.get("HTTP_AUTHORIZATION"), settings.api_keys):
            return None  # the app answers, a 401 included
        route, model, shape = target
        if client_gone(environ, quiet_s=READ_LATE_S):
            return route, model, shape, closed_error()
        if not _sized_within(environ, settings.max_upload_bytes):
            return None
        timeout_s = parse_timeout(settings.request_timeout_s, [query.get(TIMEOUT_OPTION)], environ.get(_HEADER))
        refusal = self.parts.inference.overloaded(model, 1, self.parts.clock.now() + timeout_s)
        return (route, model, shape, refused_error(refusal)) if refusal else None

    def _target(self, path: str, query: dict[str, str]) -> tuple[str, ModelState, Shape] | None:
        """(route, the model version a request goes to, its error shape), when the URL alone decides it.

        Raises what the app's own parsing does for a query it would refuse (ApiError, LookupError)."""
        if path == "/predict":
            states, catalog = self.parts.catalog.states(), self.parts.catalog
            if len(states) == 1 and states[0].info:
                chosen = catalog.resolve(parse_model(query.get("model")), parse_version(query.get("version")))
                parse_top_k(query.get("top_k"), self.parts.settings.top_k, states[0].info.num_classes)
                return ("/predict", states[0], contract_shape) if chosen is states[0] else None
        elif match := _INFER.match(path):
            name, version = match.groups()
            route = f"{v2.PREFIX}/models/<name>{'/versions/<version>' if version else ''}/infer"
            return route, self.parts.catalog.resolve(name, parse_version(version)), v2.error_shape
        return None


def _query(environ: dict) -> dict[str, str]:
    """The query string's parameters, the first of each name as Flask's request.args.get gives it."""
    return dict(reversed(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)))


def _sized_within(environ: dict, max_bytes: int) -> bool:
    """Whether the headers leave the body non-empty and within max_bytes (a chunked one's shows only as it is read)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    length = environ.get("CONTENT_LENGTH", "")
    return length.isdigit() and 0 < int(length) <= max_bytes
