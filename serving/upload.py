"""Read the image file and options out of a /predict request, or say in a 4xx what is wrong."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from serving.errors import ApiError

_HOW = (
    "send the image as multipart form field 'image' (curl -F image=@photo.jpg ...) "
    'or as JSON {"image": "<base64 of the image file>"}'
)
# More digits than any class count or version; int() on thousands of digits raises (Python's DoS limit).
_MAX_DIGITS = 9
# What a request may set besides the image, each as a JSON key, a form field or in the query string.
OPTIONS = ("top_k", "model", "version", "timeout_ms")
# timeout_ms may come as this header too, for clients that set a deadline on every call the same way.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"


@dataclass(frozen=True)
class Upload:
    image: bytes
    options: dict[str, object]  # the OPTIONS the request gave, as given (JSON values or strings)


def read_image(request: Request) -> Upload:
    """The uploaded file's bytes and the options given with it."""
    if request.is_json:
        return _from_json(request)
    upload = request.files.get("image")
    if upload is None:
        raise ApiError(400, "missing_image", f"{_HOW}; {_what_came(request)}")
    data = upload.read()
    if not data:  # also what a browser form sends when no file was chosen
        raise ApiError(400, "missing_image", f"the file in field 'image' is empty; {_HOW}")
    return Upload(data, _options(request.form, request.args))


def _options(*sources: object) -> dict[str, object]:
    """Each option from the first source that has it (the body before the query string)."""
    found: dict[str, object] = {}
    for source in reversed(sources):
        found.update({name: source[name] for name in OPTIONS if name in source and source[name] is not None})
    return found


def _what_came(request: Request) -> str:
    """What the request held instead, so the client can see its mistake."""
    if "image" in request.form:
        return "'image' came as a text field, not a file: with curl, put @ before the path"
    fields = sorted({*request.files, *request.form})
    if fields:
        return f"fields received: {fields}"
    return f"received a {request.mimetype or 'untyped'} body with no form fields"


def read_body(request: Request) -> bytes:
    """The whole body, read and cached (so a cut-off one is caught before parsing), or 413 when over the limit."""
    data = request.get_data()
    _refuse_cut_off_body(request)
    return data


def _from_json(request: Request) -> Upload:
    read_body(request)
    try:
        body = request.get_json(silent=True)  # None for invalid JSON or UTF-8
    except RecursionError:  # deeply nested arrays: not a ValueError, so silent=True lets it out
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", 'the JSON body must be an object: {"image": "<base64 of the image file>"}')
    encoded = body.get("image")
    if encoded in (None, ""):
        raise ApiError(
            400, "missing_image", 'the JSON body has no "image": send {"image": "<base64 of the image file>"}'
        )
    if not isinstance(encoded, str):
        raise ApiError(400, "bad_request", '"image" must be a string holding the base64 of the image file')
    return Upload(b64decode(encoded), _options(body, request.args))


def _refuse_cut_off_body(request: Request) -> None:
    """413 for a chunked body (no Content-Length) over the limit.

    Werkzeug stops reading such a body at MAX_CONTENT_LENGTH without an error, so get_data()
    returns its first part; multipart parsing notices, plain reads do not. One byte more
    from the server's own stream tells a body cut off from one exactly at the limit.
    """
    stream = request.stream
    if request.content_length is None and isinstance(stream, LimitedStream) and stream.is_exhausted:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()


def b64decode(encoded: str) -> bytes:
    """An image file sent as base64 (or a data: URL), or a 400 saying why it is none."""
    if encoded.startswith("data:") and "," in encoded:  # a data URL straight from a browser
        encoded = encoded.split(",", 1)[1]
    compact = "".join(encoded.split())  # line breaks, as base64 tools write them
    compact += "=" * (-len(compact) % 4)  # padding, which some encoders leave out
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ApiError(400, "invalid_image", '"image" is not valid base64') from None
    if not data:
        raise ApiError(400, "missing_image", '"image" holds no bytes: send the base64 of the image file')
    return data


def parse_top_k(raw: object, default: int, num_classes: int) -> int:
    """top_k as given (query, form or JSON), or the default, within 1..num_classes."""
    if raw is None or raw == "":
        return min(default, num_classes)
    return whole_number(raw, "top_k", 1, num_classes)


def parse_version(raw: object) -> int | None:
    """The model version asked for; None for "the highest with a live model server"."""
    if raw is None or raw == "":
        return None
    return whole_number(raw, "version", 1, 10**_MAX_DIGITS - 1)


def parse_timeout(raw_option: object, raw_header: str | None, cap_s: float) -> float:
    """The request's timeout in seconds: the shortest of timeout_ms, the header and cap_s (REQUEST_TIMEOUT_S,
    which a request may shorten, never lengthen)."""
    given = [(raw_option, "timeout_ms"), (raw_header, TIMEOUT_HEADER)]
    asked = [whole_number(raw, name, 1, 10**_MAX_DIGITS - 1) / 1000 for raw, name in given if raw not in (None, "")]
    return min([cap_s, *asked])


def parse_model(raw: object) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_request", f"model must be a model's name, not {raw!r:.40}")
    return raw.strip()


def whole_number(raw: object, name: str, low: int, high: int) -> int:
    """A JSON integer or a string of ASCII digits from low to high, or a 400 naming the option."""
    wrong = ApiError(400, "bad_request", f"{name} must be a whole number from {low} to {high}, not {raw!r:.40}")
    if isinstance(raw, int) and not isinstance(raw, bool):  # JSON true is an int to Python
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():  # not "²" or "٣"
        if len(raw.strip()) > _MAX_DIGITS:
            raise wrong
        value = int(raw)
    else:
        raise wrong
    if not low <= value <= high:
        raise wrong
    return value
