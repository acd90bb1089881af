"""gunicorn's gevent worker, accepting every pending connection at once instead of one per turn of its loop,
closing a connection whose request is not done in time, answering a request it cannot parse in the
contract's JSON, and stopping when told to even while it boots.

With more than one worker, gunicorn has each accept one connection per turn of the event loop, so
that the workers share them out. A busy worker's loop turns only once all its ready requests have
had their go, so under load it accepted about 40 connections a second: clients queued for a minute
in the kernel's backlog, where neither the server's latency figures nor its admission could see
them, and connections past the backlog were dropped. Accepting all that are pending moves that
wait into the worker, which holds any number of waiting requests for a greenlet each.

gunicorn times out only the wait for a request's headers (keepalive). A client that stalled its body
(a Content-Length it never sends, a chunk that never comes) or never read its answers held its
greenlet and connection for good, and enough of them took every connection a worker may hold.
Every request now ends within its deadline plus STALL_SLACK_S; past that its connection is closed.

A request gunicorn itself refuses (a request line or headers over its limits, a malformed request)
never reaches the app, nor its metrics; gunicorn answers it through util.write_error, with an HTML page by
default.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from functools import partial

import gevent
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http.body import Body, ChunkedReader
from gunicorn.http.message import Request
from gunicorn.workers.ggevent import GeventWorker

from serving import sockets
from settings import Settings

# Connections one worker accepts in one turn of its loop, at about 10 µs each.
ACCEPT_AT_ONCE = 1024
# How long past REQUEST_TIMEOUT_S a request may still take before its connection is closed: its own 504
# comes at the deadline, and a hung Redis can cost two 5 s socket timeouts after it.
STALL_SLACK_S = 15.0
# A stopping worker closes a kept-alive connection once it has been quiet this long: no answer sent, no byte
# received. A client sends its next request at once or after a pause: closed at once, a connection whose client
# was just sending lost that request (a SIGHUP under the load of 32 clients: 9 of them).
QUIET_S = 0.5
# Bytes read at a time from a body of known length the app left unread (a chunked one: upload.CHUNKED_STEP).
DISCARD_STEP = 64 * 1024


class Worker(GeventWorker):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (gunicorn's signature)
        super().__init__(*args, **kwargs)
        self.request_limit_s = Settings.from_env().request_timeout_s + STALL_SLACK_S
        # connections open between requests (keep-alive), and since when, on time.monotonic()
        self.idle: dict[socket.socket, float] = {}

    def handle(self, listener, client, addr) -> None:  # noqa: ANN001
        self.idle[client] = time.monotonic()
        try:
            super().handle(listener, client, addr)
        finally:
            self.idle.pop(client, None)

    def handle_request(self, listener_name, req, sock, addr) -> None:  # noqa: ANN001
        """gunicorn's, within request_limit_s: past it, the connection is closed with nothing more sent. A
        connection kept open has what the app left of the body read first, and is closed if it does not come
        within keepalive. A client that asked before sending its body (Expect: 100-continue) is asked for it
        only when the app reads it (_AskedOnRead)."""
        self.idle.pop(sock, None)
        body = req.body
        if getattr(req, "_expected_100_continue", False):  # gunicorn's create() would say 100 Continue at once
            req._expected_100_continue = False
            req.body = _AskedOnRead(req, sock)
        try:
            with gevent.Timeout(self.request_limit_s) as limit:
                super().handle_request(listener_name, req, sock, addr)  # StopIteration: to be closed
            if not _discarded(body, self.cfg.keepalive):
                raise StopIteration
        except gevent.Timeout as exc:
            if exc is not limit:
                raise
            self.log.warning("closed a connection: %s %s not done in %g s", req.method, req.path, self.request_limit_s)
            raise StopIteration from None  # gunicorn's handle() then closes the connection
        finally:
            req.body = body  # gunicorn's parser drains it before the connection's next request
            self.idle[sock] = time.monotonic()  # handle() forgets it once the connection closes

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001
        """gunicorn's, and the connections that wait for a next request are closed: a stopping worker waits for
        every connection it holds, and one idle between requests (a load balancer's, kept alive) kept it 30 s
        (keepalive) after its last request was answered. Requests in flight still finish, and so do those that
        come on a connection before it has been quiet for QUIET_S: it closes after theirs (the worker is not
        alive).

        Closed from a greenlet of their own, not in the handler: the signal can come while a greenlet reads a
        request, idle until it is parsed; it then runs on until it blocks, no longer idle."""
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self) -> None:
        """Each kept-alive connection once quiet for QUIET_S, until the worker exits."""
        while True:
            quiet_since = time.monotonic() - QUIET_S
            for client, since in list(self.idle.items()):
                if since <= quiet_since:
                    _shut_if_quiet(client)
            gevent.sleep(QUIET_S / 5)

    def init_process(self) -> None:
        """gunicorn's, but a stop while it boots ends it. Until its own handlers (Worker.init_signals, after
        gevent's patching), a new worker keeps the arbiter's, which only queue a signal for the arbiter's loop:
        a SIGTERM then was lost, and the arbiter waited out graceful_timeout (REQUEST_TIMEOUT_S + 5 s) for it."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)  # it holds no request yet: dying of the signal loses nothing
        super().init_process()

    def server_class(self, listener, spawn, **kwargs) -> StreamServer:  # noqa: ANN001, ANN003
        """gunicorn's own server (GeventWorker.run calls this when set), but with ACCEPT_AT_ONCE."""
        ssl = {"ssl_context": kwargs["ssl_context"]} if "ssl_context" in kwargs else {}
        server = StreamServer(listener, handle=partial(self.handle, listener), spawn=spawn, **ssl)
        server.max_accept = ACCEPT_AT_ONCE
        return server


class _AskedOnRead:
    """A request body whose client asked before sending it (Expect: 100-continue, as curl does for a body over
    1 MB): the 100 Continue goes out when the app first reads it, which RFC 9110 lets a server choose.

    gunicorn sent it as soon as the headers were parsed, so a client sent all of an upload the app then refused
    unread: over MAX_UPLOAD_MB (413), or when the model was overloaded (503), where the refusals' CPU is what the
    web tier runs short of. Never asked, the client may not send the body at all: the answer says
    "Connection: close" and the connection ends with it, or its next request would be read as that body."""

    def __init__(self, req: Request, sock: socket.socket) -> None:
        self._req, self._sock, self._body = req, sock, req.body
        self._closing = req.must_close
        self._asked = False
        req.must_close = True  # until the client is asked for its body

    def _ask(self) -> None:
        if not self._asked:
            self._asked = True
            self._req.must_close = self._closing
            self._sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read(self, size: int | None = None) -> bytes:
        self._ask()
        return self._body.read(size)

    def readline(self, size: int | None = None) -> bytes:
        self._ask()
        return self._body.readline(size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        self._ask()
        return self._body.readlines(size)

    def __iter__(self) -> Iterator[bytes]:
        self._ask()
        return iter(self._body)


def _shut_if_quiet(client: socket.socket) -> None:
    """The kernel's shutdown of a connection on which nothing has come for QUIET_S, not gevent's: that one fails
    the read waiting on it with EBADF (a traceback in the log), where this one ends it as if the client had
    closed. A request that came as the stop did is left to be answered: shut, it was read and then lost, and
    logged as its client's 499. So is the head of one gunicorn has begun to read, which waits in no buffer of
    the kernel's any more: the kernel says when data last came."""
    with contextlib.suppress(OSError, ValueError), sockets.plain(client) as plain:  # suppressed: closed meanwhile
        if not sockets.received_within(plain, QUIET_S):
            plain.shutdown(socket.SHUT_RDWR)  # the file stays gunicorn's to close


def _discarded(body: Body, within_s: float) -> bool:
    """Whether the rest of a body the app left unread (answered 413, refused, or sent to a route that takes none)
    was read and dropped within within_s, so that its connection can carry a next request.

    gunicorn would drain it itself before reading the next request, but without ever yielding while data kept
    coming: a client that declared a 1 TB body (or an endless chunked one) and sent at full speed after its answer
    held the worker's every other connection until gunicorn killed the worker, and its requests with it."""
    from serving.upload import CHUNKED_STEP, in_turns  # imported here, as in json_error

    step = CHUNKED_STEP if isinstance(body.reader, ChunkedReader) else DISCARD_STEP
    with contextlib.suppress(Exception), gevent.Timeout(within_s, False):  # malformed chunks, a client gone
        for _ in in_turns(body.read, step):  # the worker's other connections get their turns
            pass
        return True
    return False


def json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's util.write_error, answering in the contract's JSON: clients parse every error alike. Counted
    in serving_requests_total as route "gunicorn": the app, which counts the rest, never sees these."""
    # Imported here: gunicorn loads this module before gevent patches ssl, which serving.errors imports (redis).
    from serving import metrics
    from serving.errors import code_for, contract_shape

    if status_int == 501:  # an unknown Transfer-Encoding (RFC 9112 suggests 501): the client's mistake, so a 4xx
        status_int, reason = 400, "Bad Request"
    metrics.observe_request("gunicorn", status_int, 0.0)
    body = json.dumps(contract_shape(code_for(status_int, reason), mesg)).encode()
    head = f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)


util.write_error = json_error  # gunicorn's workers call it through the module, so this is the one they use
