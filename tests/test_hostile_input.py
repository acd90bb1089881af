"""Hostile and odd requests get the contract's 4xx and JSON error, and none of them reaches the queue.

The files are in tests/corpus/ (see its README.md); the request shapes are built here. Every check
ends in `assert_rejected`, which also proves the request was never queued: its X-Request-ID is in
no batch a model server ran, and nothing of the model is queued or in flight. The requests go
through Flask's test client as the bytes `requests` would send (conftest.send); the chunked uploads
need a real HTTP server.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import pathlib
import socket
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import pytest
import requests
from PIL import Image, TiffImagePlugin

from serving import image_limits, images
from settings import Settings
from tests.conftest import assert_rejected, send
from tests.make_corpus import encode

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
TOO_MANY_PIXELS = "pixels"  # every pixel-limit message says how many pixels are accepted

# corpus file -> (status, error code, a word the message must contain), sent as a file or as base64
HOSTILE_FILES = {
    "empty.bin": (400, "missing_image", "empty"),
    "text.txt": (400, "invalid_image", "format"),
    "page.svg": (400, "invalid_image", "format"),
    "vector.eps": (400, "invalid_image", "format"),  # Pillow would hand it to Ghostscript
    "truncated.jpg": (400, "invalid_image", "decoded"),
    "truncated.png": (400, "invalid_image", "decoded"),
    "truncated.gif": (400, "invalid_image", "decoded"),
    "bomb_header.png": (400, "invalid_image", TOO_MANY_PIXELS),
    "bomb_100mp.png": (400, "invalid_image", TOO_MANY_PIXELS),
    "bomb.gif": (400, "invalid_image", TOO_MANY_PIXELS),
    "bomb.jpg": (400, "invalid_image", TOO_MANY_PIXELS),
    "wide_canvas.webp": (400, "invalid_image", TOO_MANY_PIXELS),
    "invalid_base64.json": (400, "invalid_image", "format"),  # as a file it is just text
    "not_an_object.json": (400, "invalid_image", "format"),
}


def test_the_corpus_is_small_and_complete():
    sizes = {path.name: path.stat().st_size for path in CORPUS.iterdir() if path.name != "README.md"}
    assert set(HOSTILE_FILES) == set(sizes)
    assert sum(sizes.values()) < 100_000


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_hostile_files_as_multipart(r, served, client, name):
    status, code, word = HOSTILE_FILES[name]

    response = send(client, files={"image": ("image.png", (CORPUS / name).read_bytes())})

    error = assert_rejected(r, served, response, status, code)

    assert word in error["message"]


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_hostile_files_as_json_base64(r, served, client, name):
    status, code, word = HOSTILE_FILES[name]
    encoded = base64.b64encode((CORPUS / name).read_bytes()).decode()

    error = assert_rejected(r, served, send(client, json={"image": encoded}), status, code)

    assert word in error["message"] or code == "missing_image"


def test_corpus_json_bodies_as_sent(r, served, client):
    headers = {"Content-Type": "application/json"}
    invalid = send(client, data=(CORPUS / "invalid_base64.json").read_bytes(), headers=headers)
    not_object = send(client, data=(CORPUS / "not_an_object.json").read_bytes(), headers=headers)

    assert "base64" in assert_rejected(r, served, invalid, 400, "invalid_image")["message"]
    assert "object" in assert_rejected(r, served, not_object, 400, "bad_request")["message"]


# Request shapes: what a confused or hostile client sends instead of the contract's two forms.
PNG = encode(Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))), "PNG")  # 8x8 stripes
JSON = {"Content-Type": "application/json"}
GZ = {**JSON, "Content-Encoding": "gzip"}
EMPTY_GZ = gzip.compress(b"")  # a member of its own: 20 bytes
SHAPES = {
    "wrong multipart field name": (dict(files={"file": ("a.png", PNG)}), 400, "missing_image"),
    "image as a text field": (dict(data={"image": base64.b64encode(PNG).decode()}), 400, "missing_image"),
    "empty multipart file": (dict(files={"image": ("a.png", b"")}), 400, "missing_image"),
    "browser form, no file chosen": (
        dict(files={"image": ("", b"", "application/octet-stream")}),
        400,
        "missing_image",
    ),
    "no body": (dict(), 400, "missing_image"),
    "raw PNG as application/octet-stream": (
        dict(data=PNG, headers={"Content-Type": "application/octet-stream"}),
        400,
        "missing_image",
    ),
    "raw PNG as image/png": (dict(data=PNG, headers={"Content-Type": "image/png"}), 400, "missing_image"),
    "JSON body as text/plain": (
        dict(data=json.dumps({"image": base64.b64encode(PNG).decode()}), headers={"Content-Type": "text/plain"}),
        400,
        "missing_image",
    ),
    "multipart without a boundary": (
        dict(data=b"--x\r\n\r\nhello", headers={"Content-Type": "multipart/form-data"}),
        400,
        "missing_image",
    ),
    "multipart with a broken body": (
        dict(
            data=b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG',
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        ),
        400,
        "missing_image",
    ),
    "form in a Content-Encoding not taken": (
        dict(files={"image": ("a.png", PNG)}, headers={"Content-Encoding": "br"}),
        400,
        "bad_request",
    ),
    "gzip JSON with junk after it": (
        dict(data=gzip.compress(json.dumps({"image": base64.b64encode(PNG).decode()}).encode()) + b"junk", headers=GZ),
        400,
        "bad_request",
    ),
    "deflate JSON with a second stream after it": (
        dict(
            data=zlib.compress(json.dumps({"image": base64.b64encode(PNG).decode()}).encode()) + zlib.compress(b"{}"),
            headers={**JSON, "Content-Encoding": "deflate"},
        ),
        400,
        "bad_request",
    ),
    "gzip JSON and thousands of empty members": (
        dict(
            data=gzip.compress(json.dumps({"image": base64.b64encode(PNG).decode()}).encode()) + EMPTY_GZ * 10_000,
            headers=GZ,
        ),
        400,
        "bad_request",
    ),
    "model as a file part": (dict(files={"image": ("a.png", PNG), "model": ("m.txt", b"digits")}), 400, "bad_request"),
    "invalid JSON": (dict(data=b'{"image": ', headers=JSON), 400, "bad_request"),
    "JSON that is not UTF-8": (dict(data=b'{"image": "\xff\xfe"}', headers=JSON), 400, "bad_request"),
    "JSON array": (dict(json=["image", "iVBORw0KGgo="]), 400, "bad_request"),
    "JSON string": (dict(json="iVBORw0KGgo="), 400, "bad_request"),
    "JSON number": (dict(json=42), 400, "bad_request"),
    "JSON null": (dict(data=b"null", headers=JSON), 400, "bad_request"),
    "JSON nested 100000 deep": (dict(data=b"[" * 100_000 + b"]" * 100_000, headers=JSON), 400, "bad_request"),
    "JSON object nested deep": (dict(data=b'{"a":' * 50_000 + b"1" + b"}" * 50_000, headers=JSON), 400, "bad_request"),
    "JSON without image": (dict(json={"picture": "iVBORw0KGgo="}), 400, "missing_image"),
    "JSON image null": (dict(json={"image": None}), 400, "missing_image"),
    "JSON image empty": (dict(json={"image": ""}), 400, "missing_image"),
    "JSON image a number": (dict(json={"image": 12345}), 400, "bad_request"),
    "JSON image a list": (dict(json={"image": [137, 80, 78, 71]}), 400, "bad_request"),
    "JSON image an object": (dict(json={"image": {"data": "iVBORw0KGgo="}}), 400, "bad_request"),
    "JSON image true": (dict(json={"image": True}), 400, "bad_request"),
    "base64 with junk characters": (dict(json={"image": "iVBOR*w0KGgo="}), 400, "invalid_image"),
    "base64 of impossible length": (dict(json={"image": "iVBORw0KG"}), 400, "invalid_image"),
    "base64 with non-ASCII": (dict(json={"image": "iVBORw0KGgo\u00e9"}), 400, "invalid_image"),
    "URL-safe base64": (dict(json={"image": "-_-_"}), 400, "invalid_image"),
    "base64 of nothing but padding": (dict(json={"image": "===="}), 400, "invalid_image"),
    "base64 of text": (dict(json={"image": base64.b64encode(b"hello world").decode()}), 400, "invalid_image"),
    "data URL of text": (dict(json={"image": "data:text/plain;base64,aGVsbG8="}), 400, "invalid_image"),
    "two images": (dict(files=[("image", ("a.png", PNG)), ("image", ("b.png", PNG))]), 400, "bad_request"),
    "an image and a text field image": (dict(files={"image": ("a.png", PNG)}, data={"image": "x"}), 400, "bad_request"),
    "top_k twice in the query": (
        dict(files={"image": ("a.png", PNG)}, params=[("top_k", 2), ("top_k", "abc")]),
        400,
        "bad_request",
    ),
    "model twice in the form": (
        dict(files={"image": ("a.png", PNG)}, data=[("model", "digits")] * 2),
        400,
        "bad_request",
    ),
    "image twice in the JSON body": (
        dict(data=f'{{"image": "{base64.b64encode(PNG).decode()}", "image": "zzzz"}}', headers=JSON),
        400,
        "bad_request",
    ),
    "top_k twice in the JSON body": (
        dict(data=f'{{"image": "{base64.b64encode(PNG).decode()}", "top_k": 2, "top_k": 3}}', headers=JSON),
        400,
        "bad_request",
    ),
    "timeout_ms twice in a JSON request's query": (
        dict(json={"image": base64.b64encode(PNG).decode()}, params=[("timeout_ms", 900), ("timeout_ms", 5)]),
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_odd_request_shapes(r, served, client, shape):
    kwargs, status, code = SHAPES[shape]

    assert_rejected(r, served, send(client, **kwargs), status, code)


def test_a_text_field_named_image_gets_a_hint(r, served, client):
    error = assert_rejected(r, served, send(client, data={"image": "photo.jpg"}), 400, "missing_image")

    assert "text field" in error["message"]


def test_a_text_field_named_image_gets_the_hint_whatever_its_size(r, served, client):
    """Flask refuses a text field over 500 KB by default, which read as "the upload is over 16 MB"."""
    multipart_text = {"image": (None, "A" * 600_000)}  # what curl -F 'image=<file' sends

    error = assert_rejected(r, served, send(client, files=multipart_text), 400, "missing_image")

    assert "text field" in error["message"]


def test_more_form_parts_than_flask_takes_is_a_413_that_says_so(r, served, client):
    fields = {f"field{n}": "x" for n in range(1001)}

    error = assert_rejected(r, served, send(client, files={"image": ("a.png", PNG)}, data=fields), 413, "too_large")

    assert "parts" in error["message"]


@pytest.mark.parametrize("model", [" digits", "digits ", "   ", "Digits"])
def test_a_model_name_is_matched_exactly(r, served, client, model):
    response = send(client, files={"image": ("a.png", PNG)}, data={"model": model})

    assert "digits" in assert_rejected(r, served, response, 404, "unknown_model")["message"]


def test_a_version_past_nine_digits_is_looked_up_not_refused_as_malformed(r, served, client):
    """Date-like versions (MODEL_VERSION=2026120623) are valid settings, so requests may name them."""
    response = send(client, files={"image": ("a.png", PNG)}, params={"version": "2026120623"})

    assert "no version 2026120623" in assert_rejected(r, served, response, 404, "unknown_model")["message"]


def test_the_body_gives_an_option_where_it_gives_one_else_the_query_does(served, client):
    response = send(client, files={"image": ("a.png", PNG)}, data={"top_k": ""}, params={"top_k": "2"})

    assert response.status_code == 200 and len(response.json["predictions"]) == 2


@pytest.mark.parametrize(("query", "form"), [("1", "5000"), ("5000", "1")])
def test_the_shortest_timeout_wins_wherever_it_is_given(served, client, query, form):
    response = send(client, files={"image": ("a.png", PNG)}, data={"timeout_ms": form}, params={"timeout_ms": query})

    assert (response.status_code, response.json["error"]["code"]) == (504, "timeout")


# top_k: anything but a whole number from 1 to the number of classes (10 for digits) is refused.
JUNK_TOP_K = ["abc", "\u00b2", "\u0663", "-1", "0", "11", "1e3", "1.5", "0x3", " ", "9" * 1000, "1" + "0" * 20]
JUNK_JSON_TOP_K = [-1, 0, 11, 1e3, 1.5, 3.0, True, False, 10**30, float("inf"), [3], {"k": 3}, "abc", "\u00b2"]


@pytest.mark.parametrize("top_k", JUNK_TOP_K, ids=lambda v: repr(v)[:12])
@pytest.mark.parametrize("where", ["form", "query"])
def test_junk_top_k_in_form_or_query(r, served, client, where, top_k):
    if where == "form":
        response = send(client, files={"image": ("image.png", PNG)}, data={"top_k": top_k})
    else:
        response = send(client, params={"top_k": top_k}, files={"image": ("a.png", PNG)})

    error = assert_rejected(r, served, response, 400, "bad_request")

    assert "top_k" in error["message"] and len(error["message"]) < 200


def test_a_5000_digit_top_k_is_refused(r, served, client):
    """int() refuses over 4300 digits with a ValueError; that must not become a 500."""
    response = send(client, files={"image": ("image.png", PNG)}, data={"top_k": "9" * 5000})

    assert_rejected(r, served, response, 400, "bad_request")


def test_json_python_cannot_read_says_it_is_not_valid_json(r, served, client):
    """A number of 5,000 digits is JSON, but past Python's limit on reading integers."""
    body = '{"image": "' + base64.b64encode(PNG).decode() + '", "top_k": ' + "9" * 5000 + "}"

    error = assert_rejected(r, served, send(client, data=body, headers=JSON), 400, "bad_request")

    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize("top_k", JUNK_JSON_TOP_K, ids=lambda v: repr(v)[:12])
def test_junk_top_k_in_json(r, served, client, top_k):
    body = json.dumps({"image": base64.b64encode(PNG).decode(), "top_k": top_k})  # inf: Python writes Infinity

    response = send(client, data=body, headers=JSON)

    assert "top_k" in assert_rejected(r, served, response, 400, "bad_request")["message"]


# Too large: MAX_UPLOAD_MB is checked before the body is read.


MAX_UPLOAD_MB = Settings().max_upload_mb  # the default, which the tests' apps keep
LIMIT = Settings().max_upload_bytes


@pytest.fixture(scope="module")
def oversize() -> bytes:
    """A PNG signature and then twice MAX_UPLOAD_MB of noise: no decoder ever sees it."""
    return b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).integers(0, 256, 2 * LIMIT, np.uint8).tobytes()


def chunked(body: bytes) -> Iterator[bytes]:
    """A generator makes requests send the body in chunked encoding, with no Content-Length."""
    return (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))


def test_an_upload_over_the_limit_is_413(r, served, client, oversize):
    error = assert_rejected(r, served, send(client, files={"image": ("image.png", oversize)}), 413, "too_large")

    assert f"{MAX_UPLOAD_MB:g} MB" in error["message"]


def json_just_over_the_limit() -> bytes:
    """A JSON body 1 MB over the limit (the size, not the content, is what is checked)."""
    encoded = base64.b64encode(b"\0" * (LIMIT * 3 // 4 + (1 << 20)))
    return b'{"image": "' + encoded + b'"}'


def test_a_json_body_over_the_limit_is_413(r, served, client):
    response = send(client, data=json_just_over_the_limit(), headers=JSON)

    assert_rejected(r, served, response, 413, "too_large")


def test_a_body_that_unpacks_over_the_limit_is_413_and_says_so(r, served, client):
    bomb = gzip.compress(b" " * (LIMIT + 1))  # JSON whitespace: a few KB packed

    response = send(client, data=bomb, headers={**JSON, "Content-Encoding": "gzip"})

    assert "unpacks to over" in assert_rejected(r, served, response, 413, "too_large")["message"]


@pytest.mark.parametrize("encoding", ["none", "br", "gzip, identity"])
def test_a_content_encoding_not_taken_is_refused_naming_those_that_are_and_each_of_those_works(
    served, client, encoding
):
    body = json.dumps({"image": base64.b64encode(PNG).decode()}).encode()
    packed = {"gzip": gzip.compress(body), "deflate": zlib.compress(body), "identity": body}

    message = send(client, data=body, headers={**JSON, "Content-Encoding": encoding}).json["error"]["message"]

    named = [name for name in packed if name in message]
    assert named == list(packed), message
    for name in named:
        response = send(client, data=packed[name], headers={**JSON, "Content-Encoding": name})
        assert response.status_code == 200, (name, response.json)


def test_a_compressed_form_is_read_as_a_compressed_json_body_is(served, client):
    form = requests.Request("POST", "http://x", files={"image": ("a.png", PNG)}, data={"top_k": "2"}).prepare()
    headers = {"Content-Type": form.headers["Content-Type"], "Content-Encoding": "gzip"}

    response = send(client, data=gzip.compress(form.body), headers=headers)

    assert response.status_code == 200, response.text
    assert len(response.json["predictions"]) == 2  # its fields are read from the unpacked body too
    assert served.computed == [response.headers["X-Request-ID"]]


# Chunked bodies over real HTTP: the WSGI server dechunks them (and says so in wsgi.input_terminated).


def test_a_chunked_upload_over_the_limit_is_413(r, served, live_url):
    """No Content-Length to check up front: the limit must hold while the body streams in."""
    response = requests.post(f"{live_url}/predict", data=chunked(json_just_over_the_limit()), headers=JSON, timeout=60)

    assert_rejected(r, served, response, 413, "too_large")


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/x-www-form-urlencoded", None])
def test_a_chunked_body_over_the_limit_is_413_whatever_its_type(r, served, live_url, content_type):
    """Werkzeug reads no chunked body that is no form, and stops at the limit in a urlencoded one."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(f"{live_url}/predict", data=chunked(b"a" * (LIMIT + 1024)), headers=headers, timeout=60)

    assert_rejected(r, served, response, 413, "too_large")


def test_a_chunked_body_of_exactly_the_limit_is_served(served, live_url):
    """The other side of the check above: a body that ends right at the limit is not too large."""
    body = json.dumps({"image": base64.b64encode(PNG).decode()}).encode()
    body += b" " * (LIMIT - len(body))  # JSON allows trailing whitespace

    response = requests.post(f"{live_url}/predict", data=chunked(body), headers=JSON, timeout=60)

    assert response.status_code == 200, response.text
    assert served.computed == [response.headers["X-Request-ID"]]


# What must still work next to all of the above.
VALID = {
    "data URL": dict(json={"image": "data:image/png;base64," + base64.b64encode(PNG).decode()}),
    "base64 without padding": dict(json={"image": base64.b64encode(PNG + b"\0").decode().rstrip("=")}),
    "base64 in 76-column lines": dict(json={"image": base64.encodebytes(PNG).decode()}),
    "JSON top_k as a string": dict(json={"image": base64.b64encode(PNG).decode(), "top_k": "10"}),
    "JSON top_k null means the default": dict(json={"image": base64.b64encode(PNG).decode(), "top_k": None}),
    "JSON top_k twice, both null": dict(
        data=f'{{"image": "{base64.b64encode(PNG).decode()}", "top_k": null, "top_k": null}}', headers=JSON
    ),
    "JSON top_k twice inside another key's object": dict(
        data=f'{{"image": "{base64.b64encode(PNG).decode()}", "x": {{"top_k": 1, "top_k": 2}}}}', headers=JSON
    ),
    "top_k with spaces": dict(files={"image": ("a.png", PNG)}, data={"top_k": " 2 "}),
    "top_k 1 in the query": dict(files={"image": ("a.png", PNG)}, params={"top_k": "1"}),
    "empty top_k means the default": dict(files={"image": ("a.png", PNG)}, data={"top_k": ""}),
    "gzip JSON": dict(
        data=gzip.compress(json.dumps({"image": base64.b64encode(PNG).decode()}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ),
    "gzip JSON in two members, as cat a.gz b.gz makes": dict(
        data=gzip.compress(b'{"image": "') + gzip.compress(base64.b64encode(PNG) + b'"}'), headers=GZ
    ),
    "top_k and version with leading zeros": dict(
        files={"image": ("a.png", PNG)}, data={"top_k": "010", "version": "01"}
    ),
    "application/*+json": dict(
        data=json.dumps({"image": base64.b64encode(PNG).decode()}), headers={"Content-Type": "application/x+json"}
    ),
}


@pytest.mark.parametrize("case", VALID)
def test_valid_variants_are_served(served, client, case):
    response = send(client, **VALID[case])

    assert response.status_code == 200, response.text
    assert 1 <= len(response.json["predictions"]) <= 10
    assert served.computed == [response.headers["X-Request-ID"]]


@pytest.mark.parametrize("name", ["page.svg", "vector.eps"])
def test_formats_outside_the_list_are_never_handed_to_pillow_plugins(name):
    with pytest.raises(images.InvalidImage, match="supported format"):
        images.decode((CORPUS / name).read_bytes(), 8, 8, 1)


# Files far costlier to read than their size says, built around small real pictures: refused before Pillow
# reads them, with one piece fewer than the limit still served.
PICTURE = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1)))  # 64x48 stripes
JPEG = encode(PICTURE.convert("RGB"), "JPEG", progressive=True)
PNG_STRIPES = encode(PICTURE, "PNG")


BIG_JPEG = encode(Image.new("L", (3200, 3200), 128), "JPEG", progressive=True)  # 98 scans of it: over 1e9


def scans(count: int, jpeg: bytes = JPEG) -> bytes:
    """The progressive JPEG with its last scan repeated until it has `count`."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * (count - jpeg.count(b"\xff\xda")) + jpeg[-2:]


def after_jfif(filler: bytes, count: int) -> bytes:
    """The JPEG with `filler` repeated `count` times after its first segment (JFIF: 20 bytes in)."""
    return JPEG[:20] + filler * count + JPEG[20:]


def png_chunks(count: int, after_pixels: bool = False) -> bytes:
    """The PNG with `count` private chunks between its header and its pixels, or between its pixels and its end."""
    private = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    at = len(PNG_STRIPES) - 12 if after_pixels else 33  # before IEND, or after IHDR
    return PNG_STRIPES[:at] + private * count + PNG_STRIPES[at:]


GIF = encode(PICTURE, "GIF")


def gif_comment(sub_blocks: int) -> bytes:
    """The GIF with a comment of `sub_blocks` 1-byte sub-blocks before its first image."""
    at = 13 + 3 * 2 ** ((GIF[10] & 7) + 1)  # past the header and the global colour table
    return GIF[:at] + b"\x21\xfe" + b"\x01x" * sub_blocks + b"\x00" + GIF[at:]


def tiff_numbers(count: int) -> bytes:
    """A small TIFF with a field of `count` numbers (SHORT), as a TIFF of that many strips or tiles has."""
    field = TiffImagePlugin.ImageFileDirectory_v2()
    field[65000], field.tagtype[65000] = tuple(n % 65536 for n in range(count)), 3
    return encode(Image.new("L", (4, 4)), "TIFF", tiffinfo=field)


def rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP of one pixel a row, each row then ended (Pillow fills the rest, in Python)."""
    data, palette = b"\x01\x00\x00\x00" * height + b"\x00\x01", bytes(range(256)) * 4
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def solid_webp(side: int) -> bytes:
    return encode(Image.new("RGB", (side, side), "teal"), "WEBP", lossless=True)  # about 50 bytes


COSTLY = {  # the file just past the limit, one just inside it, and a word the refusal says
    "scans": (scans(image_limits.MAX_JPEG_SCANS + 1), scans(image_limits.MAX_JPEG_SCANS), "scans"),
    "comments": (after_jfif(b"\xff\xfe\x00\x02", 1000), after_jfif(b"\xff\xfe\x00\x02", 990), "segments"),
    "junk": (after_jfif(b"\x00", image_limits.MAX_JPEG_JUNK + 1), after_jfif(b"\x00", 1000), "junk"),
    "fill": (after_jfif(b"\xff", image_limits.MAX_JPEG_JUNK + 2), after_jfif(b"\xff", 1000), "junk"),
    "png chunks": (png_chunks(image_limits.MAX_SEGMENTS), png_chunks(image_limits.MAX_SEGMENTS - 2), "chunks"),
    "png chunks after the pixels": (
        png_chunks(image_limits.MAX_PNG_CHUNKS, after_pixels=True),
        png_chunks(image_limits.MAX_PNG_CHUNKS - 5, after_pixels=True),
        "chunks",
    ),
    "gif blocks": (gif_comment(image_limits.MAX_GIF_BLOCKS), gif_comment(image_limits.MAX_GIF_BLOCKS - 1), "blocks"),
    "tiff numbers": (
        tiff_numbers(image_limits.MAX_TIFF_VALUES + 1),
        tiff_numbers(image_limits.MAX_TIFF_VALUES),
        "numbers",
    ),
    "rle bmp": (rle_bmp(2001, 2000), rle_bmp(2000, 2000), "RLE"),  # 2000x2000: image_limits.CHEAP_PIXELS
    "scans of many pixels": (scans(98, BIG_JPEG), BIG_JPEG, "scans"),
    "tiny canvas": (solid_webp(2001), solid_webp(2000), "bomb"),  # 2000x2000: image_limits.CHEAP_PIXELS
}


@pytest.mark.parametrize("costly", COSTLY.values(), ids=COSTLY.keys())
def test_a_file_far_costlier_to_read_than_its_size_is_refused_before_it_is_read(costly):
    refused, served, word = costly
    with pytest.raises(images.InvalidImage, match=word):
        images.decode(refused, 8, 8, 1)
    assert images.decode(served, 8, 8, 1).shape == (8, 8, 1)


# What gunicorn refuses before the app sees it: a real web server process.


@pytest.mark.processes
def test_requests_gunicorn_cannot_parse_get_the_contracts_json_too(make_stack):
    url = make_stack().web_server()
    host, port = url.removeprefix("http://").split(":")
    both_lengths = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    unknown_coding = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\nx"  # was a 501

    answers = [
        requests.get(f"{url}/models?model={'x' * 5000}", timeout=10),
        requests.post(f"{url}/predict", headers={"X-Request-Timeout-Ms": "1" * 9000}, timeout=10),
        raw_answer(host, int(port), both_lengths),
        raw_answer(host, int(port), unknown_coding),
    ]

    assert [a.status_code for a in answers] == [414, 431, 400, 400]
    codes = ["uri_too_long", "request_header_fields_too_large", "bad_request", "bad_request"]
    for answer, code in zip(answers, codes, strict=True):
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json()["success"] is False and answer.json()["error"]["code"] == code
        assert answer.json()["error"]["message"]
    counted = requests.get(f"{url}/metrics", timeout=10).text  # whichever worker answered each
    for status, times in ((414, 1), (431, 1), (400, 2)):
        assert f'serving_requests_total{{route="gunicorn",status="{status}"}} {times}.0' in counted, counted


@pytest.mark.processes
def test_a_body_gunicorn_cannot_dechunk_is_a_400_in_each_apis_shape(make_stack):
    """gunicorn raises as the app reads such a body; the client's mistake is no 500, and nothing is queued."""
    stack = make_stack()
    stack.model_server()
    url = stack.web_server()
    host, port = url.removeprefix("http://").split(":")
    bad_chunks = [b"zz\r\nabc\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"0\r\nno colon in this trailer\r\n\r\n"]
    targets = [("/predict", "application/json"), ("/predict", "multipart/form-data; boundary=x")]
    targets += [("/v2/models/digits/infer", "application/json")]

    for (path, content_type), chunks in itertools.product(targets, bad_chunks):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        answer = raw_answer(host, int(port), f"{head}Connection: close\r\n\r\n".encode() + chunks)

        assert answer.status_code == 400, (path, chunks, answer.text)
        error = answer.json()["error"]
        message = error if path.startswith("/v2") else error["message"]  # each API's own error shape
        assert "body could not be read" in message
    good = requests.post(f"{url}/predict", files={"image": PNG}, timeout=30)
    assert good.status_code == 200
    stack.wait_logged([good.headers["X-Request-ID"]])
    assert stack.batches() == [(1, [good.headers["X-Request-ID"]])]  # the good request alone was computed


@pytest.mark.processes
def test_a_client_that_asks_before_sending_its_body_is_asked_only_when_the_server_reads_it(make_stack):
    """gunicorn answered Expect: 100-continue at once, before the app looked at the request: such a client (curl,
    for a body over 1 MB) then sent all of an upload that was refused unread: over MAX_UPLOAD_MB, as here, or by
    the shedder under overload."""
    stack = make_stack(MAX_UPLOAD_MB="1")
    stack.model_server()
    host, port = stack.web_server().removeprefix("http://").split(":")
    body = b"--b\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n\r\n" + PNG + b"\r\n--b--\r\n"
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nExpect: 100-continue\r\n"
    )

    refused = raw_answer(host, int(port), f"{head}Content-Length: {2**20 + 1}\r\n\r\n".encode())
    assert refused.status_code == 413 and refused.headers["Connection"] == "close"  # and no 100 Continue first

    with socket.create_connection((host, int(port)), timeout=10) as served:
        served.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        assert served.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        served.sendall(body)
        answers = served.makefile("rb")
        assert http_answer(answers) == 200
        served.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection was kept open
        assert http_answer(answers) == 200


def http_answer(stream: BinaryIO) -> int:
    """The status of the next answer on a connection's stream, its body read past (it has a Content-Length)."""
    status, length = int(stream.readline().split()[1]), 0
    while (line := stream.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        length = int(value) if name.lower() == b"content-length" else length
    stream.read(length)
    return status


def raw_answer(host: str, port: int, request: bytes) -> requests.Response:
    """The answer to bytes no HTTP client library would send, parsed as `requests` would."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        head, _, body = sock.makefile("rb").read().partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    response = requests.Response()
    response.status_code = int(status_line.split()[1])
    response.headers.update(dict(line.split(": ", 1) for line in lines))
    response._content = body
    return response
