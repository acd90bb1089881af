"""What every route of the web tier shares: its parts, which routes are open without an API key, and whether
a request's client still waits for its answer."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis
from flask import current_app, g

from serving import logs, metrics, sockets, wire
from serving.catalog import Catalog
from serving.clock import RedisClock
from serving.errors import ApiError
from serving.inference import InferenceClient, Refused
from settings import Settings

View = TypeVar("View", bound=Callable)

log = logging.getLogger("web")


@dataclass
class WebTier:
    settings: Settings
    r: redis.Redis  # for quick commands
    clock: RedisClock
    catalog: Catalog
    inference: InferenceClient


# The WSGI environ's key for when the request reached the app's outermost layer (serving.shedding), on
# time.monotonic(): its deadline and its logged time count from there, whatever held it in between.
ARRIVED = "serving.arrived"


def arrival() -> float:
    """When the current request arrived, on Redis' clock."""
    return tier().clock.now() - (time.monotonic() - g.started)


def tier() -> WebTier:
    """The parts of the app handling the current request (create_app puts them there)."""
    return current_app.extensions["serving"]


def public(view: View) -> View:
    """Mark a route as open without an API key; every other route needs one when API_KEYS is set."""
    view.public = True
    return view


def authorized(header: str | None, keys: Sequence[str]) -> bool:
    """Whether an Authorization header carries one of the API keys (any header does when there are none)."""
    if not keys:
        return True
    scheme, _, token = (header or "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


def finished(
    request_id: str, method: str, path: str, route: str, status: int, started: float, model: wire.ModelKeys | None
) -> None:
    """A request answered: its metrics and its line in the request log; `started` on time.monotonic()."""
    elapsed = time.monotonic() - started
    metrics.observe_request(route, status, elapsed, model)
    logs.event(
        log,
        "request",
        request_id=request_id,
        method=method,
        path=path,
        status=status,
        ms=round(elapsed * 1000, 1),
        model=model.member if model else "",  # the model version chosen for it, as name:version
    )


def client_gone(environ: dict, quiet_s: float = 0.0) -> bool:
    """Whether the client has closed its connection, so that nobody would read this request's answer; with
    quiet_s, only if nothing has come from it for that long either.

    A closed connection reads as its end, once what came before is read (a request of its own sent behind
    this one is data, not an end). gunicorn gives the app its socket; under a server that does not, nothing
    is known and the answer is False. A client that closes only its sending side and still waits
    (shutdown(SHUT_WR)) reads the same; it is told so (serving.dispatch), as nginx tells it with its 499."""
    connection = environ.get("gunicorn.socket")
    if connection is None:
        return False
    try:
        with sockets.plain(connection) as probe:  # waiting: None while open and nothing more sent yet
            return sockets.waiting(probe) == b"" and not (quiet_s and sockets.received_within(probe, quiet_s))
    except (OSError, ValueError):  # reset by the client, or closed by the server already
        return True


def closed_error() -> ApiError:
    """The answer to a request whose client is gone (client_gone): 499, as nginx logs it, which the request log
    and metrics count; a client that only half-closed reads why."""
    return ApiError(499, "client_closed", "the connection was closed before the answer; nothing was computed")


def refused_error(refusal: Refused) -> ApiError:
    """The answer to a request admission refused: 503 with Retry-After (whole seconds, at least 1)."""
    return ApiError(503, refusal.reason, refusal.message, {"Retry-After": refusal.retry_after_header})
