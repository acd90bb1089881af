"""Property-based fuzzing of everything a client's bytes go through, on a fixed budget.

Hypothesis with derandomize=True: the same examples on every run, so a failure reproduces and the
run time is steady (about 20 s in all). The properties:
- serving.images.decode returns a (height, width, channels) uint8 array or raises InvalidImage;
- serving.upload's parsing returns or raises ApiError with a 4xx, and never anything else;
- the web tier (its app through the test client, a model server behind it) answers junk with 200,
  400 or 413 and the contract's JSON, never a 500, and computes only what it answers with 200.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
from flask import Flask, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import RequestEntityTooLarge

from serving import images
from serving.app import create_app
from serving.errors import ApiError
from serving.upload import parse_model, parse_top_k, parse_version, read_image
from settings import Settings
from tests.conftest import send
from tests.make_corpus import valid_images

SEEDS = valid_images()
SHAPES = [(8, 8, 1), (224, 224, 3), (5, 17, 3), (1, 1, 1)]
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid file of some format, then a few byte flips, truncations, insertions and overwrites."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "interesting"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        else:  # the values that break length and size fields
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\0\0\1\0"])
            )
    return bytes(data)


def assert_decodes_or_refuses(data: bytes, shape: tuple[int, int, int]) -> None:
    try:
        pixels = images.decode(data, *shape)
    except images.InvalidImage as exc:
        assert str(exc)  # the client is told something
        return
    assert pixels.shape == shape and pixels.dtype == np.uint8


@settings(FUZZ, max_examples=1500)
@given(data=mutated_images(), shape=st.sampled_from(SHAPES))
def test_decode_of_mutated_images(data, shape):
    assert_decodes_or_refuses(data, shape)


@settings(FUZZ, max_examples=300)
@given(data=st.binary(max_size=4096), shape=st.sampled_from(SHAPES))
def test_decode_of_random_bytes(data, shape):
    assert_decodes_or_refuses(data, shape)


@settings(FUZZ, max_examples=300)
@given(
    magic=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8", b"BM", b"II*\0"]),
    rest=st.binary(max_size=2048),
    shape=st.sampled_from(SHAPES),
)
def test_decode_of_random_bytes_behind_a_real_signature(magic, rest, shape):
    """Random bytes alone rarely get past Pillow's format sniffing; with a signature they reach the decoders."""
    assert_decodes_or_refuses(magic + rest, shape)


# serving.upload in a request context of the web tier's own app, with a 64 kB limit; parsing touches no Redis.


@pytest.fixture(scope="module")
def app(redis_url: str) -> Iterator[Flask]:
    app = create_app(Settings(redis_url=redis_url, max_upload_mb=64 / 1024))
    yield app
    app.extensions["serving"].inference.inbox.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
top_k_values = st.none() | st.integers() | st.floats() | st.booleans() | st.text(max_size=12) | json_values
image_values = (
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
    | st.text(max_size=64)
    | st.sampled_from(["data:image/png;base64,", "data:,", "====", "a", "\u00e9=="])
    | json_values
)
json_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"image": image_values, "top_k": top_k_values}).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=64),
).map(str.encode) | st.binary(max_size=256)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=latin-1",
        "application/vnd.api+json",
        "multipart/form-data",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/octet-stream",
        "text/plain",
        "",
    ]
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """Well-formed or slightly broken multipart, with odd field names, file names and top_k."""
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["image", "top_k", "file", "", "im\u00e4ge"]))
        filename = draw(st.none() | st.sampled_from(["a.png", "", "../../etc/passwd", "\u00e9.jpg"]))
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        value = draw(st.binary(max_size=64) | st.sampled_from([SEEDS["png"], b"3", b"-1", b"\xb2"]))
        parts.append(f"--x\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    body = b"".join(parts) + draw(st.sampled_from([b"--x--\r\n", b"", b"--x", b"--y--\r\n"]))
    return body, draw(st.sampled_from(["multipart/form-data; boundary=x", "multipart/form-data"]))


def assert_parses_or_refuses(app: Flask, body: bytes, content_type: str, query: dict) -> None:
    with app.test_request_context("/predict", method="POST", data=body, content_type=content_type, query_string=query):
        try:
            upload = read_image(request)
            parse_top_k(upload.options.get("top_k"), 5, 10)
            parse_model(upload.options.get("model"))
            parse_version(upload.options.get("version"))
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.code and exc.message
            return
        except RequestEntityTooLarge:
            return
    assert isinstance(upload.image, bytes) and upload.image


@settings(FUZZ, max_examples=600)
@given(
    body=json_bodies,
    content_type=content_types,
    query=st.dictionaries(st.sampled_from(["top_k", "image", "model", "version"]), st.text(max_size=8), max_size=2),
)
def test_upload_parsing_of_junk_bodies(app, body, content_type, query):
    assert_parses_or_refuses(app, body, content_type, query)


@settings(FUZZ, max_examples=300)
@given(multipart=multipart_bodies(), query=st.dictionaries(st.just("top_k"), st.text(max_size=8), max_size=1))
def test_upload_parsing_of_junk_multipart(app, multipart, query):
    assert_parses_or_refuses(app, *multipart, query)


@settings(FUZZ, max_examples=500)
@given(raw=top_k_values, classes=st.integers(1, 1000))
def test_top_k_is_a_class_count_or_a_400(raw, classes):
    try:
        value = parse_top_k(raw, 5, classes)
    except ApiError as exc:
        assert exc.status == 400 and exc.code == "bad_request" and len(exc.message) < 200
        return
    assert 1 <= value <= classes


# The whole web tier with a model server behind it: a small budget, since valid examples are computed.


@st.composite
def http_requests(draw: st.DrawFn) -> dict:
    image = draw(mutated_images() | st.binary(max_size=256))
    top_k = draw(st.none() | st.text(max_size=6) | st.integers(-5, 20).map(str))
    if draw(st.booleans()):
        data = {} if top_k is None else {"top_k": top_k}
        return {"files": {draw(st.sampled_from(["image", "img"])): ("f", image)}, "data": data}
    body = {"image": base64.b64encode(image).decode(), "top_k": draw(st.none() | top_k_values)}
    return {"data": json.dumps(body), "headers": {"Content-Type": "application/json"}}


@settings(FUZZ, max_examples=120)
@given(kwargs=http_requests())
def test_the_web_tier_never_answers_500(served, client, kwargs):
    response = send(client, **kwargs)

    assert response.status_code in (200, 400, 413), response.text
    assert response.json["success"] is (response.status_code == 200)
    assert (response.headers["X-Request-ID"] in served.computed) is (response.status_code == 200)
