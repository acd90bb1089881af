"""What both HTTP APIs (POST /predict and the Open Inference Protocol) share: which model version a request
goes to, and the model tier's results for its images, or the ApiError that says why not.

Each API renders an ApiError in its own shape (serving.errors), so the rules live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import redis
from flask import g, request

from serving import images, wire
from serving.catalog import NoModel, NoModelNamed, UnknownModel
from serving.errors import ApiError
from serving.inference import NotServed, Refused, TimedOut
from serving.registry import ModelState
from serving.upload import parse_model, parse_version
from serving.webtier import client_gone, closed_error, refused_error, tier

T = TypeVar("T")

# What a model server's failure code means to a client: HTTP status and the contract's code.
_FAILURES = {
    "late": (503, "overloaded"),  # it could not be computed before its deadline
    "model_changed": (503, "model_changed"),
    "unavailable": (503, "unavailable"),  # no model server of its version is alive any more
    "malformed": (500, "internal"),
    "model_error": (500, "model_error"),
}


def resolve(raw_model: object, raw_version: object) -> ModelState:
    """The model version a request goes to, with its info; a 4xx or 503 saying why there is none."""
    model = find(raw_model, raw_version)
    g.model = model.keys  # the request's metrics are labelled with it
    return model


def find(raw_model: object, raw_version: object) -> ModelState:
    """resolve, for a request that will not go to the version found: its metrics are not labelled with it."""
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


def routed(raw_model: object, raw_version: object, serve: Callable[[ModelState, bool], T]) -> T:
    """serve(the model version the request goes to, whether another version could answer it instead): the
    request's answer.

    A request naming no version goes to the highest with a live server. A stopping model server leaves the
    registry at once, but a web worker reads it only every REFRESH_S: in between, such a request would wait
    on the queue of a version that no server takes from any more, while a lower one is live. So it is not
    queued there, and is served again where it goes now; so is one whose version's servers all die while
    it waits (InferenceClient.infer)."""
    model = resolve(raw_model, raw_version)
    if parse_version(raw_version) is not None or not _other_live_version(model):
        return serve(model, False)  # it waits for its version's servers, e.g. while the only one restarts
    try:
        return serve(model, True)
    except NotServed:
        tier().catalog.forget()
        return serve(resolve(raw_model, raw_version), False)


def _live(model: ModelState) -> bool:
    """Whether the model version has a live model server, as the catalog read it last."""
    return any(state.keys == model.keys and state.live_servers for state in tier().catalog.states())


def _other_live_version(model: ModelState) -> bool:
    """Whether the catalog knows a version of the same model, other than this one, with a live server."""
    others = [state for state in tier().catalog.states() if state.keys.name == model.keys.name]
    return any(state.ready and state.keys != model.keys for state in others)


def pixels_of(image_file: bytes, info: wire.ModelInfo) -> np.ndarray:
    """An uploaded image file as the model's input pixels, or a 400 saying why it cannot be."""
    try:
        return images.decode(image_file, info.height, info.width, info.channels, info.bgr)
    except images.InvalidImage as exc:
        raise ApiError(400, "invalid_image", f"{exc}; send a JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF file") from None


@contextmanager
def refusals_as_http(model: ModelState, timeout_s: float) -> Iterator[None]:
    """Refused as 503 with Retry-After (whole seconds, at least 1), TimedOut as 504."""
    try:
        yield
    except Refused as exc:
        raise refused_error(exc) from None
    except TimedOut as exc:
        raise ApiError(504, "timeout", exc.message or _no_answer(model, timeout_s)) from None


def _no_answer(model: ModelState, timeout_s: float) -> str:
    """Why the model tier did not answer in time: busy, unless the catalog shows no server of the version."""
    try:
        busy = _live(model)
    except redis.RedisError:
        busy = True
    if busy:
        return f"no answer within {timeout_s:g} s; the server is busy, try again later"
    return f"no answer within {timeout_s:g} s: no model server of {model.keys.named} is serving now; try again later"


def admit_early(model: ModelState, count: int, deadline: float, timeout_s: float) -> None:
    """Refuse at once, before any image is decoded, what this worker already knows cannot be served in time,
    and what nobody waits for any more.

    Under overload a web worker holds requests longer than some clients wait. Decoding and computing theirs
    took the cores from the clients still waiting (in `make bench-overload` at 655d5d6, 95,900 of the 440,000
    requests sent to digits at 3x, 5x and 10x its capacity), and went on for seconds after the load stopped."""
    if client_gone(request.environ):  # serving.shedding answered those it read late, before Flask
        raise closed_error()
    with refusals_as_http(model, timeout_s):
        tier().inference.refuse_early(model, count, deadline)


def infer(
    model: ModelState,
    pixels: list[np.ndarray],
    top_k: int | None,
    deadline: float,
    timeout_s: float,
    movable: bool = False,
) -> list[wire.Result]:
    """The model tier's results for these images, or the ApiError that says why not; for a `movable` request,
    NotServed (for routed) when its version has no model server to take or compute its images."""
    t = tier()
    still_served = (lambda: _live(model)) if movable else None
    with refusals_as_http(model, timeout_s):
        results = t.inference.infer(g.request_id, model, pixels, top_k, deadline, still_served)
    for result in results:
        if result.error_code == "model_changed":
            # The model was replaced under its name: read what its servers publish now, so the
            # retry is prepared for the new input shape instead of failing the same way.
            t.catalog.forget()
        if result.error_code:
            status, code = _FAILURES.get(result.error_code, (500, "model_error"))
            headers = {"Retry-After": "1"} if status == 503 else {}
            raise ApiError(status, code, f"{model.keys.name}: {result.error}", headers)
    return results
