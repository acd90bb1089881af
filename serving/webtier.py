"""What every route of the web tier shares: its parts, and which routes are open without an API key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from flask import current_app

from serving.catalog import Catalog
from serving.clock import RedisClock
from serving.inference import InferenceClient
from settings import Settings

View = TypeVar("View", bound=Callable)


@dataclass
class WebTier:
    settings: Settings
    r: redis.Redis  # for quick commands
    clock: RedisClock
    catalog: Catalog
    inference: InferenceClient


def tier() -> WebTier:
    """The parts of the app handling the current request (create_app puts them there)."""
    return current_app.extensions["serving"]


def public(view: View) -> View:
    """Mark a route as open without an API key; every other route needs one when API_KEYS is set."""
    view.public = True
    return view
