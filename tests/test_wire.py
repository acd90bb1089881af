"""The wire format round-trips, and rejects what a corrupt or hostile Redis entry could hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving import wire


def test_job_round_trip_keeps_every_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    job = wire.Job.decode(wire.Job("id-1", pixels, 123.5, 3).encode())
    assert (job.request_id, job.deadline, job.top_k) == ("id-1", 123.5, 3)
    np.testing.assert_array_equal(job.pixels, pixels)


@pytest.mark.parametrize(
    "raw",
    [b"\x80\x04pickle", b"[]", b"{}", b'{"id": 1, "shape": [2, 2, 1], "dtype": "uint8", "data": "AAAA"}'],
)
def test_malformed_jobs_raise_malformed_message(raw):
    with pytest.raises(wire.MalformedMessage):
        wire.Job.decode(raw)


def test_model_info_ignores_extra_keys_and_rejects_missing_ones():
    info = wire.ModelInfo("m", 2, 3, 1, 10)
    assert wire.ModelInfo.decode(json.dumps({**info.__dict__, "new": 1})) == info
    with pytest.raises(wire.MalformedMessage):
        wire.ModelInfo.decode(json.dumps({"name": "m"}))


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b'{"predictions": 3}', b"{}"])
def test_unreadable_results_read_as_errors(raw):
    assert "error" in wire.decode_result(raw)
