"""`make run`: Redis (if none answers at REDIS_URL), one model server and the web server, in the foreground.

Ctrl-C (or SIGTERM, or a closed terminal) stops everything this started, in order: the web tier, the
model server, Redis. If one of them dies, the rest are stopped too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from scripts import processes  # noqa: E402  (needs the repo on the path)
from settings import Settings  # noqa: E402

# The hosts of a REDIS_URL that name this machine, and the address a Redis started for it binds.
# localhost binds IPv4, as before: redis-py tries each address localhost resolves to.
LOCAL_HOSTS = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1"}


def shown(url: str) -> str:
    """The URL with its password hidden: these messages end up in terminals and CI logs."""
    parts = urlparse(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}").geturl()


def check_port_free(port: int) -> None:
    """Exits if something listens on PORT already. gunicorn would retry its bind for 5 s and exit, while a
    server already there (another make run, say) answered /ready, and this one said "serving" meanwhile."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no owner
        try:
            probe.bind(("0.0.0.0", port))  # gunicorn_conf's bind
        except OSError as exc:
            sys.exit(f"PORT={port} is taken ({exc.strerror}): stop what listens there, or set PORT to a free port.")


def redis_for(url: str) -> list[subprocess.Popen]:
    """[] if a Redis answers at url, else [one started there]; exits if one answers but refuses us."""
    try:
        if processes.redis_answers(url):
            return []
    except processes.RedisRefused as exc:
        # Something holds the port: starting another Redis there would fail, and is not what was asked.
        missing = urlparse(url).password is None
        reason = "it wants a password and REDIS_URL has none" if missing else "the password in REDIS_URL is wrong"
        sys.exit(
            f"A Redis answers at REDIS_URL={shown(url)} but refuses it: {reason} (Redis said: {exc}). "
            "Put the password that Redis expects in REDIS_URL (redis://:password@host:port/0)."
        )
    return [local_redis(url)]


def local_redis(url: str) -> subprocess.Popen:
    parts = urlparse(url)
    bind = LOCAL_HOSTS.get(parts.hostname or "")
    if bind is None:
        sys.exit(f"No Redis answers at {shown(url)}: start it there, or unset REDIS_URL to run one here.")
    print(f"no Redis answers at {shown(url)}: starting redis-server", flush=True)
    # redis-py unquotes the URL's password (p%40ss is p@ss): the server must expect what clients send.
    password = unquote(parts.password) if parts.password else None
    try:
        return processes.start_redis(parts.port or 6379, password, bind, url=url, own_group=True)
    except FileNotFoundError as exc:
        sys.exit(f"No Redis answers at {shown(url)}, and {exc}")
    except processes.RedisRefused as exc:
        sys.exit(
            f"The redis-server started for REDIS_URL={shown(url)} refuses that URL ({exc}), and was stopped. "
            "make run sets only a password (user 'default'); for other users, start that Redis yourself."
        )
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"No Redis answers at REDIS_URL={shown(url)}, and the redis-server started for it failed ({exc}).")


def ready(url: str, member: str) -> bool:
    """Whether the web tier at url answers /ready with `member` ("name:version") among its ready models."""
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
            return member in json.load(response).get("models", [])
    except (OSError, ValueError):  # not up yet, or a 503 while the model server warms up
        return False


def watch(children: dict[str, subprocess.Popen], settings: Settings) -> str:
    """Say "serving" once the web tier lists the model as ready; the name of the first child to exit."""
    url, member = f"http://localhost:{settings.port}", f"{settings.model_name}:{settings.model_version}"
    print(f"starting {settings.model} on {url}", flush=True)
    announced = False
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                return name
        if not announced and ready(url, member):
            print(f"serving {settings.model} on {url}; Ctrl-C stops", flush=True)
            announced = True
        time.sleep(0.5)


def main() -> int:
    settings = Settings.from_env()
    children: dict[str, subprocess.Popen] = {}
    # Before anything starts: a SIGTERM, a closed terminal or Ctrl-C while the stack comes up still stops
    # what was started.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: sys.exit(0))
    check_port_free(settings.port)
    try:
        children.update(("redis-server", process) for process in redis_for(settings.redis_url))
        # Each child in a process group of its own: a terminal's Ctrl-C signals its whole foreground group at
        # once, and Redis then quit under the model server's last answers while gunicorn's workers died
        # mid-request with a traceback. Only this script hears it, and stops them in order below.
        children["the model server"] = processes.start_python("model_server.py", {}, own_group=True)
        children["the web server"] = processes.start_python("web_server.py", {}, own_group=True)
        dead = watch(children, settings)
        print(f"{dead} exited with status {children[dead].returncode}: stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # The web tier first (it drains through the model server), then the model server, Redis last. Another
        # Ctrl-C (or signal) meanwhile kills what still runs, rather than leave it behind with a traceback.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: kill_all(children.values()))
        for child in reversed(children.values()):
            processes.stop(child)


def kill_all(children: Iterable[subprocess.Popen]) -> None:
    """SIGKILL to each child's process group (its own): gunicorn's workers die with their arbiter."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):  # that group is gone already
            os.killpg(child.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
