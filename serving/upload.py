"""Read the image file and options out of a /predict request, or say in a 4xx what is wrong."""

from __future__ import annotations

import base64
import binascii

from flask import Request


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
        got = sorted({*request.files, *request.form})
        raise ApiError(
            400,
            "missing_image",
            "send the image as multipart form field 'image' (curl -F image=@photo.jpg ...) "
            f'or as JSON {{"image": "<base64>"}}; fields received: {got or "none"}',
        )
    return upload.read(), request.form.get("top_k", request.args.get("top_k"))


def _from_json(request: Request) -> tuple[bytes, object]:
    body = request.get_json(silent=True)
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


def _b64decode(encoded: str) -> bytes:
    if encoded.startswith("data:") and "," in encoded:  # a data URL straight from a browser
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_image", '"image" is not valid base64') from None


def parse_top_k(raw: object, default: int, num_classes: int) -> int:
    """top_k as given (query, form or JSON), or the default, within 1..num_classes."""
    if raw is None or raw == "":
        return min(default, num_classes)
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        value = int(raw)
    else:
        raise ApiError(400, "bad_request", f"top_k must be a whole number from 1 to {num_classes}")
    if not 1 <= value <= num_classes:
        raise ApiError(400, "bad_request", f"top_k must be from 1 to {num_classes}, not {value}")
    return value
