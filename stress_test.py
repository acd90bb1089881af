"""Load generator for an image-upload HTTP endpoint such as a model server's /predict.

Usage::

    python stress_test.py --url http://localhost:5000/predict --image dog.jpg \\
        --requests 1000 --concurrency 16
    python stress_test.py --url http://localhost:5000/predict --image a.jpg --image b.png \\
        --duration 30 --rate 200 --json result.json --plot result.png

Every request POSTs one image as multipart/form-data under the field name ``image``,
exactly what ``curl -X POST -F image=@dog.jpg URL`` sends; several images are sent
in turn (round robin).

Two load models:

* closed loop (``--concurrency C``, the default with C=1): C clients, each on its own
  keep-alive connection, send their next request as soon as the last one is answered.
* open loop (``--rate R``): requests start on a fixed schedule, R a second, whether or
  not earlier ones were answered. Latency is measured from the *scheduled* send time,
  so queueing (in the server, or here waiting for one of ``--connections``) is counted
  instead of being hidden by coordinated omission.

A progress line goes to stderr, a summary table to stdout; ``--json`` and ``--plot``
save the results. Exit status: 0 when every request got HTTP 200, 1 otherwise, 2 for
bad arguments or unreadable images.

The client is built to stay out of the way: gevent greenlets instead of threads, each
request serialised once up front, and geventhttpclient's C (llhttp) response parser on
plain keep-alive sockets. Against a trivial endpoint one core generates about 15 000
requests a second closed loop and keeps an open-loop schedule of 8 000 a second. The
summary shows the client's CPU use, and a warning says when it may have set the pace.
"""

# gevent must patch the standard library before anything else imports it, so the
# imports below cannot all come first.
# ruff: noqa: E402
from gevent import monkey

monkey.patch_all()

import argparse
import itertools
import json
import math
import mimetypes
import os
import resource
import select
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

import gevent
import gevent.pool
import gevent.queue
import numpy as np
from geventhttpclient.response import HTTPSocketResponse

blocking_poll = monkey.get_original("select", "poll")

# A kept-alive socket idle for longer than this is checked before reuse: servers
# drop idle connections (gunicorn after 2 s), and a POST sent into a closed
# connection would fail although the server is healthy.
IDLE_CHECK_S = 0.5
RECV_SIZE = 64 * 1024
# Beyond these the client may have limited the load (see bottleneck_warning).
CPU_WARNING_PERCENT = 90.0
CPU_WARNING_MIN_S = 1.0  # a shorter run's CPU share is its own start and end, not a limit on the load
LAG_WARNING_MS = 10.0
PERCENTILES = (50, 90, 95, 99)
OPEN_LOOP_CONNECTIONS = 256
# Open files besides the client sockets: the interpreter's, numpy's, the outputs.
SPARE_FILES = 64

Address = tuple[int, Any]  # (socket family, sockaddr) as returned by getaddrinfo

EPILOG = """\
load models:
  closed loop (--concurrency C): C clients, each sending its next request when the
    previous one is answered; throughput adapts to the server.
  open loop (--rate R): requests are due R times a second on a fixed schedule, whether
    or not answers came, and go out over at most --connections connections. Latency
    (and --timeout) run from the scheduled send time, so queueing delay, in the server
    or waiting here for a free connection, shows instead of being hidden (coordinated
    omission).

results:
  latency statistics are over every request that got an HTTP answer, whatever its
  status; requests that got no answer (refused, reset, timed out, host not found)
  count as errors under their exception name ("TimeoutError" for every kind of timeout
  while waiting for an answer, "ConnectTimeout" when the server did not take the
  connection in time, "gaierror" when the host did not resolve), non-200 answers
  under their status code; "error_codes" counts the same errors by
  the error code in the JSON body as well ("503 overloaded", "503 unavailable").
  Throughput is finished requests (ok or not) per second of run time. A warning
  on stderr says when this client may have been the bottleneck (it used
  most of a core, or sent late against its schedule).
  Exit status: 0 if every request got 200, 1 otherwise (also when Ctrl-C cut the
  run short, or --json or --plot could not be written), 2 on usage errors (an
  output's directory missing, a --plot name that is no image format).
"""


# ---------------------------------------------------------------------------
# command line


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) that must be greater than zero, and finite: nan passes every
    comparison, and an infinite rate or duration never ends a run."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number: {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stress_test.py",
        description="POST images to an HTTP endpoint under load and report latency.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url", required=True, help="full endpoint URL, e.g. http://localhost:5000/predict (http only)"
    )
    parser.add_argument(
        "--image",
        required=True,
        action="append",
        metavar="PATH",
        help="image file to upload as form field 'image'; repeat to send several in turn",
    )
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--requests", type=positive(int), metavar="N", help="send N requests in all")
    amount.add_argument(
        "--duration",
        type=positive(float),
        metavar="S",
        help="send requests for S seconds (then wait up to --timeout for the answers in flight)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive(int), metavar="C", help="closed loop with C clients (default: 1)")
    load.add_argument("--rate", type=positive(float), metavar="R", help="open loop at R requests a second")
    parser.add_argument(
        "--connections",
        type=positive(int),
        metavar="K",
        help=f"open loop only: at most K connections at once (default: {OPEN_LOOP_CONNECTIONS})",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        default=60.0,
        metavar="S",
        help="give up on a request S seconds after it was due (default: 60)",
    )
    parser.add_argument(
        "--warm-up",
        type=positive(float),
        metavar="S",
        help="with --duration: load for S seconds more first, and leave the requests sent then out of the results",
    )
    parser.add_argument("--json", metavar="FILE", help="write the summary as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw latency over time and a latency histogram to FILE.png")
    return parser


# ---------------------------------------------------------------------------
# requests, built once


@dataclass(frozen=True)
class Target:
    addresses: list[Address]
    payloads: list[bytes]  # one complete HTTP request per image
    unresolved: OSError | None = None  # why the host did not resolve; then there are no addresses


def multipart_body(filename: str, data: bytes) -> tuple[bytes, str]:
    """Return (body, content type) of a form with `data` as the file field 'image'."""
    boundary = uuid.uuid4().hex
    while boundary.encode() in data:  # the boundary must not occur in the payload
        boundary = uuid.uuid4().hex
    file_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    quoted_name = filename.replace('"', "%22")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{quoted_name}"\r\n'
        f"Content-Type: {file_type}\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def http_post(url: str, body: bytes, content_type: str) -> bytes:
    """Serialise a complete HTTP/1.1 POST request, ready to be written to a socket."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {parts.netloc}\r\n"
        "User-Agent: stress_test.py\r\n"
        "Accept: */*\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc.strerror}") from None


def resolve(url: str) -> list[Address]:
    """The host's addresses; ValueError for a malformed URL, OSError (socket.gaierror) when it does not resolve."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be an http:// URL with a host, not {url!r}")
    try:
        port = parts.port or 80
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except ValueError as exc:  # a bad port, or a host name that cannot be encoded: the URL is wrong
        raise ValueError(f"bad --url {parts.netloc}: {exc}") from None
    return [(family, address) for family, _, _, _, address in infos]


def build_target(url: str, images: list[str]) -> Target:
    """Resolve the host and serialise one request per image; ValueError on bad input."""
    try:
        addresses, unresolved = resolve(url), None
    except OSError as exc:
        # Not a usage error: the name may be right and DNS down. Like a refused connection, it fails
        # every request, and the run still reports that.
        addresses, unresolved = [], exc
    payloads = []
    for path in images:
        body, content_type = multipart_body(os.path.basename(path), read_image(path))
        payloads.append(http_post(url, body, content_type))
    return Target(addresses, payloads, unresolved)


# ---------------------------------------------------------------------------
# connections


def connect(addresses: list[Address], timeout: float) -> socket.socket:
    """Like socket.create_connection, but without resolving the host name again."""
    error: OSError | None = None
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:  # a gevent.Timeout must not leak the socket
            sock.close()
            raise
        # A large body spans several segments; without this the last one can wait
        # for a delayed ACK (Nagle), adding tens of milliseconds.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert error is not None
    raise error


def peer_closed(sock: socket.socket) -> bool:
    """True when an idle keep-alive socket was closed by the server (it turned readable).

    poll, unlike select.select, takes descriptors past 1023, as a run of thousands of
    connections has. The unpatched one: gevent's would switch greenlets, and a zero
    timeout never blocks anyway.
    """
    poller = blocking_poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def send_request(sock: socket.socket, request: bytes) -> None:
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may have answered early (413, say) and closed; the caller reads that answer


class ConnectTimeout(TimeoutError):
    """The connection was not established in time (the server did not accept it)."""


def error_code(body: bytes) -> str | None:
    """The machine code of an error answer, `{"error": {"code": ...}}`; None when the body has none."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):  # not JSON, or not the error shape
        return None
    return code if isinstance(code, str) else None


class Connection:
    """One keep-alive HTTP/1.1 connection, (re)opened when needed."""

    def __init__(self, addresses: list[Address], timeout: float, unresolved: OSError | None = None) -> None:
        self._addresses = addresses
        self._timeout = timeout
        self._unresolved = unresolved
        self._sock: socket.socket | None = None
        self._idle_since = 0.0

    def post(self, request: bytes) -> tuple[int, str | None]:
        """Send a serialised request; the response status and, for an error answer, its error code."""
        sock = self._socket()
        try:
            send_request(sock, request)
            response = HTTPSocketResponse(sock, block_size=RECV_SIZE, method="POST")
            body = response.read()  # the body must be drained before the connection is reused
        except BaseException:
            self.close()
            raise
        if response.should_close():
            self._sock = None  # the response has closed the socket already
        self._idle_since = time.perf_counter()
        status = response.status_code
        return status, None if status == 200 else error_code(body)  # only errors are parsed: 200s stay cheap

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is not None and time.perf_counter() - self._idle_since > IDLE_CHECK_S:
            if peer_closed(sock):
                self.close()
        if self._sock is None:
            if (error := self._unresolved) is not None:
                # a new one each time: re-raising one instance would lengthen its traceback on every request
                raise type(error)(*error.args)
            try:
                self._sock = connect(self._addresses, self._timeout)
            except TimeoutError as exc:  # a full accept backlog, not a slow answer: told apart in the results
                raise ConnectTimeout(str(exc)) from exc
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------
# recording and running


@dataclass
class Recorder:
    """Everything measured during a run; times are time.perf_counter() values or seconds."""

    # requests sent in the first `warm_up` seconds are not recorded: a run of thousands of clients
    # starts with all of them connecting at once, which is not the steady state it is meant to measure
    warm_up: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    start_cpu: float = field(default_factory=time.process_time)
    wall_offset: float = field(default_factory=lambda: time.time() - time.perf_counter())  # to the epoch
    # (send time since the warm-up ended, latency, outcome) of every finished request sent after it
    records: list[tuple[float, float, str]] = field(default_factory=list)
    # latencies of the requests that got an HTTP answer, whatever its status
    answered: list[float] = field(default_factory=list)
    # open loop: how late the schedule released each arrival; large when this client fell behind
    schedule_lags: list[float] = field(default_factory=list)
    # open loop: arrivals that found every one of --connections busy, and waited for one to be free
    waited_for_connection: int = 0
    ok: int = 0
    # every outcome but 200, finer than the outcome: "503 overloaded" (status and error code), the status
    # alone for an error answer without a code, or the exception name
    error_codes: Counter = field(default_factory=Counter)
    warm_up_error_codes: Counter = field(default_factory=Counter)  # the same for the warm-up's requests
    # when each request finished, warm-up ones too: the rate while sending counts every answer in its time
    finishes: list[float] = field(default_factory=list)
    sending_until: float | None = None  # when the last request was sent (or due)
    duration: float = 0.0  # after the warm-up, once finish() was called
    cpu_percent: float = 0.0  # of the whole run, warm-up included

    @property
    def measured_from(self) -> float:
        return self.start + self.warm_up

    def add(self, sent: float, outcome: str, code: str | None = None) -> None:
        """Record a request that was sent (or due) at `sent`, its outcome and, for an error answer, its code."""
        now = time.perf_counter()
        self.finishes.append(now)
        if sent < self.measured_from:
            if outcome != "200":  # not measured, but never hidden: a connect storm's failures show here
                self.warm_up_error_codes[f"{outcome} {code}" if code else outcome] += 1
            return
        latency = now - sent
        self.records.append((sent - self.measured_from, latency, outcome))
        if outcome.isdigit():  # an HTTP status, not an exception name
            self.answered.append(latency)
            self.ok += outcome == "200"
        if outcome != "200":
            self.error_codes[f"{outcome} {code}" if code else outcome] += 1

    def finish(self) -> None:
        now = time.perf_counter()
        self.duration = now - self.measured_from
        self.cpu_percent = 100.0 * (time.process_time() - self.start_cpu) / (now - self.start)

    def rate_while_sending(self) -> float | None:
        """Requests finished a second between the warm-up and the last send: the steady rate of a closed
        loop, unlike throughput over the whole run, which includes the drain at the end."""
        until = self.sending_until
        if until is None or until <= self.measured_from:
            return None
        finished = sum(1 for t in self.finishes if self.measured_from <= t <= until)
        return finished / (until - self.measured_from)

    def goodput(self) -> float | None:
        """200s a second from the warm-up's end to the last 200: how fast the server gave good answers while
        it gave them. Over the whole run, an open loop past the server's pace would add a tail of
        client-side timeouts, while the server idles; counted while sending only, a slow model would
        lose the answers it gives in the drain to what it admitted last."""
        last = max((sent + latency for sent, latency, outcome in self.records if outcome == "200"), default=0.0)
        return self.ok / last if last > 0 else None

    def window(self) -> dict[str, float]:
        """The measured part as Unix times: from the warm-up's end, to the last send and the last answer."""
        end = self.measured_from + self.duration
        times = {"from": self.measured_from, "sending_until": self.sending_until or end, "until": end}
        return {key: round(self.wall_offset + t, 3) for key, t in times.items()}


@dataclass
class Budget:
    """Says whether request number `index`, due `elapsed` s into the run, is still sent."""

    requests: int | None
    duration: float | None
    stopped: bool = False
    ended_at: float | None = None  # when it first said no: sending ended

    def allows(self, index: int, elapsed: float) -> bool:
        if self.stopped:
            allowed = False
        elif self.requests is not None:
            allowed = index < self.requests
        else:
            assert self.duration is not None
            allowed = elapsed < self.duration
        if not allowed and self.ended_at is None:
            self.ended_at = time.perf_counter()
        return allowed

    def stop(self) -> None:
        self.stopped = True


def error_name(exc: BaseException) -> str:
    """The exception's name, as the contract counts errors; every kind of timeout while waiting for an answer
    (socket's, gevent's) is one key, TimeoutError, and a connection never accepted is ConnectTimeout."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, ConnectTimeout):
        return TimeoutError.__name__
    return type(exc).__name__


Outcome = tuple[str, str | None]  # HTTP status or error name; the error code of an error answer


def exchange(post: Callable[[bytes], tuple[int, str | None]], request: bytes, timeout: float) -> Outcome:
    """Run one request; its HTTP status and error code, or the name of its error."""
    try:
        # bounds the whole exchange: socket timeouts alone restart on every byte
        with gevent.Timeout(timeout, TimeoutError):
            status, code = post(request)
            return str(status), code
    except Exception as exc:  # every failure is a result to count, not a crash
        return error_name(exc), None


def send_arrivals(arrivals: Iterable[tuple[int, float]], target: Target, timeout: float, rec: Recorder) -> None:
    """One client: for each arrival (request number, due time) send a request on one kept-alive connection."""
    conn = Connection(target.addresses, timeout, target.unresolved)
    for index, due in arrivals:
        request = target.payloads[index % len(target.payloads)]  # round robin over the images
        # The timeout runs from the due time: an arrival that waited for a free client has used up some of it,
        # and one that waited all of it is not sent any more, so that an overloaded run still ends.
        remaining = timeout - (time.perf_counter() - due)
        rec.add(due, *(exchange(conn.post, request, remaining) if remaining > 0 else ("TimeoutError", None)))
        # Take turns: an answer that is already there when asked for does not yield, so against a
        # fast server one client could otherwise go on and on while the others' answers wait.
        gevent.sleep(0)
    conn.close()


def run_closed_loop(target: Target, concurrency: int, budget: Budget, timeout: float, rec: Recorder) -> None:
    indices = itertools.count()  # shared by the clients

    def arrivals() -> Iterator[tuple[int, float]]:
        while budget.allows(index := next(indices), time.perf_counter() - rec.start):
            yield index, time.perf_counter()

    gevent.joinall([gevent.spawn(send_arrivals, arrivals(), target, timeout, rec) for _ in range(concurrency)])


class OpenLoop:
    """Serves scheduled arrivals with up to `size` clients, each on its own connection.

    Clients are only started when every running one is busy, so a light load uses few
    connections. Long-lived clients fed from a queue cost far less per request than a
    greenlet per request would.
    """

    def __init__(self, target: Target, size: int, timeout: float, rec: Recorder) -> None:
        self._target, self._size, self._timeout, self._rec = target, size, timeout, rec
        self._backlog: gevent.queue.Queue = gevent.queue.Queue()  # arrivals not yet taken by a client
        self._idle = 0  # clients waiting for an arrival, or started and about to
        self._clients = gevent.pool.Group()

    def arrive(self, index: int, due: float) -> None:
        self._backlog.put((index, due))
        if self._backlog.qsize() <= self._idle:
            return
        if len(self._clients) < self._size:
            self._idle += 1
            self._clients.spawn(send_arrivals, self._arrivals(), self._target, self._timeout, self._rec)
        else:
            self._rec.waited_for_connection += 1

    def _arrivals(self) -> Iterator[tuple[int, float]]:
        while (arrival := self._backlog.get()) is not None:
            self._idle -= 1
            yield arrival
            self._idle += 1

    def finish(self) -> None:
        """Wait for the arrivals so far to be answered, then stop the clients."""
        for _ in range(len(self._clients)):
            self._backlog.put(None)
        self._clients.join()


def run_open_loop(target: Target, rate: float, connections: int, budget: Budget, timeout: float, rec: Recorder) -> None:
    clients = OpenLoop(target, connections, timeout, rec)
    for index in itertools.count():
        offset = index / rate  # from the start, not from the last arrival, so that delays do not add up
        if not budget.allows(index, offset):
            break
        due = rec.start + offset
        if (delay := due - time.perf_counter()) > 0:
            gevent.sleep(delay)
        rec.schedule_lags.append(time.perf_counter() - due)
        clients.arrive(index, due)
    clients.finish()


# ---------------------------------------------------------------------------
# reporting


def percentiles_ms(latencies_s: list[float], points: tuple[int, ...]) -> list[float]:
    return list(np.percentile(np.asarray(latencies_s) * 1000.0, points))


class RunningPercentiles:
    """Approximate percentiles of a growing list of latencies, for the progress line.

    Exact percentiles cost a pass over every latency so far, which at a few hundred
    thousand stalls the event loop for tens of milliseconds on every refresh; this
    histogram only takes in the latencies added since the last update.
    """

    # bin edges from 10 us to 1000 s, each bin 1.9 % wider than the last
    EDGES = np.geomspace(1e-5, 1e3, 1000)

    def __init__(self) -> None:
        self._counts = np.zeros(len(self.EDGES) + 1, dtype=np.int64)
        self._seen = 0

    def update(self, latencies_s: list[float]) -> None:
        new = np.asarray(latencies_s[self._seen :])
        self._seen = len(latencies_s)
        self._counts += np.bincount(np.searchsorted(self.EDGES, new), minlength=len(self._counts))

    def ms(self, percentile: float) -> float:
        """The upper edge of the bin holding `percentile`, in milliseconds."""
        cumulative = np.cumsum(self._counts)
        index = int(np.searchsorted(cumulative, percentile / 100.0 * cumulative[-1]))
        return float(self.EDGES[min(index, len(self.EDGES) - 1)]) * 1000.0


def progress_line(rec: Recorder, total: int | None, rate: float, latency: RunningPercentiles) -> str:
    done = len(rec.records)
    count = f"{done}/{total}" if total else str(done)
    now = time.perf_counter()
    if now < rec.measured_from:
        return f"[{now - rec.start:7.1f}s] warming up | {rate:8.1f} req/s"
    line = f"[{now - rec.start:7.1f}s] {count} done | {rate:8.1f} req/s | {done - rec.ok} errors"
    if rec.answered:
        latency.update(rec.answered)
        line += f" | p50 {latency.ms(50):.1f} ms  p99 {latency.ms(99):.1f} ms"
    return line


@contextmanager
def progress(rec: Recorder, total: int | None, stream: TextIO) -> Iterator[None]:
    """Show progress on `stream` while the block runs.

    On a terminal the line is redrawn in place twice a second; otherwise one line is
    written every five seconds so that captured logs stay short.
    """
    tty = stream.isatty()
    interval = 0.5 if tty else 5.0
    latency = RunningPercentiles()

    def draw(rate: float) -> None:
        line = progress_line(rec, total, rate, latency)
        stream.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        stream.flush()

    def refresh() -> None:
        last_done, last_time = 0, time.perf_counter()
        while True:
            gevent.sleep(interval)
            done, now = len(rec.finishes), time.perf_counter()
            draw((done - last_done) / (now - last_time))
            last_done, last_time = done, now

    painter = gevent.spawn(refresh)
    try:
        yield
    finally:
        painter.kill()
        if tty:
            draw(len(rec.records) / max(time.perf_counter() - rec.start, 1e-9))
            stream.write("\n")


def latency_stats(latencies_s: list[float]) -> dict[str, float | None]:
    keys = ["min", "mean", *(f"p{p}" for p in PERCENTILES), "max"]
    if not latencies_s:
        return dict.fromkeys(keys)
    ms = np.asarray(latencies_s) * 1000.0
    values = [ms.min(), ms.mean(), *np.percentile(ms, PERCENTILES), ms.max()]
    return {key: round(float(value), 3) for key, value in zip(keys, values, strict=True)}


def summarize(rec: Recorder, settings: dict[str, Any]) -> dict[str, Any]:
    outcomes = Counter(outcome for _, _, outcome in rec.records)
    steady = rec.rate_while_sending()
    requests = len(rec.records)
    summary: dict[str, Any] = {
        "requests": requests,
        "ok": outcomes.get("200", 0),
        "errors": {key: n for key, n in outcomes.most_common() if key != "200"},
        # the same requests by error code too: a 503 "overloaded" (refused, retry) is not a 503 "unavailable"
        "error_codes": dict(rec.error_codes.most_common()),
        "warm_up_error_codes": dict(rec.warm_up_error_codes.most_common()),
        "duration_s": round(rec.duration, 3),
        "throughput_rps": round(requests / rec.duration, 2),
        # closed loop at high concurrency: the drain at the end (fewer and fewer clients left) lowers
        # throughput_rps, but not this
        "throughput_while_sending_rps": None if steady is None else round(steady, 2),
        "goodput_rps": None if (good := rec.goodput()) is None else round(good, 2),
        "window": rec.window(),  # Unix times, to find the server's own records of the same requests
        "latency_ms": latency_stats(rec.answered),
        # e.g. how fast refusals (503) come, beside the answers (200): the overload benchmark reads this
        "latency_ms_by_status": {
            status: latency_stats([latency for _, latency, outcome in rec.records if outcome == status])
            for status in sorted(outcomes)
            if status.isdigit()
        },
        "answered": len(rec.answered),
        "status_counts": {key: n for key, n in sorted(outcomes.items()) if key.isdigit()},
        # near 100 % of a core means this client, not the server, set the pace
        "client_cpu_percent": round(rec.cpu_percent, 1),
        "settings": settings,
    }
    if rec.schedule_lags:
        summary["waited_for_connection"] = rec.waited_for_connection
        p50, p99 = percentiles_ms(rec.schedule_lags, (50, 99))
        summary["schedule_lag_ms"] = {
            "p50": round(p50, 3),
            "p99": round(p99, 3),
            "max": round(max(rec.schedule_lags) * 1000.0, 3),
        }
    return summary


def bottleneck_warning(summary: dict[str, Any]) -> str | None:
    """Say so when this client rather than the server may have limited the load."""
    cpu = summary["client_cpu_percent"]
    lag = summary.get("schedule_lag_ms", {}).get("p99", 0.0)
    reasons = []
    if cpu >= CPU_WARNING_PERCENT and summary["duration_s"] >= CPU_WARNING_MIN_S:
        reasons.append(f"it used {cpu:.0f}% of a core")
    if lag >= LAG_WARNING_MS:
        reasons.append(f"it sent requests {lag:.0f} ms late against the schedule at p99")
    if not reasons:
        return None
    return f"warning: this client may have been the bottleneck ({'; '.join(reasons)}): the server may take more"


def connections_warning(summary: dict[str, Any]) -> str | None:
    """Say so when an open loop offered less than its rate: arrivals waited for one of its connections."""
    if not (waited := summary.get("waited_for_connection")):
        return None
    connections = summary["settings"]["connections"]
    return (
        f"warning: {waited} requests waited for a free connection (all {connections} busy), so fewer than "
        f"{summary['settings']['rate']:g} a second reached the server; their wait counts in their latency. "
        "More --connections offer the full rate."
    )


def format_summary(summary: dict[str, Any]) -> str:
    errors = summary["errors"]
    # only when the codes say more than the statuses do (which 503s were "overloaded")
    by_code = [("by error code", ""), *((f"  {key}", str(n)) for key, n in summary["error_codes"].items())]
    rows: list[tuple[str, str]] = [
        ("requests", str(summary["requests"])),
        ("ok (200)", str(summary["ok"])),
        ("errors", str(sum(errors.values()))),
        *((f"  {key}", str(n)) for key, n in errors.items()),
        *(by_code if summary["error_codes"] != errors else ()),
        ("duration", f"{summary['duration_s']:.2f} s"),
        ("throughput", f"{summary['throughput_rps']:.1f} req/s"),
        (f"latency (ms), {summary['answered']} answered", ""),
        *((f"  {key}", "-" if v is None else f"{v:.1f}") for key, v in summary["latency_ms"].items()),
        ("client CPU", f"{summary['client_cpu_percent']:.0f} %"),
    ]
    if summary.get("interrupted"):
        rows.append(("interrupted", "Ctrl-C"))
    if "schedule_lag_ms" in summary:
        rows.append(("schedule lag p99", f"{summary['schedule_lag_ms']['p99']:.1f} ms"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>12}".rstrip() for label, value in rows)


def write_json(summary: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


def save(write: Callable[[], None], path: str) -> bool:
    """Run `write`; False, after one line on stderr, when `path` cannot be written."""
    try:
        write()
    except (OSError, ValueError) as exc:  # the summary is out already: a traceback would only bury it
        print(f"stress_test.py: cannot write {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return False
    return True


def write_plot(rec: Recorder, path: str) -> None:
    import matplotlib  # only here: it is slow to import and only needed for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sent = np.array([record[0] for record in rec.records])
    latency_ms = np.array([record[1] for record in rec.records]) * 1000.0
    ok = np.array([record[2] == "200" for record in rec.records], dtype=bool)
    fig, (timeline, histogram) = plt.subplots(1, 2, figsize=(13, 4.8))
    timeline.scatter(sent[ok], latency_ms[ok], s=3, c="tab:blue", label=f"200 ({ok.sum()})", rasterized=True)
    timeline.scatter(sent[~ok], latency_ms[~ok], s=6, c="tab:red", label=f"error ({(~ok).sum()})", rasterized=True)
    timeline.set(xlabel="send time (s)", ylabel="latency (ms)", title="Latency over the run")
    timeline.legend(loc="upper left")
    answered_ms = np.asarray(rec.answered) * 1000.0
    histogram.hist(answered_ms, bins=60, color="tab:blue")
    if answered_ms.size:  # with no answer there is no percentile to draw
        for p, style in ((50, "--"), (99, ":")):
            value = np.percentile(answered_ms, p)
            histogram.axvline(value, color="black", linestyle=style, label=f"p{p} {value:.1f} ms")
        histogram.legend()
    histogram.set(xlabel="latency (ms)", ylabel="requests", title=f"Latency of {answered_ms.size} answered requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"url": args.url, "images": args.image, "timeout_s": args.timeout}
    if args.rate is not None:
        settings.update(mode="open", rate=args.rate, connections=args.connections)
    else:
        settings.update(mode="closed", concurrency=args.concurrency)
    if args.requests is not None:
        settings["requests"] = args.requests
    else:
        settings["duration_s"] = args.duration
    if args.warm_up:
        settings["warm_up_s"] = args.warm_up
    return settings


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one (each client holds a socket); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # the kernel's own cap (nr_open) is lower: keep what there is
            return soft
        return wanted
    return soft


def files_warning(args: argparse.Namespace, limit: int) -> str | None:
    """Say so when the clients need more sockets than this process may open."""
    needed = args.concurrency if args.rate is None else args.connections
    if needed + SPARE_FILES <= limit:
        return None
    return (
        f"warning: {needed} connections need about {needed + SPARE_FILES} open files, but the limit "
        f"(ulimit -n) is {limit}: expect OSError (EMFILE) errors; raise the hard limit"
    )


def run(args: argparse.Namespace, target: Target) -> tuple[Recorder, bool]:
    """Generate the load described by `args`; what was recorded, and whether Ctrl-C cut it short."""
    warm_up = args.warm_up or 0.0
    budget = Budget(args.requests, None if args.duration is None else warm_up + args.duration)

    def interrupted() -> None:
        # the first Ctrl-C stops sending and still reports; a second one quits at once
        if budget.stopped:
            os._exit(130)
        budget.stop()
        print(
            f"\nstopping: no more requests are sent; those in flight get up to --timeout ({args.timeout:g} s) "
            "for their answers, then the summary. Ctrl-C again quits at once, without one.",
            file=sys.stderr,
        )

    gevent.signal_handler(signal.SIGINT, interrupted)
    rec = Recorder(warm_up=warm_up)
    with progress(rec, args.requests, sys.stderr):
        if args.rate is not None:
            run_open_loop(target, args.rate, args.connections, budget, args.timeout, rec)
        else:
            run_closed_loop(target, args.concurrency, budget, args.timeout, rec)
    rec.sending_until = budget.ended_at
    rec.finish()
    return rec, budget.stopped


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rate is None and args.concurrency is None:
        args.concurrency = 1
    if args.warm_up and args.duration is None:
        parser.error("--warm-up goes with --duration")
    if args.connections is not None and args.rate is None:
        parser.error("--connections goes with --rate (closed loop: each of --concurrency C clients has one)")
    args.connections = args.connections or OPEN_LOOP_CONNECTIONS
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and (problem := output_problem(path, plot=option == "--plot")):
            parser.error(f"{option} {path}: {problem}")  # before the run, not after it
    try:
        target = build_target(args.url, args.image)
    except ValueError as exc:
        parser.error(str(exc))
    if target.unresolved is not None:
        print(f"warning: cannot resolve {urlsplit(args.url).netloc}: {target.unresolved}", file=sys.stderr)
    if warning := files_warning(args, raise_open_files_limit()):
        print(warning, file=sys.stderr)
    rec, interrupted = run(args, target)
    summary = summarize(rec, settings_of(args))
    if interrupted:  # the planned load was not sent: not a run to take as passed
        summary["interrupted"] = True
    print(format_summary(summary))
    for warning in (bottleneck_warning(summary), connections_warning(summary)):
        if warning:
            print(warning, file=sys.stderr)
    if not summary["requests"]:
        print("stress_test.py: no request was sent", file=sys.stderr)
    outputs = [(args.json, lambda: write_json(summary, args.json)), (args.plot, lambda: write_plot(rec, args.plot))]
    saved = all([save(write, path) for path, write in outputs if path])  # a list: one failure does not skip the rest
    passed = summary["requests"] and summary["ok"] == summary["requests"] and not interrupted
    return 0 if passed and saved else 1


def output_problem(path: str, plot: bool) -> str | None:
    """Why --json or --plot could not write `path`, in words; None when nothing shows yet."""
    if not path:
        return "name a file"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory; name a file in it"
    if not os.path.isdir(folder):
        return f"no such directory {folder}"
    if not os.access(folder, os.W_OK):
        return f"cannot write in {folder}"
    if plot:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        formats = FigureCanvasAgg.get_supported_filetypes()
        extension = os.path.splitext(path)[1].lstrip(".").lower()
        if extension and extension not in formats:  # none: matplotlib writes PNG
            return f"the name must end in an image format: .{', .'.join(sorted(formats))}"
    return None


if __name__ == "__main__":
    sys.exit(main())
