"""The human-facing and descriptive routes: the try-it page and the OpenAPI document."""

from flask import Blueprint

pages = Blueprint("pages", __name__)
