"""The web tier: accept an image, queue it for the model servers, answer with their predictions.

`python web_server.py` runs it in production (gunicorn with gevent workers, WEB_WORKERS of them,
on PORT); `web_server:app` is a plain WSGI app for any other server, built from the environment's
settings by serving.app.create_app. It never imports TensorFlow: what it knows of the models comes
from what the model servers publish in Redis.
"""

from __future__ import annotations

import os
import sys

from serving import logs
from serving.app import create_app
from settings import Settings

settings = Settings.from_env()
logs.setup("web", settings)
app = create_app(settings)


def main() -> None:
    """Replace this process with gunicorn, so its master gets our signals directly."""
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # gunicorn imports web_server from here
    argv = [sys.executable, "-m", "gunicorn", "--config", "python:serving.gunicorn_conf", "web_server:app"]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
