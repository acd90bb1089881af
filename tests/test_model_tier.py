"""The model server in-process against the session's real Redis: answers, the pipeline, padding, deadlines, speed.

Jobs go onto the queue as the web tier writes them (serving.queue.submit) and answers are read
from the web worker's inbox, so only the model tier is under test. Servables whose predict takes
a time the test sets (and can hold at a gate) make the timing decisions deterministic.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

from scripts.processes import wait_until
from serving import queue, registry, wire, zoo
from serving.batch import top_classes
from serving.clock import RedisClock
from serving.speed import allowed_sizes, padded
from tests.conftest import in_inbox

WORKER = "worker-a"
FAR = 3600.0  # seconds: a deadline nothing comes near


@dataclass
class Timed:
    """A servable whose predict takes seconds[batch size], then waits at its gate (open unless closed)."""

    info: wire.ModelInfo
    seconds: dict[int, float] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)  # set when a predict starts
    sizes: list[int] = field(default_factory=list)  # the batch size of every predict

    def __post_init__(self) -> None:
        self.gate.set()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.entered.set()
        time.sleep(self.seconds.get(len(batch), 0.0))
        self.gate.wait()
        return np.full((len(batch), self.info.num_classes), 1 / self.info.num_classes)


def timed(**seconds: float) -> Timed:
    """A Timed servable of 4x4 RGB images; keyword s4=0.5 means half a second for a batch of 4."""
    info = wire.ModelInfo("timed", 1, 4, 4, 3, ("a", "b", "c"))
    return Timed(info, {int(name[1:]): s for name, s in seconds.items()})


def submit(r, servable, n: int, deadline_s: float = FAR, prefix: str = "j", top_k: int | None = 3) -> list[str]:
    """n jobs of random pixels in one request, due deadline_s from now on Redis' clock; their ids."""
    rng = np.random.default_rng(len(prefix) + n)
    deadline = RedisClock(r).now() + deadline_s
    jobs = [
        wire.Job(f"{prefix}{i}", WORKER, rng.integers(0, 256, servable.info.shape, np.uint8), deadline, top_k)
        for i in range(n)
    ]
    keys = wire.ModelKeys(servable.info.name, servable.info.version)
    assert queue.submit(r, keys, jobs, limit=10_000)[0] is queue.Submitted.QUEUED
    return [job.request_id for job in jobs]


def answers(r, servable) -> list[wire.Result]:
    inbox = wire.ModelKeys(servable.info.name, servable.info.version).inbox(WORKER)
    return in_inbox(r, inbox)


def wait_answered(r, servable, n: int) -> list[wire.Result]:
    wait_until(lambda: len(answers(r, servable)) >= n, 30, f"{n} answers")
    return answers(r, servable)


def held(r, server) -> list[int]:
    """How many jobs each of the server's in-flight lists holds."""
    return [r.llen(server.keys.inflight(server.server_id, slot)) for slot in range(queue.INFLIGHT_SLOTS)]


# Answers equal Keras' own predict of the same pixels, with Keras' own preprocessing in numpy.


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pathlib.Path, str]]:
    import keras

    folder = tmp_path_factory.mktemp("random_models")
    models = {}
    for name, mode in (("ResNet50", "caffe"), ("MobileNetV2", "tf")):
        keras.utils.set_random_seed(3)
        path = folder / f"{name}.keras"
        model = getattr(keras.applications, name)(weights=None)
        if name == "MobileNetV2":
            # At random init its features fade to about 1e-11, and it answered 1/1000 for every class of any
            # image: a scaled-up classifier makes its answers depend on the pixels (a channel flip moves them 2e-4).
            classifier = model.get_layer("predictions")
            kernel, bias = classifier.get_weights()
            classifier.set_weights([kernel * 1e11, bias])
        model.save(path)
        models[name] = path, mode
    return models


@pytest.mark.parametrize("model", ["digits", "ResNet50", "MobileNetV2"])
def test_served_probabilities_equal_keras_predict_on_numpy_preprocessed_pixels(r, model_servers, random_models, model):
    import keras
    from keras.applications import imagenet_utils

    path, mode = (zoo.DIGITS, "none") if model == "digits" else random_models[model]
    servable = zoo.load(str(path), preprocess=mode, name="m")
    model_servers.start(servable, batch_size=8)
    ids = submit(r, servable, 5, top_k=None)  # 5 images: padded to a batch of 8

    served = {a.request_id: a.probabilities for a in wait_answered(r, servable, 5)}

    (batch,) = model_servers.batches
    assert batch.size == 8 and batch.request_ids == ids
    x = np.stack([job.pixels for job in batch.jobs]).astype(np.float32)
    if mode != "none":
        x = imagenet_utils.preprocess_input(x, data_format="channels_last", mode=mode)
    expected = np.asarray(keras.saving.load_model(path, compile=False).predict_on_batch(x))
    np.testing.assert_allclose(np.stack([served[i] for i in ids]), expected, atol=1e-5)


@pytest.mark.parametrize("model", ["ResNet50", "MobileNetV2"])
def test_a_job_in_either_channel_order_gets_the_same_answer(r, model_servers, random_models, model):
    """The web tier sends pixels in the model's order (BGR for caffe); a job in the other order is flipped."""
    path, mode = random_models[model]
    servable = zoo.load(str(path), preprocess=mode, name="m")
    model_servers.start(servable, batch_size=2)
    rgb = np.random.default_rng(1).integers(0, 256, servable.info.shape, np.uint8)
    deadline = RedisClock(r).now() + 30
    jobs = [wire.Job("rgb", WORKER, rgb, deadline, None), wire.Job("bgr", WORKER, rgb[..., ::-1], deadline, None, True)]
    assert queue.submit(r, wire.ModelKeys("m", 1), jobs, limit=10)[0] is queue.Submitted.QUEUED

    served = {a.request_id: a.probabilities for a in wait_answered(r, servable, 2)}

    np.testing.assert_allclose(served["rgb"], served["bgr"], rtol=1e-6)
    assert servable.info.bgr == (mode == "caffe")


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_the_preprocessing_in_the_graph_is_keras_own_on_every_pixel(mode):
    """The served model's first layers against imagenet_utils.preprocess_input, pixel by pixel."""
    import keras
    from keras.applications import imagenet_utils

    image = keras.Input((5, 7, 3))
    identity = keras.Model(image, keras.layers.Identity()(image))  # the served model then outputs its input
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 7, 3), np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = (0, 0, 0), (255, 255, 255)

    in_order = pixels[..., ::-1] if zoo.takes_bgr(mode) else pixels  # as the web tier packs them
    served = np.asarray(zoo.with_uint8_input(identity, mode).predict_on_batch(in_order))

    expected = imagenet_utils.preprocess_input(pixels.astype(np.float32), data_format="channels_last", mode=mode)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("classes", [10, 64, 65, 1000])
def test_the_top_k_are_those_a_stable_sort_of_the_whole_row_puts_first(classes):
    """Ties in index order, NaNs last, whatever the row's length (long rows are partitioned first)."""
    rng = np.random.default_rng(classes)
    for trial in range(300):
        row = rng.random(classes).astype(np.float32)
        if trial % 3 == 0:
            row = np.round(row, 1)  # many ties, at the k-th place too
        if trial % 5 == 0:
            row[rng.integers(0, classes, 3)] = np.nan
        for k in (1, 5, classes):
            assert np.array_equal(top_classes(row, k), np.argsort(-row, kind="stable")[:k])


# The pipeline: batches overlap, every job is answered once, nothing stays in flight.


def two_batches_held(r, model_servers, jobs: int) -> tuple[Timed, object, list[str]]:
    """A server of batches of 4 whose predict is held at its gate: one batch computing, the next taken."""
    servable = timed()
    server = model_servers.start(servable, batch_size=4)
    servable.gate.clear()
    ids = submit(r, servable, jobs)
    wait_until(lambda: sorted(held(r, server)) == [0, 4, 4], 30, "one batch computing, the next taken")
    return servable, server, ids


def test_the_next_batch_is_taken_while_one_computes_and_every_job_is_answered_once(r, model_servers):
    servable, server, ids = two_batches_held(r, model_servers, 14)

    assert r.llen(server.keys.queue) == 6
    servable.gate.set()
    results = wait_answered(r, servable, 14)

    assert sorted(a.request_id for a in results) == sorted(ids)  # each exactly once
    assert sorted(model_servers.computed) == sorted(ids)
    wait_until(lambda: held(r, server) == [0, 0, 0], 10, "nothing in flight")
    assert [batch.size for batch in model_servers.batches] == [4, 4, 4, 2]


def test_after_a_batch_that_emptied_the_queue_the_next_is_taken_once_predict_is_done(r, model_servers):
    """At light load nothing waits to be taken: jobs that come during predict make one batch after it."""
    servable = timed()
    model_servers.start(servable, batch_size=4)
    servable.entered.clear()
    servable.gate.clear()
    lone = submit(r, servable, 1, prefix="lone")
    assert servable.entered.wait(30)
    later = submit(r, servable, 1, prefix="second") + submit(r, servable, 1, prefix="third")
    servable.gate.set()

    wait_answered(r, servable, 3)
    assert [[job.request_id for job in b.jobs] for b in model_servers.batches] == [lone, later]


def test_jobs_that_come_while_a_full_batch_computes_fill_the_batch_taken_behind_it(r, model_servers):
    """The batch taken ahead cannot start before the one computing ends: it keeps taking until then, or
    the jobs that came meanwhile would wait for the batch after next, in batches of what was there."""
    servable = timed()
    server = model_servers.start(servable, batch_size=4)
    servable.gate.clear()
    submit(r, servable, 5, prefix="first")
    wait_until(lambda: sorted(held(r, server)) == [0, 1, 4], 30, "a full batch computing, one job taken behind it")
    submit(r, servable, 2, prefix="meanwhile")
    wait_until(lambda: sorted(held(r, server)) == [0, 3, 4], 30, "the jobs that came meanwhile taken too")
    time.sleep(1.0)  # the batch behind, not full, waits for the one ahead
    servable.gate.set()

    wait_answered(r, servable, 7)
    ahead, behind = model_servers.batches
    assert [len(ahead.jobs), len(behind.jobs)] == [4, 3]
    assert behind.take_seconds < 0.5  # its wait for the batch ahead is not its own time: the speed published


def test_a_stop_computes_and_answers_the_batches_taken_and_leaves_the_rest_queued(r, model_servers):
    servable, server, ids = two_batches_held(r, model_servers, 12)

    server.stop()
    servable.gate.set()
    model_servers.stop(server)

    answered = [a.request_id for a in answers(r, servable)]
    queued = [wire.Job.decode(m).request_id for m in r.lrange(server.keys.queue, 0, -1)]
    assert len(answered) == 8 and sorted(answered + queued) == sorted(ids)
    assert held(r, server) == [0, 0, 0] and not r.sismember(server.keys.servers, server.server_id)


def test_a_stop_closes_the_batching_window_and_takes_no_more(r, model_servers):
    """SIGTERM: "finish the batch in hand, take no more". A stop used to wait out BATCH_WAIT_MS, taking what came."""
    servable = timed()
    server = model_servers.start(servable, batch_size=32, batch_wait_ms=10_000)
    first = submit(r, servable, 1, prefix="first")
    wait_until(lambda: sum(held(r, server)) == 1, 30, "the first job taken, its window open")
    stopping = threading.Thread(target=model_servers.stop, args=(server,))
    stopping.start()
    later: list[str] = []
    while stopping.is_alive():
        later += submit(r, servable, 1, prefix=f"later{len(later)}-")
        time.sleep(0.01)

    assert model_servers.computed[0] == first[0]
    assert len(set(model_servers.computed) & set(later)) <= 1  # at most a move already under way at the stop


def test_the_batching_window_ends_in_time_for_its_jobs_deadline(r, model_servers):
    servable = timed()
    server = model_servers.start(servable, batch_size=4, batch_wait_ms=10_000)
    submit(r, servable, 1, deadline_s=2.0, prefix="alone")  # nothing else comes

    (answer,) = wait_answered(r, servable, 1)
    model_servers.stop(server)  # its counts are complete once it has stopped

    assert answer.error_code == "" and model_servers.counted("finished_late") == 0  # not held for 10 s


def test_batches_are_padded_to_the_allowed_sizes_compiled_at_warm_up(r, model_servers):
    servable = timed()
    model_servers.start(servable, batch_size=12)
    warmed = list(servable.sizes)
    for n in (3, 5, 12, 9):
        submit(r, servable, n, prefix=f"n{n}-")
        wait_until(lambda n=n: sum(len(b.jobs) for b in model_servers.batches) >= n, 30, "a batch")
        assert model_servers.batches[-1].size == padded(n, allowed_sizes(12))
        model_servers.batches.clear()

    assert allowed_sizes(12) == (1, 2, 4, 8, 12)
    assert warmed == [1, 1, 2, 2, 4, 4, 8, 8, 12, 12]  # each allowed size compiled, then timed
    assert set(servable.sizes[len(warmed) :]) == {4, 8, 12}


# Deadlines: late jobs are answered at once and never computed; the batch size fits the oldest job.


def test_a_job_that_cannot_be_answered_in_time_is_answered_late_at_once_and_never_computed(r, model_servers):
    servable = timed(s1=1.0)
    model_servers.start(servable, batch_size=1)
    submit(r, servable, 1, deadline_s=0.6, prefix="late")  # one predict is measured at 1 s or more
    ok = submit(r, servable, 1, prefix="ok")

    results = {a.request_id: a for a in wait_answered(r, servable, 2)}

    assert results["late0"].error_code == "late" and results[ok[0]].error_code == ""
    assert model_servers.computed == ok
    counts = sum((b.counts for b in model_servers.batches), Counter())
    assert counts["late"] == 1 and counts["expired"] == 0
    assert int(r.hget(wire.ModelKeys("timed", 1).stats, "late")) == 1


def test_a_job_that_fits_alone_but_not_behind_the_batch_in_predict_is_late_before_that_batch_ends(r, model_servers):
    servable = timed(s1=1.0)
    model_servers.start(servable, batch_size=1)
    servable.entered.clear()
    servable.gate.clear()
    first = submit(r, servable, 1, prefix="first")
    assert servable.entered.wait(30)
    submit(r, servable, 1, deadline_s=1.2, prefix="behind")  # 1 s alone, about 2 s behind the first

    late = wait_answered(r, servable, 1)
    assert [(a.request_id, a.error_code) for a in late] == [("behind0", "late")]  # while the first still computes
    servable.gate.set()
    assert {a.request_id for a in wait_answered(r, servable, 2)} == {"behind0", first[0]}
    assert model_servers.computed == first


def test_the_batch_size_is_the_largest_whose_time_fits_the_oldest_jobs_deadline(r, model_servers):
    servable = timed(s8=1.5)  # sizes 1, 2 and 4 take no time; 8 takes 1.5 s
    model_servers.start(servable, batch_size=8)

    submit(r, servable, 10, deadline_s=0.8, prefix="tight")
    wait_answered(r, servable, 10)
    tight = [len(b.jobs) for b in model_servers.batches]
    model_servers.batches.clear()
    submit(r, servable, 10, prefix="loose")
    wait_answered(r, servable, 20)

    assert tight == [4, 4, 2]
    assert [len(b.jobs) for b in model_servers.batches] == [8, 2]
    assert {a.error_code for a in answers(r, servable)} == {""}


# Speed: measured at warm-up for every allowed size, published every heartbeat, then moving.


def test_each_server_publishes_its_measured_speed_and_updates_it_from_live_batches(r, model_servers):
    servable = timed(s4=0.2)
    server = model_servers.start(servable, batch_size=4, heartbeat_s=0.05)
    keys = wire.ModelKeys("timed", 1)
    (published,) = registry.state(r, keys).speeds
    assert published.batch_size == 4 and set(published.batch_seconds) == {1, 2, 4}
    assert published.batch_seconds[4] >= 0.2 > published.batch_seconds[1]
    assert published.extra_seconds > 0

    servable.seconds[4] = 1.0
    submit(r, servable, 4)
    wait_answered(r, servable, 4)

    def moved() -> bool:
        (speed,) = registry.state(r, keys).speeds
        return speed.batch_seconds[4] > published.batch_seconds[4]

    wait_until(moved, 10, "a slower estimate for batches of 4")
    assert server.meter.predict_seconds(4) < 1.0  # a moving average, not the last batch alone


def test_a_batchs_measured_time_counts_neither_the_wait_for_a_job_nor_the_jobs_dropped_before_it(r, model_servers):
    """After an overload the queue can hold thousands of expired jobs. Their flush, or the idle wait for a
    job, published as a batch's own time made admission refuse every request, with no batch left to
    measure the server fast again."""
    servable = timed()
    server = model_servers.start(servable, batch_size=4, block_s=3.0)
    time.sleep(1.0)  # the server waits for a job inside one blocking take
    submit(r, servable, 1, prefix="after-idle")
    wait_answered(r, servable, 1)
    (idle,) = model_servers.batches
    assert idle.take_seconds + idle.decode_seconds < 0.5

    started = time.monotonic()
    submit(r, servable, 2000, deadline_s=-1.0, prefix="expired")  # dropped at take, one at a time
    submit(r, servable, 1, prefix="behind")
    wait_answered(r, servable, 2)
    flush_s = time.monotonic() - started
    behind = model_servers.batches[-1]
    assert behind.request_ids == ["behind0"] and model_servers.counted("expired") == 2000
    assert behind.take_seconds + behind.decode_seconds < 0.05 * flush_s
    assert server.meter.extra_seconds < 0.05 * flush_s  # the published speed stays the server's own


def test_a_job_that_comes_during_the_batching_window_with_an_earlier_deadline_ends_it_sooner(r, model_servers):
    servable = timed()
    server = model_servers.start(servable, batch_size=4, batch_wait_ms=10_000)
    patient = submit(r, servable, 1, prefix="patient")  # a far deadline: it opens a window of 10 s
    wait_until(lambda: sum(held(r, server)) == 1, 30, "the window open")
    urgent = submit(r, servable, 1, deadline_s=2.0, prefix="urgent")

    results = {a.request_id: a.error_code for a in wait_answered(r, servable, 2)}
    model_servers.stop(server)  # its counts are complete once it has stopped

    assert results == {patient[0]: "", urgent[0]: ""}
    assert model_servers.counted("finished_late") == model_servers.counted("expired") == 0


def test_the_batching_window_is_not_published_as_the_servers_own_time(r, model_servers):
    """Else a BATCH_WAIT_MS window that closed with no company read as a slow server, and admission refused
    short deadlines as if even an idle tier could not meet them."""
    servable = timed()
    server = model_servers.start(servable, batch_size=4, batch_wait_ms=1000)
    submit(r, servable, 1, prefix="alone")  # nothing else comes: the window runs its whole second

    wait_answered(r, servable, 1)
    model_servers.stop(server)  # its meter is updated once it has stopped

    (alone,) = model_servers.batches
    assert alone.take_seconds < 0.5 and server.meter.extra_seconds < 0.5


# What cannot be computed: answered when it can be, dropped when not, counted either way.


def test_malformed_and_reshaped_jobs_are_answered_or_dropped_and_the_rest_computed(r, model_servers):
    servable = timed()
    server = model_servers.start(servable, batch_size=16)
    servable.entered.clear()
    servable.gate.clear()
    blocker = submit(r, servable, 1, prefix="blocker")  # holds predict, so what follows lands in one batch
    assert servable.entered.wait(30)
    junk = [
        b"not json",
        b"answered",  # what answered jobs are marked with in an in-flight list
        json.dumps({"id": "bad-data", "reply_to": WORKER, "shape": [4, 4, 3], "dtype": "uint8", "data": "@@"}),
        json.dumps({"id": "no-reply-to", "shape": [4, 4, 3]}),
        json.dumps([1, 2, 3]),
    ]
    r.lpush(server.keys.queue, *junk)
    resized = wire.Job("resized", WORKER, np.zeros((8, 8, 3), np.uint8), RedisClock(r).now() + FAR, 3)
    r.lpush(server.keys.queue, resized.encode())
    ids = submit(r, servable, 3)
    servable.gate.set()  # the blocker's batch ran dry, so the next take waits for its predict and gets all these

    results = {a.request_id: a.error_code for a in wait_answered(r, servable, 6)}

    assert results == {"bad-data": "malformed", "resized": "model_changed", **dict.fromkeys(blocker + ids, "")}
    counts = sum((b.counts for b in model_servers.batches), Counter())
    assert (counts["malformed"], counts["model_changed"]) == (5, 1)
    assert sorted(model_servers.computed) == sorted(blocker + ids)
    wait_until(lambda: held(r, server) == [0, 0, 0], 10, "nothing in flight")


def test_the_model_tier_benchmark_sees_every_job_answered(own_redis):
    """`make bench-model`'s drain, with the servable that computes nothing: it counted answers with LLEN and
    failed once the inbox became a stream, which no test ran."""
    from bench.model_tier import NoModel, drain

    url, process = own_redis()
    result = drain(NoModel(), url, process.pid, batch_size=8, count=64)

    assert result["jobs"] == 64 and result["batches"] >= 8 and result["images_per_s"] > 0
    assert set(result["stage_ms"]) == {"take", "decode", "model", "answer"}
