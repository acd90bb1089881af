"""Read the image file and options out of a /predict request, or say in a 4xx what is wrong."""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TypeVar

from flask import Request
from gevent import monkey
from gunicorn.http.errors import NoMoreData
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.wsgi import LimitedStream

from serving.errors import ApiError
from settings import MAX_MODEL_VERSION

_JSON_SHAPE = '{"image": "<base64 of the image file>"}'
_HOW = f"send the image as multipart form field 'image' (curl -F image=@photo.jpg ...) or as JSON {_JSON_SHAPE}"
# What a request may set besides the image, each as a JSON key, a form field or in the query string.
OPTIONS = ("top_k", "model", "version")
# ... and its timeout, which may also come as the header below.
TIMEOUT_OPTION = "timeout_ms"
MAX_TIMEOUT_MS = 999_999_999  # the longest a request may ask for (REQUEST_TIMEOUT_S caps it anyway)
# timeout_ms may come as this header too, for clients that set a deadline on every call the same way.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
# Compressed bodies a client may send (tritonclient's request_compression_algorithm): zlib's window bits for each.
_CONTENT_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_ENCODINGS_TAKEN = "send gzip, deflate or identity, or no Content-Encoding"
# The most gzip members a body may hold: each costs a copy of the rest of the body, so a body of thousands of
# empty members kept a web worker busy for seconds (a few files joined with `cat` are a handful).
MAX_GZIP_MEMBERS = 16
T = TypeVar("T")
_CLOSED = "the connection was closed before the whole body came; nothing was computed"


# Data bytes of a chunked body read at a time (in_turns). Few, as what a read costs is its chunks, not its bytes:
# 4 KiB of 1-byte chunks with the longest extension gunicorn takes is 33 MB to parse.
CHUNKED_STEP = 4096
# Reading time after which a gevent worker's other requests get a turn, and the pause that gives it: above 0, as
# gevent's sleep(0) may run the reading greenlet again before it polls the other connections (a re-probe's clients
# still waited 15 s). A pause after every step made a 14.5 MB upload of 1 MiB chunks take 4.4 s, not 0.15 s.
TURN_S = 0.005
PAUSE_S = 0.0001


def in_turns(read: Callable[[int], bytes], step: int, wanted: int = sys.maxsize) -> Iterator[bytes]:
    """What read(step) returns, again, until `wanted` bytes or the end, with a pause every TURN_S of reading in
    which a gevent worker's other requests run: gunicorn parses a chunked body in Python and never pauses while
    bytes keep coming (a body of 1-byte chunks with 4 KB extensions held a worker until gunicorn killed it).
    Without gevent no pause: threads are preempted anyway, and a real sleep would only slow the reading."""
    got, turn_began = 0, time.monotonic()
    while got < wanted and (part := read(min(step, wanted - got))):
        yield part
        got += len(part)
        if time.monotonic() - turn_began > TURN_S and monkey.is_module_patched("time"):
            time.sleep(PAUSE_S)
            turn_began = time.monotonic()


@dataclass(frozen=True)
class Upload:
    image: bytes
    options: dict[str, object]  # the OPTIONS the request gave, as given (JSON values or strings)
    timeouts: tuple[object, ...]  # timeout_ms from the body and the query string, as given


class ClientBody:
    """A request's body as the WSGI server reads it (wsgi.input), whose read errors are the client's.

    The server raises as it reads what the client got wrong: gunicorn a malformed chunk or trailer
    (InvalidChunkSize, ChunkMissingTerminator, InvalidHeader: none of them an OSError, which Werkzeug
    would take for a disconnect). Each of those was a 500; now a 400. A body that ends before its
    Content-Length, or inside a chunk (NoMoreData), is a client that closed its connection mid-upload:
    gunicorn hands the first over as if complete, and it read as a malformed one (a 400). Both are a 499.
    """

    def __init__(self, stream: IO[bytes], length: int | None) -> None:
        self._stream = stream
        self._left = length  # what Content-Length promises and has not been read yet; None if chunked

    def read(self, *size: int | None) -> bytes:
        data = self._read(self._stream.read, *size) if self._left is not None else self._read_chunked(*size)
        to_the_end = not size or size[0] is None or size[0] < 0
        return self._counted(data, ended=not data or to_the_end)

    def _read_chunked(self, size: int | None = None) -> bytes:
        """Up to `size` bytes (all, if None or negative) of a chunked body, CHUNKED_STEP at a time, in turns."""
        wanted = sys.maxsize if size is None or size < 0 else size
        return b"".join(in_turns(lambda n: self._read(self._stream.read, n), CHUNKED_STEP, wanted))

    def readline(self, *size: int | None) -> bytes:
        data = self._read(self._stream.readline, *size)
        return self._counted(data, ended=not data)

    def readlines(self, *hint: int) -> list[bytes]:
        return [self._counted(line, ended=False) for line in self._read(self._stream.readlines, *hint)]

    def __iter__(self) -> Iterator[bytes]:  # all four that PEP 3333 asks of wsgi.input
        return iter(self.readline, b"")

    def _counted(self, data: bytes, ended: bool) -> bytes:
        """`data`, after a 499 if `ended` (the server had no more to give) came before Content-Length did."""
        if self._left is not None:
            self._left -= len(data)
            if ended and self._left > 0:
                raise ApiError(499, "client_closed", _CLOSED)
        return data

    @staticmethod
    def _read(read: Callable[..., T], *size: int | None) -> T:
        try:
            return read(*size)
        except NoMoreData:  # a chunked body whose connection ended inside it
            raise ApiError(499, "client_closed", _CLOSED) from None
        except Exception as exc:
            raise BadRequest(f"the request's body could not be read ({type(exc).__name__}); send it again") from None


def client_bodies(app: Callable) -> Callable:
    """WSGI middleware: every request's body read through ClientBody."""

    def with_client_body(environ: dict, start_response: Callable) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH", "")
        environ["wsgi.input"] = ClientBody(environ["wsgi.input"], int(length) if length.isdigit() else None)
        return app(environ, start_response)

    return with_client_body


def read_image(request: Request) -> Upload:
    """The uploaded file's bytes and the options given with it."""
    _refuse_repeated(request.args)
    if request.is_json:
        return _from_json(request)
    form, files = _form(request)
    _refuse_repeated(form, files)
    for name in (*OPTIONS, TIMEOUT_OPTION):
        if name in files:  # not silently left out, as if not given: the answer would be another model's
            raise ApiError(400, "bad_request", f"{name} came as a file; send it as a plain field (curl -F {name}=...)")
    upload = files.get("image")
    if upload is None:
        if not _content_encoding(request):  # a compressed one was read and unpacked whole by _form already
            read_body(request)  # too large is a 413 whatever the body is: Werkzeug reads no chunked body but a form
        raise ApiError(400, "missing_image", f"{_HOW}; {_what_came(request, form, files)}")
    data = upload.read()
    if not data:  # also what a browser form sends when no file was chosen
        raise ApiError(400, "missing_image", f"the file in field 'image' is empty; {_HOW}")
    return _upload(data, form, request.args)


def _refuse_repeated(*fields: MultiDict) -> None:
    """A 400 for a field given more than once (in one place): the first was taken, and the others, a second
    image too, went unanswered without a word."""
    for name in ("image", *OPTIONS, TIMEOUT_OPTION):
        if (times := sum(len(given.getlist(name)) for given in fields)) > 1:
            one = "one image a request (a batch: POST /v2/models/<name>/infer)" if name == "image" else "it once"
            raise ApiError(400, "bad_request", f"{name!r} came {times} times; send {one}")


def _form(request: Request) -> tuple[MultiDict, MultiDict]:
    """The form's fields and files; a compressed form is decompressed first, as a compressed JSON body is."""
    if not _content_encoding(request):
        return request.form, request.files
    parser = request.make_form_data_parser()  # with the app's limits on parts and sizes
    plain = read_body(request)
    _, form, files = parser.parse(io.BytesIO(plain), request.mimetype, len(plain), request.mimetype_params)
    return form, files


def _upload(image: bytes, body: Mapping, query: Mapping) -> Upload:
    """The image with its options, each from the body where given there, else from the query string (null or
    empty is not given); timeout_ms from both, since a deadline only ever shortens."""
    options: dict[str, object] = {}
    for name in OPTIONS:
        given = [value for value in (body.get(name), query.get(name)) if value not in (None, "")]
        if given:
            options[name] = given[0]
    return Upload(image, options, (body.get(TIMEOUT_OPTION), query.get(TIMEOUT_OPTION)))


def _what_came(request: Request, form: MultiDict, files: MultiDict) -> str:
    """What the request held instead, so the client can see its mistake."""
    if "image" in form:
        return "'image' came as a text field, not a file: with curl, put @ before the path"
    fields = sorted({*files, *form})
    if fields:
        return f"fields received: {fields}"
    return f"received {f'a {request.mimetype}' if request.mimetype else 'an untyped'} body with no form fields"


def read_body(request: Request) -> bytes:
    """The whole body, read and cached (so a cut-off one is caught before parsing) and decompressed as its
    Content-Encoding says, or 413 when over the limit, compressed or not."""
    data = request.get_data()
    _refuse_cut_off_body(request)
    encoding = _content_encoding(request)
    return _decompressed(data, encoding, request.max_content_length) if encoding else data


def _content_encoding(request: Request) -> str:
    """The body's Content-Encoding in lower case; "" for none (identity)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    return "" if encoding == "identity" else encoding


def _decompressed(data: bytes, encoding: str, limit: int | None) -> bytes:
    """The body unpacked: its gzip members (RFC 1952 allows several, as `cat a.gz b.gz` makes; up to
    MAX_GZIP_MEMBERS), or one deflate stream; nothing may follow."""
    if encoding not in _CONTENT_ENCODINGS:
        raise ApiError(400, "bad_request", f"Content-Encoding {encoding!r:.40} is not taken: {_ENCODINGS_TAKEN}")
    plain, rest = b"", data
    for _ in range(1 if encoding == "deflate" else MAX_GZIP_MEMBERS):
        decompressor = zlib.decompressobj(_CONTENT_ENCODINGS[encoding])
        try:  # at most one byte past the limit, so that no zip bomb fills the memory
            plain += decompressor.decompress(rest, 0 if limit is None else limit + 1 - len(plain))
        except zlib.error:
            raise ApiError(400, "bad_request", f"the body is not valid {encoding} data") from None
        if limit is not None and len(plain) > limit:
            message = f"the body unpacks to over {limit:,} bytes (MAX_UPLOAD_MB); send a smaller image"
            raise ApiError(413, "too_large", message)
        if not decompressor.eof:
            raise ApiError(400, "bad_request", f"the body's {encoding} data is cut off")
        rest = decompressor.unused_data
        if not rest:
            return plain
    most = "one deflate stream" if encoding == "deflate" else f"{MAX_GZIP_MEMBERS} gzip members"
    raise ApiError(400, "bad_request", f"the body holds more than {most}")


def _from_json(request: Request) -> Upload:
    try:
        body = json.loads(read_body(request), object_pairs_hook=_JsonObject)  # decompressed: not get_json()
    except (ValueError, RecursionError) as exc:  # also bad UTF-8, an int of 5,000 digits, arrays nested deeply
        raise ApiError(400, "bad_request", f"the body is not valid JSON ({exc!s:.100}): {_JSON_SHAPE}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", f"the JSON body must be an object: {_JSON_SHAPE}")
    _refuse_repeated(MultiDict((name, value) for name, value in body.pairs if value is not None))
    encoded = body.get("image")
    if encoded in (None, ""):
        raise ApiError(400, "missing_image", f'the JSON body has no "image": send {_JSON_SHAPE}')
    if not isinstance(encoded, str):
        raise ApiError(400, "bad_request", '"image" must be a string holding the base64 of the image file')
    return _upload(b64decode(encoded), body, request.args)


class _JsonObject(dict):
    """A JSON object that keeps its pairs as given: json.loads keeps the last of a repeated key, and the body's
    image and options given twice are refused, as in a form."""

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _refuse_cut_off_body(request: Request) -> None:
    """413 for a chunked body (no Content-Length) over the limit.

    Werkzeug stops reading such a body at MAX_CONTENT_LENGTH without an error, so get_data()
    returns its first part; multipart parsing notices, plain reads do not. One byte more
    from the server's own stream tells a body cut off from one exactly at the limit.
    """
    stream = request.stream
    if request.content_length is None and isinstance(stream, LimitedStream) and stream.is_exhausted:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()


def b64decode(encoded: str) -> bytes:
    """An image file sent as base64 (or a data: URL), or a 400 saying why it is none."""
    if encoded.startswith("data:") and "," in encoded:  # a data URL straight from a browser
        encoded = encoded.split(",", 1)[1]
    compact = "".join(encoded.split())  # line breaks, as base64 tools write them
    compact += "=" * (-len(compact) % 4)  # padding, which some encoders leave out
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ApiError(400, "invalid_image", '"image" is not valid base64') from None
    if not data:
        raise ApiError(400, "missing_image", '"image" holds no bytes: send the base64 of the image file')
    return data


def parse_top_k(raw: object, default: int, num_classes: int) -> int:
    """top_k as given (query, form or JSON), or the default, within 1..num_classes."""
    if raw is None or raw == "":
        return min(default, num_classes)
    return whole_number(raw, "top_k", 1, num_classes)


def parse_version(raw: object) -> int | None:
    """The model version asked for; None for "the highest with a live model server"."""
    if raw is None or raw == "":
        return None
    return whole_number(raw, "version", 1, MAX_MODEL_VERSION)


def parse_timeout(cap_s: float, options: Iterable[object] = (), header: str | None = None) -> float:
    """The request's timeout in seconds: the shortest of every timeout_ms it gives, its header's and cap_s
    (REQUEST_TIMEOUT_S, which a request may shorten, never lengthen)."""
    given = [*((raw, TIMEOUT_OPTION) for raw in options), (header, TIMEOUT_HEADER)]
    asked = [whole_number(raw, name, 1, MAX_TIMEOUT_MS) / 1000 for raw, name in given if raw not in (None, "")]
    return min([cap_s, *asked])


def parse_model(raw: object) -> str | None:
    """The model's name exactly as given (names are case-sensitive and hold no spaces); None for none."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ApiError(400, "bad_request", f"model must be a model's name, not {raw!r:.40}")
    return raw


def whole_number(raw: object, name: str, low: int, high: int) -> int:
    """A JSON integer or a string of ASCII digits from low to high, or a 400 naming the option."""
    wrong = ApiError(400, "bad_request", f"{name} must be a whole number from {low} to {high}, not {raw!r:.40}")
    if isinstance(raw, int) and not isinstance(raw, bool):  # JSON true is an int to Python
        value = raw
    elif isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():  # not "²" or "٣"
        if len(raw.strip().lstrip("0")) > len(str(high)):  # int() of thousands of digits raises (Python's DoS limit)
            raise wrong
        value = int(raw)
    else:
        raise wrong
    if not low <= value <= high:
        raise wrong
    return value
