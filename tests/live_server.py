"""A web tier app served over real HTTP from a thread of the test process, for clients that need a socket
(tritonclient, a browser) where the test is not about processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask
from werkzeug.serving import make_server


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Serve `app` on a free local port, one thread per request, for the block; its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # Polled every 50 ms, not the default 500: shutting down at the end of a test is that much faster.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="live server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
