"""Read the image file and options out of a /predict request, or say in a 4xx what is wrong."""

from __future__ import annotations

import base64
import binascii

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

_HOW = (
    "send the image as multipart form field 'image' (curl -F image=@photo.jpg ...) "
    'or as JSON {"image": "<base64 of the image file>"}'
)
# More digits than any class count; int() on thousands of digits raises (Python's DoS limit).
_MAX_TOP_K_DIGITS = 9


class ApiError(Exception):
    """An error answered as the contract's JSON: {"success": false, "error": {code, message}}."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def read_image(request: Request) -> tuple[bytes, object]:
    """The uploaded file's bytes and the raw top_k (None when not given)."""
    if request.is_json:
        return _from_json(request)
    upload = request.files.get("image")
    if upload is None:
        raise ApiError(400, "missing_image", f"{_HOW}; {_what_came(request)}")
    data = upload.read()
    if not data:  # also what a browser form sends when no file was chosen
        raise ApiError(400, "missing_image", f"the file in field 'image' is empty; {_HOW}")
    return data, request.form.get("top_k", request.args.get("top_k"))


def _what_came(request: Request) -> str:
    """What the request held instead, so the client can see its mistake."""
    if "image" in request.form:
        return "'image' came as a text field, not a file: with curl, put @ before the path"
    fields = sorted({*request.files, *request.form})
    if fields:
        return f"fields received: {fields}"
    return f"received a {request.mimetype or 'untyped'} body with no form fields"


def _from_json(request: Request) -> tuple[bytes, object]:
    request.get_data()  # read and cache the body, so a cut-off one is caught before parsing
    _refuse_cut_off_body(request)
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
    return _b64decode(encoded), body.get("top_k", request.args.get("top_k"))


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


def _b64decode(encoded: str) -> bytes:
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
    wrong = ApiError(400, "bad_request", f"top_k must be a whole number from 1 to {num_classes}, not {raw!r:.40}")
    if isinstance(raw, int) and not isinstance(raw, bool):  # JSON true is an int to Python
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():  # not "²" or "٣"
        if len(raw.strip()) > _MAX_TOP_K_DIGITS:
            raise wrong
        value = int(raw)
    else:
        raise wrong
    if not 1 <= value <= num_classes:
        raise wrong
    return value
