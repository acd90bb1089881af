"""The wire format round-trips, and rejects what a corrupt or hostile Redis entry could hold."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from serving import wire


def test_job_round_trip_keeps_every_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    job = wire.Job.decode(wire.Job("id-1", "worker-a", pixels, 123.5, 3).encode())
    assert (job.request_id, job.reply_to, job.deadline, job.top_k) == ("id-1", "worker-a", 123.5, 3)
    np.testing.assert_array_equal(job.pixels, pixels)
    assert wire.Job.decode(wire.Job("id-2", "w", pixels, 1.0, None).encode()).top_k is None  # every probability
    assert wire.Job.decode(wire.Job("id-3", "w", pixels, 1.0, None, bgr=True).encode()).bgr
    assert not job.bgr


def test_a_bgr_job_has_a_dtype_of_its_own_and_an_rgb_job_is_written_as_before_bgr():
    """A model server older than BGR jobs ignores unknown keys but refuses an unknown dtype as malformed."""
    pixels = np.zeros((1, 1, 3), np.uint8)
    rgb = orjson.loads(wire.Job("a", "w", pixels, 1, 3).encode())
    bgr = orjson.loads(wire.Job("a", "w", pixels, 1, 3, bgr=True).encode())
    assert list(rgb) == ["id", "reply_to", "shape", "dtype", "data", "deadline", "top_k"] and rgb["dtype"] == "uint8"
    assert bgr["dtype"] != "uint8" and {**bgr, "dtype": "uint8"} == rgb


def test_model_info_is_rgb_unless_it_says_bgr():
    info = json.loads(wire.ModelInfo("m", 2, 3, 1, 3, ("a", "b"), bgr=True).encode())
    assert wire.ModelInfo.decode(json.dumps(info)).bgr
    assert not wire.ModelInfo.decode(json.dumps({k: v for k, v in info.items() if k != "bgr"})).bgr  # an older server's
    for wrong in (1, "true", None):
        with pytest.raises(wire.MalformedMessage):
            wire.ModelInfo.decode(json.dumps({**info, "bgr": wrong}))


# A well-formed one-pixel job, and jobs that each break one thing of it.
ONE_PIXEL = {
    "id": "a",
    "reply_to": "w",
    "shape": [1, 1, 1],
    "dtype": "uint8",
    "data": "AA==",
    "deadline": 1,
    "top_k": 3,
}
BROKEN = [
    {k: v for k, v in ONE_PIXEL.items() if k != "deadline"},
    {**ONE_PIXEL, "top_k": {}},
    {**ONE_PIXEL, "shape": [0, 1, 1]},
    {**ONE_PIXEL, "data": "AAAA"},  # three bytes for one pixel
    {**ONE_PIXEL, "dtype": "float32"},
]


def test_the_one_pixel_job_is_well_formed():
    assert wire.Job.decode(json.dumps(ONE_PIXEL)).pixels.shape == (1, 1, 1)
    # In Job.encode's key order, so that orjson writes it, and BROKEN's jobs, as the model server's fast path reads.
    assert list(ONE_PIXEL) == list(orjson.loads(wire.Job("a", "w", np.zeros((1, 1, 1), np.uint8), 1, 3).encode()))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04pickle",
        b"[]",
        b"{}",
        b'{"id": 1, "shape": [2, 2, 1], "dtype": "uint8", "data": "AAAA"}',
        *(json.dumps(job).encode() for job in BROKEN),
        *(orjson.dumps(job) for job in BROKEN),  # written as Job.encode writes: the path that skips the pixels
        orjson.dumps(ONE_PIXEL)[:-20],  # cut short
        orjson.dumps(ONE_PIXEL).replace(b'"deadline"', b'"data":"AAAA","deadline"'),  # the last "data" wins
    ],
)
def test_malformed_jobs_raise_malformed_message(raw):
    with pytest.raises(wire.MalformedMessage):
        wire.Job.decode(raw)


def test_a_job_reads_the_same_however_its_json_is_written():
    pixels = np.resize(np.array([251, 239, 190, 255, 255, 255], np.uint8), (4, 4, 3))  # base64 "++++////..."
    encoded = wire.Job("id-1", "w", pixels, 2.5, 3).encode()
    assert b"+" in encoded and b"/" in encoded
    fields = orjson.loads(encoded)
    others = [
        json.dumps(fields).encode(),  # spaces after separators
        json.dumps(dict(reversed(fields.items()))).encode(),  # another key order
        encoded.replace(b"/", b"\\/"),  # "\/" for "/", as some JSON writers escape it
        # Two "data" keys, the last one right: as any JSON parser reads it, the last wins.
        encoded.replace(b'"data":"', b'"data":"AAAA","deadline":1,"data":"', 1),
    ]
    expected = wire.Job.decode(encoded)
    for raw in others:
        job = wire.Job.decode(raw)
        assert (job.request_id, job.reply_to, job.deadline, job.top_k) == ("id-1", "w", 2.5, 3), raw
        np.testing.assert_array_equal(job.pixels, expected.pixels)
    np.testing.assert_array_equal(expected.pixels, pixels)


def test_a_malformed_job_may_still_say_whom_to_answer():
    assert wire.reply_address(b'{"id": "a", "reply_to": "w", "shape": "junk"}') == ("a", "w")
    assert wire.reply_address(b'{"id": "a"}') is None
    assert wire.reply_address(b"not json") is None


def test_model_info_ignores_extra_keys_and_rejects_missing_ones():
    info = wire.ModelInfo("m", 2, 3, 1, 1, ("a", "b"))
    assert wire.ModelInfo.decode(json.dumps({**json.loads(info.encode()), "new": 1})) == info
    with pytest.raises(wire.MalformedMessage):
        wire.ModelInfo.decode(json.dumps({"name": "m"}))
    for broken in ({"height": 0}, {"labels": []}):
        with pytest.raises(wire.MalformedMessage):
            wire.ModelInfo.decode(json.dumps({**json.loads(info.encode()), **broken}))


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"predictions": 3}', b"{}"])
def test_results_without_a_request_id_are_malformed(raw):
    with pytest.raises(wire.MalformedMessage):
        wire.Result.decode(raw)


@pytest.mark.parametrize(
    "raw", [b'{"id": "r"}', b'{"id": "r", "top": 3}', b'{"id": "r", "probabilities": "@@"}', b'{"id": "r", "error": 1}']
)
def test_unreadable_results_read_as_errors_of_their_request(raw):
    result = wire.Result.decode(raw)
    assert (result.request_id, result.error_code) == ("r", "model_error") and result.error


def test_results_round_trip():
    top = wire.Result("a", top=((3, 0.75), (1, 0.25)))
    failed = wire.Result("b", error_code="late", error="too late")
    assert wire.Result.decode(top.encode()) == top and wire.Result.decode(failed.encode()) == failed
    every = wire.Result.decode(wire.Result("c", probabilities=np.array([0.25, 0.75], np.float32)).encode())
    np.testing.assert_array_equal(every.probabilities, [0.25, 0.75])


def test_speed_round_trips_and_rejects_nonsense():
    speed = wire.Speed(32, {1: 0.002, 32: 0.01}, extra_seconds=0.001)
    assert wire.Speed.decode(speed.encode()) == speed
    for raw in (b"{}", b'{"batch_size": 0, "batch_seconds": {}}', b'{"batch_size": 4, "batch_seconds": {"2": 0}}'):
        with pytest.raises(wire.MalformedMessage):
            wire.Speed.decode(raw)


def test_registry_members_name_a_model_version():
    assert wire.ModelKeys.from_member(b"my.model:12") == wire.ModelKeys("my.model", 12)
    for member in (b"nameless", b":3", b"digits:one"):
        with pytest.raises(wire.MalformedMessage):
            wire.ModelKeys.from_member(member)
