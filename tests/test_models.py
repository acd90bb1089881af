"""Several models and versions behind one Redis and one web tier, in-process: which model a request goes to,
GET /models, readiness and metrics per model, and a model replaced under its name."""

from __future__ import annotations

import base64
import math
import pathlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from scripts.processes import wait_until
from serving import catalog, registry, wire, zoo
from serving.modelserver import ModelServer
from tests.conftest import ModelServers, png, solid, upload

DIGIT = (pathlib.Path(__file__).resolve().parent.parent / "samples" / "digit_3.png").read_bytes()
RED = png(solid((250, 10, 10)))


@pytest.fixture(scope="module")
def digits_v2() -> zoo.KerasServable:
    return zoo.load("digits", version=2)


@dataclass
class TwoModels:
    servers: ModelServers
    digits: ModelServer
    colours: ModelServer


@pytest.fixture
def two_models(model_servers, digits, colours) -> TwoModels:
    """digits and colours served, one model server each."""
    return TwoModels(model_servers, model_servers.start(digits), model_servers.start(colours))


def ids_computed_by(servers, server) -> set[str]:
    return {request_id for batch in servers.batches_of[server.server_id] for request_id in batch.request_ids}


def test_the_only_model_is_the_default(served, client):
    response = upload(client, DIGIT)
    assert response.status_code == 200, response.json
    assert response.json["model"] == "digits" and response.headers["X-Model-Version"] == "1"


@pytest.mark.parametrize("where", ["query", "form", "json"])
def test_model_and_version_come_from_query_form_or_json(two_models, client, where):
    image = {"colours": RED, "digits": DIGIT}
    for name, version in [("colours", "1"), ("digits", 1), ("colours", None)]:
        options = {"model": name, **({"version": version} if version else {})}
        if where == "query":
            query = "?" + "&".join(f"{k}={v}" for k, v in options.items())
            response = upload(client, image[name], query)
        elif where == "form":
            response = upload(client, image[name], **{k: str(v) for k, v in options.items()})
        else:
            body = {"image": base64.b64encode(image[name]).decode(), **options}
            response = client.post("/predict", json=body)
        assert response.status_code == 200, (where, options, response.json)
        assert response.json["model"] == name
        assert response.json["predictions"][0]["label"] == {"colours": "red", "digits": "3"}[name]


def test_each_models_traffic_reaches_only_its_own_servers(two_models, client, colours):
    servers, digit_server, colour_server = two_models.servers, two_models.digits, two_models.colours
    sent: dict[str, set[str]] = {"digits": set(), "colours": set()}
    for n in range(20):
        name = ("digits", "colours")[n % 2]
        response = upload(client, DIGIT if name == "digits" else RED, model=name)
        assert response.status_code == 200, response.json
        sent[name].add(response.json["request_id"])
    assert ids_computed_by(servers, digit_server) == sent["digits"]
    assert ids_computed_by(servers, colour_server) == sent["colours"]
    shapes = {batch.jobs[0].pixels.shape for batch in servers.batches_of[colour_server.server_id]}
    assert shapes == {colours.info.shape}  # each job prepared for its own model's input


def test_several_models_and_no_default_is_a_400_naming_them(two_models, client):
    response = upload(client, DIGIT)
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "bad_request" and "colours" in error["message"] and "digits" in error["message"]


def test_a_model_whose_servers_left_no_longer_counts_against_the_only_one_served(two_models, client):
    two_models.servers.stop(two_models.colours)  # it stays in the registry, not ready, for a day
    wait_until(lambda: not client.get("/models").json["models"][0]["ready"], 10, "colours seen gone")

    response = upload(client, DIGIT)

    assert response.status_code == 200 and response.json["model"] == "digits", response.json


def test_while_the_only_live_model_restarts_a_model_that_left_before_does_not_count(two_models, make_app, r):
    catalog = make_app().extensions["serving"].catalog
    two_models.servers.stop(two_models.colours)
    r.delete(wire.ModelKeys("colours", 1).alive)  # its NO_SERVER_GRACE_S is over
    two_models.servers.stop(two_models.digits)
    with registry.starting(r, wire.ModelKeys("digits", 1), every_s=1.0, grace_s=60.0, listed_s=5.0):  # a restart
        catalog.forget()
        assert catalog.resolve(None, None).keys.name == "digits"


def test_while_the_only_live_version_restarts_requests_naming_none_wait_for_it(
    model_servers, digits, digits_v2, r, client
):
    """Not for a higher version whose servers left, long ago (kept in the registry for a day, as after a
    rollback) or just now (alive for NO_SERVER_GRACE_S after a clean stop)."""
    v1, v2 = wire.ModelKeys("digits", 1), wire.ModelKeys("digits", 2)
    seconds, micros = r.time()
    registry.Registration(r, digits_v2.info, "left").beat(seconds + micros / 1e6, ttl_s=0.2, grace_s=0.2)
    wait_until(lambda: not r.exists(v2.alive), 10, "version 2 gone past its grace")
    model_servers.stop(model_servers.start(digits))  # version 1 served, then its server restarts:
    for v2_left_just_now in (False, True):
        if v2_left_just_now:
            model_servers.stop(model_servers.start(digits_v2))  # a clean stop leaves the version alive a while
            assert r.exists(v2.alive)
        with registry.starting(r, v1, every_s=1.0, grace_s=60.0, listed_s=5.0):
            client.application.extensions["serving"].catalog.forget()
            response = upload(client, DIGIT, timeout_ms="300")  # nothing computes it while the restart lasts
        assert response.status_code == 504, response.json  # it waited for version 1, where it was queued
        assert r.llen(v1.queue) == 1 and r.llen(v2.queue) == 0
        r.delete(v1.queue)


def test_default_model_setting_picks_the_model(two_models, make_app):
    client = make_app(default_model="colours").test_client()
    response = upload(client, RED)
    assert response.status_code == 200 and response.json["model"] == "colours"
    assert upload(client, DIGIT, model="digits").json["model"] == "digits"


def test_a_default_model_without_a_server_is_unavailable_not_unknown(served, make_app):
    response = upload(make_app(default_model="colours").test_client(), RED)
    assert response.status_code == 503 and response.json["error"]["code"] == "unavailable", response.json
    assert "colours" in response.json["error"]["message"]


UNKNOWN = {
    "name": {"model": "resnet"},
    "version": {"model": "digits", "version": "7"},
    "a long name": {"model": "x" * 100_000},
}


@pytest.mark.parametrize("options", UNKNOWN.values(), ids=UNKNOWN.keys())
def test_an_unknown_model_or_version_is_a_404(served, client, options):
    response = upload(client, DIGIT, **options)
    assert response.status_code == 404, response.json
    error = response.json["error"]
    assert error["code"] == "unknown_model" and "digits" in error["message"]
    assert len(error["message"]) < 300  # a name is not echoed whole
    assert served.computed == []


@pytest.mark.parametrize("version", ["0", "two", "1.5", "-1"])
def test_a_version_that_is_no_whole_number_is_a_400(served, client, version):
    response = upload(client, DIGIT, version=version)
    assert response.status_code == 400 and response.json["error"]["code"] == "bad_request"


def test_a_model_missing_from_a_redis_that_lost_it_is_unavailable_not_unknown(model_servers, digits, client, r):
    """Redis restarted empty: until the model servers' next beat the registry lacks what they serve."""
    server = model_servers.start(digits)
    assert upload(client, DIGIT).status_code == 200
    model_servers.stop(server)  # so that nothing announces it again during the test
    r.flushall()
    client.application.extensions["serving"].catalog.forget()

    for query in ("?model=digits", "?model=digits&version=1", ""):
        response = upload(client, DIGIT, query)
        assert (response.status_code, response.json["error"]["code"]) == (503, "unavailable"), query
        assert "restarted" in response.json["error"]["message"]
    assert client.get("/v2/models/digits/ready").status_code == 503
    assert upload(client, DIGIT, "?model=digits&version=2").status_code == 404  # never served
    assert upload(client, DIGIT, "?model=nope").status_code == 404


def test_a_model_whose_first_server_is_loading_it_is_starting_not_unknown(served, client, r):
    """A model server announces its model at its first heartbeat, once loaded and warmed up (ResNet50 here:
    16 s). Until then a request naming the model, or a new version of one served, is told it starts."""
    with registry.starting(r, wire.ModelKeys("colours", 1), every_s=0.05, grace_s=1.0, listed_s=1.0):
        with registry.starting(r, wire.ModelKeys("digits", 2), every_s=0.05, grace_s=1.0, listed_s=1.0):
            for query, named in [("?model=colours", "colours"), ("?model=digits&version=2", "digits version 2")]:
                response = upload(client, DIGIT, query)
                assert (response.status_code, response.json["error"]["code"]) == (503, "unavailable"), query
                assert response.json["error"]["message"].startswith(f"{named} is starting")
                assert response.headers["Retry-After"] == "1"
            assert client.get("/v2/models/colours/ready").status_code == 503
            assert upload(client, DIGIT, "?model=colours&version=2").status_code == 404  # not the one loading
            assert upload(client, DIGIT, "?model=nope").status_code == 404
            assert upload(client, DIGIT).json["model"] == "digits"  # the only model served is still the default
    # A server that died while loading (these blocks ended without the first beat) lapses: unknown again.
    queries = ("?model=colours", "?model=digits&version=2")
    wait_until(lambda: all(upload(client, DIGIT, q).status_code == 404 for q in queries), 10, "both unknown again")


def test_requests_naming_no_model_are_told_which_one_starts(make_app, r):
    with registry.starting(r, wire.ModelKeys("colours", 1), every_s=0.05, grace_s=60.0, listed_s=60.0):
        for app in (make_app(), make_app(default_model="colours")):  # the only one, or the default
            response = upload(app.test_client(), RED)
            assert (response.status_code, response.json["error"]["code"]) == (503, "unavailable")
            assert response.json["error"]["message"].startswith("colours is starting")


def test_readiness_says_which_model_is_loading_while_no_server_is_alive(make_app, r):
    """Not just "no model server is alive", which sent operators looking for a dead process."""
    client = make_app().test_client()
    assert client.get("/ready").json["reason"] == "no model server is alive"
    with registry.starting(r, wire.ModelKeys("colours", 1), every_s=0.05, grace_s=60.0, listed_s=60.0):
        ready, v2_ready = client.get("/ready"), client.get("/v2/health/ready")

    assert ready.status_code == 503 and ready.json["reason"].endswith("yet: loading colours:1")
    assert v2_ready.status_code == 503 and v2_ready.json["error"].endswith("yet: loading colours:1")


def test_a_first_beat_between_the_web_tiers_two_reads_still_finds_the_model(served, client, r, monkeypatch):
    """The first beat moves a version from the starting list to the registry in one round trip, and the web
    tier reads the two lists one after the other. Here the beat comes just before the second read."""
    keys = wire.ModelKeys("colours", 1)
    registration = registry.Registration(r, wire.ModelInfo("colours", 1, 16, 16, 3, ("r", "g", "b")), "s1")
    reads = []

    def second_read_after_the_beat(read: Callable[..., list]) -> Callable[..., list]:
        def read_lists(*args: object, **kwargs: object) -> list:
            reads.append(read)
            if len(reads) == 2:
                registration.beat(now=time.time(), ttl_s=5, grace_s=15)
            return read(*args, **kwargs)

        return read_lists

    with registry.starting(r, keys, every_s=60, grace_s=60.0, listed_s=60.0):
        monkeypatch.setattr(registry, "known_models", second_read_after_the_beat(registry.known_models))
        monkeypatch.setattr(registry, "starting_models", second_read_after_the_beat(registry.starting_models))
        client.application.extensions["serving"].catalog.forget()
        response = upload(client, RED, "?model=colours", timeout_ms="200")
    assert len(reads) >= 2 and response.status_code != 404, response.json  # 504: nothing computes it here


def test_a_model_server_that_fails_or_stops_while_loading_is_no_longer_starting_at_once(r):
    keys = wire.ModelKeys("digits", 1)
    with pytest.raises(SystemExit):  # SIGTERM while loading; a model that will not load raises too
        with registry.starting(r, keys, every_s=0.05, grace_s=60.0, listed_s=60.0):
            assert registry.starting_models(r, now=time.time()) == [keys]
            raise SystemExit(0)
    assert registry.starting_models(r, now=time.time()) == [] and r.exists(keys.alive)  # alive: it may restart


def test_a_model_server_that_started_lists_its_version_as_served_and_no_longer_as_starting(r):
    keys = wire.ModelKeys("digits", 1)
    with registry.starting(r, keys, every_s=0.05, grace_s=60.0, listed_s=60.0):
        assert r.zscore(wire.STARTING, keys.member)
    registration = registry.Registration(r, wire.ModelInfo("digits", 1, 8, 8, 1, tuple("0123456789")), "s1")
    registration.beat(now=1000.0, ttl_s=5, grace_s=15)  # its first beat, once warmed up
    assert r.zscore(wire.MODELS, keys.member) == 1000.0 and not r.exists(wire.STARTING)


def test_without_a_version_the_highest_with_a_live_server_answers(model_servers, digits, digits_v2, make_app):
    app = make_app()
    client, catalog = app.test_client(), app.extensions["serving"].catalog
    v1 = model_servers.start(digits)
    assert upload(client, DIGIT).headers["X-Model-Version"] == "1"
    v2 = model_servers.start(digits_v2)
    wait_until(lambda: catalog.resolve("digits", None).keys.version == 2, 10, "v2 seen")
    assert upload(client, DIGIT).headers["X-Model-Version"] == "2"
    assert upload(client, DIGIT, version="1").headers["X-Model-Version"] == "1"  # both run: a canary

    model_servers.stop(v2)
    # The moment before the web tier reads the registry again: the next test.
    wait_until(lambda: catalog.resolve("digits", None).keys.version == 1, 10, "v2 seen gone")
    assert upload(client, DIGIT).headers["X-Model-Version"] == "1"
    assert ids_computed_by(model_servers, v1) and ids_computed_by(model_servers, v2)


def test_a_request_naming_no_version_moves_when_its_version_just_lost_its_last_server(
    model_servers, digits, digits_v2, make_app, r
):
    """A stopping server leaves the registry at once, but a web worker reads it only every REFRESH_S: a request
    naming no version goes where it would go now, as the contract says, not to wait on the stopped version."""
    app = make_app()
    client, catalog = app.test_client(), app.extensions["serving"].catalog
    v1 = model_servers.start(digits)
    v2 = model_servers.start(digits_v2)
    wait_until(lambda: catalog.resolve("digits", None).keys.version == 2, 10, "v2 seen")
    catalog.refresh_s = math.inf  # held in the moment before this worker reads the registry again
    model_servers.stop(v2)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}

    answers = [upload(client, DIGIT), client.post("/v2/models/digits/infer", json={"inputs": [tensor]})]

    assert [a.status_code for a in answers] == [200, 200], [a.json for a in answers]
    assert answers[0].headers["X-Model-Version"] == answers[1].json["model_version"] == "1"
    assert len(ids_computed_by(model_servers, v1)) == 2
    assert r.llen(wire.ModelKeys("digits", 2).queue) == 0  # nothing left waiting for a server that is gone


def test_a_request_naming_no_version_moves_when_its_versions_last_server_dies_while_it_waits(
    model_servers, digits, digits_v2, make_app, r
):
    """The only v2 server is killed (SIGKILL, OOM): it never leaves the registry, its heartbeat only expires."""
    app = make_app(request_timeout_s=20)
    client, catalog = app.test_client(), app.extensions["serving"].catalog
    v1 = model_servers.start(digits)
    seconds, micros = r.time()
    registry.Registration(r, digits_v2.info, "dies").beat(seconds + micros / 1e6, ttl_s=2, grace_s=60)
    wait_until(lambda: catalog.resolve("digits", None).keys.version == 2, 10, "v2 seen")

    response = upload(client, DIGIT)  # queued on v2, which takes nothing; its heartbeat expires meanwhile

    assert response.status_code == 200, response.json
    assert response.headers["X-Model-Version"] == "1" and len(ids_computed_by(model_servers, v1)) == 1
    assert r.llen(wire.ModelKeys("digits", 2).queue) == 0  # taken back: no v2 server that comes back computes it


def test_models_lists_every_model_with_versions_shape_classes_and_readiness(two_models, digits_v2, client):
    two_models.servers.start(digits_v2)
    wait_until(lambda: len(client.get("/models").json["models"][1]["versions"]) == 2, 10, "v2 listed")
    two_models.servers.stop(two_models.digits)

    models = client.get("/models").json
    assert models == {
        "models": [
            {"name": "colours", "versions": [1], "ready": True, "input": [16, 16, 3], "classes": 3},
            {"name": "digits", "versions": [1, 2], "ready": True, "input": [8, 8, 1], "classes": 10},
        ]
    }
    two_models.servers.close()
    wait_until(lambda: not any(m["ready"] for m in client.get("/models").json["models"]), 10, "none ready")


def test_a_model_published_later_is_served_without_a_restart(served, colours, client):
    assert upload(client, RED, model="colours").status_code == 404
    served.start(colours)
    wait_until(lambda: upload(client, RED, model="colours").status_code == 200, 10, "colours served")
    assert upload(client, RED, model="colours").json["predictions"][0]["label"] == "red"


def test_a_model_whose_first_server_just_started_is_served_at_once_not_a_refresh_later(served, colours, make_app):
    """/ready reads the registry when asked: a load balancer that saw it ready must not then get a 404 or 503
    from a worker whose view of the models is older than the model."""
    app = make_app()
    client = app.test_client()
    app.extensions["serving"].catalog.refresh_s = math.inf  # the view the 404 below reads would otherwise last
    assert upload(client, RED, model="colours").status_code == 404
    served.start(colours)
    time.sleep(catalog.RECHECK_S)

    assert upload(client, RED, model="colours").status_code == 200


def test_ready_names_the_ready_models(two_models, client):
    body = client.get("/ready").json
    assert body["ready"] is True and body["model_servers"] == 2
    assert sorted(body["models"]) == ["colours:1", "digits:1"]


def test_a_model_replaced_under_its_name_answers_model_changed_at_once_then_the_new_one(
    model_servers, digits, colours_file, make_app
):
    app = make_app()
    client = app.test_client()
    old = model_servers.start(digits)
    assert upload(client, DIGIT).status_code == 200
    app.extensions["serving"].catalog.refresh_s = math.inf  # this worker keeps the old shape in its cache
    model_servers.stop(old)
    model, labels = colours_file
    model_servers.start(zoo.load(str(model), labels=str(labels), name="digits"))  # same name, new input

    response = upload(client, RED)
    assert response.status_code == 503, response.json
    assert response.json["error"]["code"] == "model_changed" and response.headers["Retry-After"] == "1"
    assert "(16, 16, 3)" in response.json["error"]["message"]
    assert model_servers.computed == [model_servers.batches[0].request_ids[0]]  # only the first, old answer

    retry = upload(client, RED)  # the failure made the web tier read the new shape
    assert retry.status_code == 200, retry.json
    assert [p["label"] for p in retry.json["predictions"]] == ["red", "green", "blue"]


def test_metrics_are_labelled_by_model_and_version(two_models, client):
    before = client.get("/metrics").get_data(as_text=True)
    for name, image in [("digits", DIGIT), ("colours", RED), ("colours", RED)]:
        assert upload(client, image, model=name).status_code == 200
    upload(client, DIGIT, model="nope")
    assert client.post("/v2/models/digits/versions/two/infer", json={}).status_code == 404  # no version chosen
    colours_images = 'serving_images_total{model="colours",version="1"}'

    def scrape() -> str:
        return client.get("/metrics").get_data(as_text=True)

    # A batch is counted just after its answers go out: its client may have its 200 a moment before.
    wait_until(lambda: value(scrape(), colours_images) >= 2, 10, "both colours images counted")
    after = scrape()

    def grew(sample: str) -> float:
        return value(after, sample) - value(before, sample)

    # prometheus_client writes the labels sorted by name
    assert grew('serving_request_seconds_count{model="colours",route="/predict",status="200",version="1"}') == 2
    assert grew('serving_request_seconds_count{model="digits",route="/predict",status="200",version="1"}') == 1
    assert grew('serving_request_seconds_count{model="",route="/predict",status="404",version=""}') == 1
    v2_404 = 'route="/v2/models/<name>/versions/<version>/infer",status="404"'
    assert grew(f'serving_request_seconds_count{{model="",{v2_404},version=""}}') == 1
    assert value(after, colours_images) == 2
    assert value(after, 'serving_model_servers{model="digits",version="1"}') == 1


def value(text: str, sample: str) -> float:
    """One sample's value in a Prometheus exposition; 0 when absent (a labelled series not yet seen)."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def test_models_of_the_same_name_keep_their_versions_apart_in_redis(model_servers, digits, digits_v2, r):
    model_servers.start(digits)
    model_servers.start(digits_v2)
    published = {
        version: wire.ModelInfo.decode(r.get(wire.ModelKeys("digits", version).info)).version for version in (1, 2)
    }
    assert published == {1: 1, 2: 2}
    members = sorted(m.decode() for m in r.zrange(wire.MODELS, 0, -1))
    assert members == ["digits:1", "digits:2"]


@pytest.mark.parametrize("labels", ["/nonexistent/labels.txt", "/"])
def test_a_labels_file_that_cannot_be_read_is_a_message_not_a_traceback(colours_file, labels):
    model, _ = colours_file

    with pytest.raises(zoo.ModelUnavailable, match=f"LABELS={labels} cannot be read"):
        zoo.load(str(model), labels=labels)


def saved(model: object, folder: pathlib.Path, name: str) -> str:
    model.save(folder / f"{name}.keras")
    return str(folder / f"{name}.keras")


def test_a_model_that_does_not_take_images_to_class_scores_is_refused_with_a_message(tmp_path):
    import keras

    image = keras.Input((8, 8, 1))
    flat = keras.layers.Flatten()(image)
    two_in = keras.Input((8, 8, 1))
    shapes = {
        "two_inputs": keras.Model([image, two_in], keras.layers.Dense(3)(keras.layers.Flatten()(image + two_in))),
        "a_vector_in": keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)]),
        "two_outputs": keras.Model(image, [keras.layers.Dense(3)(flat), keras.layers.Dense(2)(flat)]),
        "a_map_out": keras.Model(image, keras.layers.Conv2D(2, 1)(image)),
    }
    for name, model in shapes.items():
        with pytest.raises(zoo.ModelUnavailable, match="must (take one batch of images|output one vector)"):
            zoo.load(saved(model, tmp_path, name))


def test_a_single_sigmoid_score_is_a_binary_classifiers_two_classes(tmp_path):
    import keras

    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")]
    )
    servable = zoo.load(saved(model, tmp_path, "binary"))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), np.uint8)

    p = np.asarray(model.predict_on_batch(pixels.astype(np.float32)))
    np.testing.assert_allclose(servable.predict(pixels), np.concatenate([1 - p, p], axis=1), atol=1e-6)
    assert servable.info.labels == ("0", "1")


def test_labels_that_would_shift_classes_or_do_not_apply_are_refused(colours_file, tmp_path):
    model, _ = colours_file
    (tmp_path / "gap.txt").write_text("red\n\ngreen\nblue\n")
    with pytest.raises(zoo.ModelUnavailable, match="line 2 is empty"):
        zoo.load(str(model), labels=str(tmp_path / "gap.txt"))
    (tmp_path / "ok.txt").write_text("red\ngreen\nblue\n\n")  # blank lines at the end are no class
    assert zoo.load(str(model), labels=str(tmp_path / "ok.txt")).info.labels == ("red", "green", "blue")
    for changes in ({"preprocess": "caffe"}, {"labels": str(tmp_path / "ok.txt")}):
        with pytest.raises(zoo.ModelUnavailable, match="comes with its own"):
            zoo.load("digits", **changes)


def test_a_model_whose_output_is_not_a_number_answers_a_model_error_in_json(model_servers, make_app, tmp_path):
    import keras

    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    model.layers[-1].set_weights([np.full((64, 3), np.nan, np.float32), np.zeros(3, np.float32)])
    model_servers.start(zoo.load(saved(model, tmp_path, "broken")))

    response = upload(make_app().test_client(), DIGIT)

    assert response.status_code == 500 and response.json["error"]["code"] == "model_error"
    assert "not a number" in response.json["error"]["message"]
