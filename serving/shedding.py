"""Refusing an overloaded model's requests before their bodies are read: load shedding in front of Flask.

Under overload most requests are refused, and a refusal through the app (reading and parsing the
upload, Flask's request machinery, the error handlers) costs the web worker about half what an
answer does: CPU the model servers on the same hosts and the requests that are served go without
(bench/results/refusal_cost.md). So a POST to /predict or /v2/.../infer is refused here, from its
URL and headers alone, whenever they already decide that the model it goes to is overloaded:

- the model version must follow without the body: the v2 URL names the model; /predict may name it
  in the body, so only while the catalog holds one model version, the one a request naming none gets
  (any other name or version in the body would be a 404);
- the deadline is the longest the body could leave it: X-Request-Timeout-Ms or REQUEST_TIMEOUT_S (a
  timeout in the body only ever shortens it, which refuses more);
- one image (a v2 request may hold more, which refuses more).

Whatever is not certain goes through to the app, which decides as before. A refused request is not
checked for mistakes in its body or query: the client learns of them once the model has room. The
server (gunicorn) discards the unread body before the connection's next request.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable

import redis

from serving import v2
from serving.errors import ApiError, Shape, contract_shape
from serving.inference import Refused
from serving.registry import ModelState
from serving.upload import TIMEOUT_HEADER, parse_timeout, parse_version
from serving.webtier import WebTier, authorized, finished

_INFER = re.compile(rf"^{v2.PREFIX}/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_HEADER = "HTTP_" + TIMEOUT_HEADER.upper().replace("-", "_")


class Shedder:
    """WSGI middleware: the refusal for what its URL and headers decide, else the app's answer."""

    def __init__(self, app: Callable, parts: WebTier) -> None:
        self.app = app
        self.parts = parts

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.monotonic()
        try:
            shed = self._shed(environ) if environ["REQUEST_METHOD"] == "POST" else None
        except (redis.RedisError, LookupError, ApiError):  # e.g. a bad header: the app answers what is wrong
            shed = None
        if shed is None:
            return self.app(environ, start_response)
        route, model, shape, refusal = shed
        request_id = str(uuid.uuid4())
        body = (json.dumps(shape("overloaded", refusal.message), separators=(",", ":")) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers += [("Retry-After", refusal.retry_after_header), ("X-Request-ID", request_id)]
        start_response("503 SERVICE UNAVAILABLE", headers)
        finished(request_id, "POST", environ.get("PATH_INFO", ""), route, 503, started, model.keys)
        return [body]

    def _shed(self, environ: dict) -> tuple[str, ModelState, Shape, Refused] | None:
        """(route, model version, error shape, refusal) of a request its URL and headers refuse; None otherwise."""
        target = self._target(environ.get("PATH_INFO", ""))
        settings = self.parts.settings
        if target is None or not authorized(environ.get("HTTP_AUTHORIZATION"), settings.api_keys):
            return None  # the app answers, a 401 included
        route, model, shape = target
        timeout_s = parse_timeout(None, environ.get(_HEADER), settings.request_timeout_s)
        refusal = self.parts.inference.overloaded(model, 1, self.parts.clock.now() + timeout_s)
        return (route, model, shape, refusal) if refusal else None

    def _target(self, path: str) -> tuple[str, ModelState, Shape] | None:
        """(route, the model version a request goes to, its error shape), when the URL alone decides it."""
        if path == "/predict":
            states = self.parts.catalog.states()
            if len(states) == 1 and self.parts.catalog.resolve(None, None) is states[0]:
                return "/predict", states[0], contract_shape
        elif match := _INFER.match(path):
            name, version = match.groups()
            route = f"{v2.PREFIX}/models/<name>{'/versions/<version>' if version else ''}/infer"
            return route, self.parts.catalog.resolve(name, parse_version(version)), v2.error_shape
        return None
