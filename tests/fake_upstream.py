"""Tiny upstreams for stress_test.py: `python tests/fake_upstream.py [--port N] [--bare]`.

Listens on 127.0.0.1 (a free port unless --port is given) with HTTP/1.1 keep-alive and
prints `PORT <n>` once it accepts connections. It takes as many connections at once as its
open-files limit allows (raised to the hard limit).

The default is a Flask app that checks what it gets, for the tests:

* POST /predict: 400 without a multipart file field `image`; 503 when the uploaded bytes
  contain --fail-marker, with the contract's error body whose code is the lower-case letters
  and underscores right after the marker (`FAIL503unavailable`), `overloaded` if none;
  200 `{"success": true}` otherwise.
* POST /hang: answers only after a minute, to exercise client timeouts.
* GET /received: `{sha256 of each uploaded image: {"count": times received,
  "connections": how many client connections (ports) it came over}}`.

`--bare` is the cheapest HTTP server this process can be instead: it answers every
request with 200 `{"success": true}` without looking at it, so that a benchmark of
stress_test.py measures the load generator rather than the server.
"""

# gevent must patch the standard library before anything else imports it.
# ruff: noqa: E402
from gevent import monkey

monkey.patch_all()

import argparse
import contextlib
import functools
import hashlib
import re
import resource
import socket
from collections import defaultdict

import gevent
from flask import Flask, request
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

app = Flask(__name__)
app.config["FAIL_MARKER"] = b"FAIL503"
received: defaultdict[str, list[str]] = defaultdict(list)  # image digest -> client port of each upload


@app.post("/predict")
def predict() -> tuple[dict, int]:
    upload = request.files.get("image")
    if upload is None:
        return {"success": False, "error": "no file field 'image'"}, 400
    data = upload.read()
    received[hashlib.sha256(data).hexdigest()].append(request.environ["REMOTE_PORT"])
    if failed := re.search(re.escape(app.config["FAIL_MARKER"]) + rb"([a-z_]*)", data):
        code = failed.group(1).decode() or "overloaded"
        return {"success": False, "error": {"code": code, "message": "asked to fail"}}, 503
    return {"success": True}, 200


@app.post("/hang")
def hang() -> tuple[dict, int]:
    gevent.sleep(60)
    return {"success": True}, 200


@app.get("/received")
def uploads() -> dict:
    return {digest: {"count": len(ports), "connections": len(set(ports))} for digest, ports in received.items()}


class NoDelayWSGIServer(WSGIServer):
    """pywsgi sends a response in several writes; with Nagle's algorithm on, each after the
    first waits for the client's delayed ACK: 40 ms an answer. gunicorn turns it off too."""

    def handle(self, sock: socket.socket, address: object) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
BARE_RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"success": true}'


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def bare_connection(sock: socket.socket, _address: object, idle_close: float | None = None) -> None:
    """Serve a connection until the client closes it or, with `idle_close`, stays quiet that
    long: servers drop idle keep-alive connections (gunicorn after its --keep-alive seconds).
    """
    sock.settimeout(idle_close)
    with contextlib.suppress(TimeoutError):
        serve_requests(sock)


def serve_requests(sock: socket.socket) -> None:
    """Answer every request on the connection; request bodies need a Content-Length."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            if not (data := sock.recv(65536)):
                return
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = content_length(head)
        while len(buffer) < length:
            if not (data := sock.recv(65536)):
                return
            buffer += data
        buffer = buffer[length:]
        sock.sendall(BARE_RESPONSE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    parser.add_argument("--fail-marker", default="FAIL503", help="uploads containing it get a 503")
    parser.add_argument("--bare", action="store_true", help="answer 200 to everything, as fast as possible")
    parser.add_argument("--idle-close", type=float, metavar="S", help="--bare: close connections idle for S seconds")
    args = parser.parse_args()
    app.config["FAIL_MARKER"] = args.fail_marker.encode()
    address = ("127.0.0.1", args.port)
    # thousands of clients connect at once: a socket each, and room for them in the accept queue
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.bare:
        handle = functools.partial(bare_connection, idle_close=args.idle_close)
        server = StreamServer(address, handle, backlog=BACKLOG)
    else:
        server = NoDelayWSGIServer(address, app, log=None, backlog=BACKLOG)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
