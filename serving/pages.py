"""The human-facing and descriptive routes: the try-it page and the OpenAPI document.

Both are static files under serving/static/, so they need no build step and no template engine,
and the web tier serves them without touching Redis: they work even while the queue is down.
"""

from __future__ import annotations

import pathlib

from flask import Blueprint, Response, send_from_directory

from serving.webtier import public

STATIC = pathlib.Path(__file__).resolve().parent / "static"
OPENAPI_PATH = STATIC / "openapi.json"

pages = Blueprint("pages", __name__)


@pages.get("/")
@public
def index() -> Response:
    """The page where a person drops an image and sees the top-k labels."""
    response = send_from_directory(STATIC, "index.html", mimetype="text/html")
    # Revalidate each time, so a deploy never leaves users on a stale page talking to a newer API.
    response.cache_control.no_cache = True
    return response


@pages.get("/openapi.json")
@public
def openapi() -> Response:
    """The OpenAPI 3 description of the HTTP API (the contract's "HTTP API" section, machine-readable)."""
    response = send_from_directory(STATIC, OPENAPI_PATH.name, mimetype="application/json")
    response.cache_control.no_cache = True
    # Tools such as Swagger UI or an editor on another origin may fetch the document directly.
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response
