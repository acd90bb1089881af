"""`make run`: Redis (if none answers at REDIS_URL), one model server and the web server, in the foreground.

Ctrl-C (or SIGTERM) stops everything this started; if one of them dies, the rest are stopped too.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time
from urllib.parse import urlparse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from scripts import processes  # noqa: E402  (needs the repo on the path)
from settings import Settings  # noqa: E402


def local_redis(url: str) -> subprocess.Popen:
    parts = urlparse(url)
    if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        sys.exit(f"No Redis answers at {url}: start it there, or unset REDIS_URL to run one here.")
    print(f"no Redis answers at {url}: starting redis-server", flush=True)
    try:
        return processes.start_redis(parts.port or 6379, parts.password)
    except FileNotFoundError as exc:
        sys.exit(f"No Redis answers at {url}, and {exc}")


def main() -> int:
    settings = Settings.from_env()
    children = [] if processes.redis_answers(settings.redis_url) else [local_redis(settings.redis_url)]
    children += [processes.start_python("model_server.py", {}), processes.start_python("web_server.py", {})]
    print(f"serving {settings.model} on http://localhost:{settings.port}; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1  # one of them died: stop the rest, and say so
    except KeyboardInterrupt:
        return 0
    finally:
        # The web tier first (it drains through the model server), then the model server, Redis last.
        for child in reversed(children):
            processes.stop(child)


if __name__ == "__main__":
    sys.exit(main())
