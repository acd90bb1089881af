"""The Open Inference Protocol (KServe v2) over real HTTP, driven by the stock tritonclient.http.

The web tier is served from a thread (tests/live_server.py), the model servers are threads too:
digits, and colours (another input shape). Answers are compared with the models run in-process.
"""

from __future__ import annotations

import base64
import gzip
import json
import pathlib
import struct

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from scripts.processes import free_port, wait_until
from serving import connections, wire, zoo
from serving.app import create_app
from tests.conftest import COLOURS, png, solid
from tests.live_server import serving
from tests.test_api_spec import conforms

SAMPLES = pathlib.Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture
def url(model_servers, digits, colours, make_app):
    model_servers.start(digits)
    model_servers.start(colours)
    with serving(make_app()) as base:
        yield base


@pytest.fixture
def client(url):
    with triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def batch(holdout) -> tuple[np.ndarray, list[bytes]]:
    """Twelve held-out digits: their pixels and the same as PNG files."""
    pixels = holdout[0][:12]
    return pixels, [png(p) for p in pixels]


def image_input(files: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(files, dtype=object))
    else:  # in JSON, an image file travels as base64
        tensor.set_data_from_numpy(np.array([base64.b64encode(f) for f in files], dtype=object), binary_data=False)
    return tensor


def pixels_input(pixels: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("colours", "1")
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert {"classification", "binary_tensor_data"} <= set(metadata["extensions"])
    assert metadata["name"] and metadata["version"]


def test_model_metadata_names_inputs_and_outputs_with_datatypes_and_shapes(client):
    assert (
        client.get_model_metadata("digits")
        == client.get_model_metadata("digits", "1")
        == {
            "name": "digits",
            "versions": ["1"],
            "platform": "keras",
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "pixels", "datatype": "UINT8", "shape": [-1, 8, 8, 1]},
            ],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        }
    )
    colours = client.get_model_metadata("colours")
    assert colours["inputs"][1]["shape"] == [-1, 16, 16, 3] and colours["outputs"][0]["shape"] == [-1, 3]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_batch_of_image_files_gets_the_in_process_probabilities(client, model_servers, digits, batch, binary):
    pixels, files = batch
    wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)

    result = client.infer("digits", [image_input(files, binary)], outputs=[wanted], request_id="mine")

    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (12, 10)
    np.testing.assert_allclose(probabilities, digits.predict(pixels), atol=1e-5)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("digits", "1", "mine")
    assert ("parameters" in response["outputs"][0]) is binary  # binary_data_size, for binary data
    assert len(model_servers.computed) == 12  # one job per image


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_as_the_stock_client_sends_it(client, digits, batch, algorithm):
    pixels, files = batch

    result = client.infer("digits", [image_input(files[:3])], request_compression_algorithm=algorithm)

    np.testing.assert_allclose(result.as_numpy("probabilities"), digits.predict(pixels[:3]), atol=1e-5)


def test_a_body_that_is_not_what_its_content_encoding_says_or_unpacks_too_large_is_refused(url, model_servers):
    body = json.dumps({"inputs": [image_tensor([b"x"])]}).encode()
    bomb = gzip.compress(b" " * (17 * 1024 * 1024))  # JSON whitespace past MAX_UPLOAD_MB (16): 17 KB packed

    def sent(data: bytes, encoding: str) -> requests.Response:
        return requests.post(f"{url}/v2/models/digits/infer", data=data, headers={"Content-Encoding": encoding})

    assert "not valid gzip" in protocol_error(sent(body, "gzip"), 400)
    assert "cut off" in protocol_error(sent(gzip.compress(body)[:-12], "gzip"), 400)
    assert "not taken" in protocol_error(sent(body, "br"), 400)
    protocol_error(sent(bomb, "gzip"), 413)
    assert model_servers.computed == []


def test_the_request_id_is_echoed_as_given_and_null_means_absent(url, batch):
    body = {"id": "", "inputs": [image_tensor(batch[1][:1])], "outputs": None, "parameters": None}

    response = post(url, "digits/infer", body)

    assert response.status_code == 200 and response.json()["id"] == ""
    classification = {"name": "probabilities", "parameters": {"classification": None}}
    probabilities = post(url, "digits/infer", {**body, "outputs": [classification]})
    assert probabilities.status_code == 200 and probabilities.json()["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize("path", ["%20/infer", "digits%20/infer", "%20", "Digits/ready"])
def test_a_model_name_is_matched_exactly(url, path):
    method = "POST" if path.endswith("/infer") else "GET"
    assert "digits" in protocol_error(requests.request(method, f"{url}/v2/models/{path}", json={}, timeout=10), 404)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_at_the_models_size(client, digits, batch, binary):
    pixels, _ = batch
    result = client.infer("digits", [pixels_input(pixels, binary)])
    np.testing.assert_allclose(result.as_numpy("probabilities"), digits.predict(pixels), atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_gives_the_top_k_as_score_index_label(client, digits, batch, binary):
    pixels, files = batch
    wanted = triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)

    classes = client.infer("digits", [image_input(files)], outputs=[wanted]).as_numpy("probabilities")

    assert classes.shape == (12, 3)
    reference = digits.predict(pixels)
    for row, expected in zip(classes, reference, strict=True):
        # tritonclient gives BYTES from binary data as bytes, from JSON as str
        parsed = [(entry.decode() if binary else entry).split(":") for entry in row]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-expected, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [str(i) for i in indices]  # digits' labels are "0".."9"
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], expected[indices], atol=1e-5)


def test_each_model_answers_its_own_requests(client, colours):
    red, blue = solid((240, 20, 20)), solid((10, 30, 250))
    result = client.infer("colours", [pixels_input(np.stack([red, blue]))])
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, colours.predict(np.stack([red, blue])), atol=1e-5)
    assert [COLOURS[i] for i in probabilities.argmax(axis=1)] == ["red", "blue"]
    top = client.infer(
        "colours", [image_input([png(red)])], outputs=[triton.InferRequestedOutput("probabilities", class_count=1)]
    )
    assert top.as_numpy("probabilities")[0, 0].decode().endswith(":0:red")


def test_a_caffe_model_gets_from_files_and_tensors_the_pixels_keras_preprocesses(model_servers, colours_file, make_app):
    """Caffe models take BGR: the web tier packs an image file's pixels so, and flips a UINT8 tensor (sent RGB)."""
    import keras
    from keras.applications import imagenet_utils

    model, labels = colours_file
    servable = zoo.load(str(model), labels=str(labels), preprocess="caffe", name="caffe")
    model_servers.start(servable)
    rgb = np.stack([solid((240, 20, 20)), solid((10, 30, 250))])
    x = imagenet_utils.preprocess_input(rgb.astype(np.float32), data_format="channels_last", mode="caffe")
    expected = np.asarray(keras.saving.load_model(model).predict_on_batch(x))

    with serving(make_app()) as base:
        for tensor in (pixels_input(rgb), image_input([png(p) for p in rgb])):
            with triton.InferenceServerClient(base.removeprefix("http://"), network_timeout=60) as client:
                served = client.infer("caffe", [tensor]).as_numpy("probabilities")
            np.testing.assert_allclose(served, expected, atol=1e-5)
    assert servable.info.bgr


def test_an_unknown_model_or_version_is_a_404_with_the_protocols_error(client, batch):
    for name, version in [("resnet", ""), ("digits", "3")]:
        with pytest.raises(InferenceServerException) as raised:
            client.infer(name, [image_input(batch[1][:1])], model_version=version)
        assert raised.value.status() == "404"
        assert "digits" in raised.value.message()  # it names what is served
        with pytest.raises(InferenceServerException):
            client.get_model_metadata(name, version)


@pytest.mark.parametrize("path", ["resnet/infer", "digits/versions/3/infer"])
@pytest.mark.parametrize("body", [{}, {"inputs": "image"}])
def test_an_unknown_model_is_a_404_even_when_the_body_is_wrong_too(url, path, body):
    assert "digits" in protocol_error(post(url, path, body), 404)


def test_versions_in_the_url_pick_the_version(client, batch):
    result = client.infer("digits", [image_input(batch[1][:2])], model_version="1")
    assert result.get_response()["model_version"] == "1"


def post(url: str, path: str, body: dict, binary: bytes = b"", **headers: str) -> requests.Response:
    payload = json.dumps(body).encode()
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(payload))
    return requests.post(f"{url}/v2/models/{path}", data=payload + binary, headers=headers, timeout=60)


def protocol_error(response: requests.Response, status: int) -> str:
    """The protocol's error shape, {"error": message}, never the /predict one."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    return body["error"]


def image_tensor(files: list[bytes]) -> dict:
    return {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(files)],
        "data": [base64.b64encode(f).decode() for f in files],
    }


@pytest.mark.parametrize(
    "body, says",
    [
        ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES or UINT8"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 4, 4, 1], "data": [0] * 16}]}, "8, 8, 1"),
        ({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]}, "one input"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]}, "elements"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [256] * 64}]}, "0 to 255"),
        ({"inputs": []}, "inputs"),
        ({"inputs": "image"}, "inputs"),
        ({"inputs": [image_tensor([b"x"])], "outputs": [{"name": "logits"}]}, "one output"),
        (
            {
                "inputs": [image_tensor([b"x"])],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}],
            },
            "10 classes",
        ),
        ({"inputs": [image_tensor([b"not an image"])]}, "image 0"),
        ({"id": 5, "inputs": []}, '"id"'),
        ({"inputs": [{"name": 5, "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}]}, '"name" string, not 5'),
    ],
)
def test_client_mistakes_are_400s_that_say_what_to_send(url, model_servers, body, says):
    message = protocol_error(post(url, "digits/infer", body), 400)
    assert says in message, message
    assert model_servers.computed == []


def test_binary_data_must_add_up(url, batch):
    pixels = batch[0][:1]
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 1], "parameters": {"binary_data_size": 64}}
    assert post(url, "digits/infer", {"inputs": [tensor]}, pixels.tobytes()).status_code == 200
    assert "left in the body" in protocol_error(post(url, "digits/infer", {"inputs": [tensor]}, b"\0" * 10), 400)
    extra = pixels.tobytes() + b"\0"
    assert "after the JSON" in protocol_error(post(url, "digits/infer", {"inputs": [tensor]}, extra), 400)
    files = struct.pack("<I", 100) + b"short"
    cut = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(files)}}
    assert "runs past" in protocol_error(post(url, "digits/infer", {"inputs": [cut]}, files), 400)
    both = {**tensor, "data": [0] * 64}
    assert "both" in protocol_error(post(url, "digits/infer", {"inputs": [both]}, pixels.tobytes()), 400)


def test_json_output_of_a_json_request_and_binary_of_a_binary_one(url, batch):
    json_only = post(url, "digits/infer", {"inputs": [image_tensor(batch[1][:2])]})
    assert json_only.headers["Content-Type"] == "application/json"
    assert len(json_only.json()["outputs"][0]["data"]) == 20
    asked = {"inputs": [image_tensor(batch[1][:2])], "parameters": {"binary_data_output": True}}
    binary = post(url, "digits/infer", asked)
    length = int(binary.headers["Inference-Header-Content-Length"])
    header = json.loads(binary.content[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(binary.content) - length == 80
    np.testing.assert_array_equal(
        np.frombuffer(binary.content[length:], "<f4"), np.array(json_only.json()["outputs"][0]["data"], np.float32)
    )


def test_every_error_under_v2_has_the_protocols_shape(url):
    assert "not found" in protocol_error(requests.get(f"{url}/v2/nowhere", timeout=10), 404).lower()
    protocol_error(requests.get(f"{url}/v2/models/digits/infer", timeout=10), 405)
    protocol_error(requests.post(f"{url}/v2/models/digits/infer", data=b"{", timeout=10), 400)
    protocol_error(requests.get(f"{url}/v2/models/nope/ready", timeout=10), 404)
    protocol_error(requests.get(f"{url}/v2//models/digits", timeout=10), 404)  # not a redirect to follow


@pytest.mark.parametrize("version", ["two", "0", "-1", "99999999999999999999"])
@pytest.mark.parametrize("name", ["digits", "nope"])
@pytest.mark.parametrize("route", ["", "/ready", "/infer"])
def test_a_version_that_is_no_version_number_is_an_unknown_version(url, name, version, route):
    """The protocol's versions are strings: "two" is a version nobody serves, and an unknown model says so first."""
    method = "POST" if route == "/infer" else "GET"
    response = requests.request(method, f"{url}/v2/models/{name}/versions/{version}{route}", json={}, timeout=10)
    assert ("no model named" if name == "nope" else "its versions are: 1") in protocol_error(response, 404)


def test_api_keys_guard_metadata_and_infer_but_not_health(model_servers, digits, make_app, batch):
    model_servers.start(digits)
    with serving(make_app(api_keys=frozenset({"sesame"}))) as url:
        with triton.InferenceServerClient(url.removeprefix("http://")) as client:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
            for call in (client.get_server_metadata, lambda: client.get_model_metadata("digits")):
                with pytest.raises(InferenceServerException) as raised:
                    call()
                assert raised.value.status() == "401"
            with pytest.raises(InferenceServerException):
                client.infer("digits", [image_input(batch[1][:1])])
            key = {"Authorization": "Bearer sesame"}
            result = client.infer("digits", [image_input(batch[1][:1])], headers=key)
            assert result.as_numpy("probabilities").shape == (1, 10)
        assert "API key" in protocol_error(requests.get(f"{url}/v2", timeout=10), 401)


def test_more_images_than_the_queue_may_ever_hold_is_a_400_not_a_503_to_retry(model_servers, digits, make_app, r):
    model_servers.start(digits)
    with serving(make_app(queue_limit=4)) as url:
        pixels = {"name": "pixels", "datatype": "UINT8", "shape": [5, 8, 8, 1], "data": [0] * 5 * 64}
        assert "N from 1 to 4" in protocol_error(post(url, "digits/infer", {"inputs": [pixels]}), 400)
    assert model_servers.computed == [] and r.llen(wire.ModelKeys("digits", 1).queue) == 0


def test_not_ready_without_model_servers(make_app, r):
    with serving(make_app()) as url:
        with triton.InferenceServerClient(url.removeprefix("http://")) as client:
            assert client.is_server_live() and not client.is_server_ready()
        protocol_error(requests.get(f"{url}/v2/health/ready", timeout=10), 503)


def test_a_request_whose_images_outlast_its_deadline_is_cut_short(model_servers, digits, make_app):
    model_servers.start(digits)
    big = png(solid((90, 90, 90), size=4000))  # 16 megapixels: far more than 10 ms to decode
    with serving(make_app(request_timeout_s=0.01)) as url:
        response = post(url, "digits/infer", {"inputs": [image_tensor([big] * 20)]})
    assert "deadline" in protocol_error(response, 504)
    assert model_servers.computed == []


def test_error_answers_match_the_openapi_document(model_servers, digits, make_app, settings, batch):
    """API keys, the size limit, a model without a live server, then Redis down: each as documented."""
    server = model_servers.start(digits)
    app = make_app(api_keys=frozenset({"sesame"}), max_upload_mb=0.01, request_timeout_s=0.5)
    key = {"Authorization": "Bearer sesame"}
    with serving(app) as url:
        for method, path in [("GET", "/v2"), ("GET", "/v2/models/{name}"), ("POST", "/v2/models/{name}/infer")]:
            response = requests.request(method, url + path.format(name="digits"), json={}, timeout=10)
            conforms(response, path, method, 401)
        too_big = post(url, "digits/infer", {"inputs": [image_tensor([b"\0" * 20_000])]}, **key)
        conforms(too_big, "/v2/models/{name}/infer", "POST", 413)

        model_servers.stop(server)  # digits stays known, with no live server: its jobs wait, then time out
        wait_until(lambda: requests.get(f"{url}/v2/models/digits/ready", timeout=10).status_code == 503, 10, "gone")
        conforms(requests.get(f"{url}/v2/models/digits/ready", timeout=10), "/v2/models/{name}/ready", "GET", 503)
        conforms(requests.get(f"{url}/v2/health/ready", timeout=10), "/v2/health/ready", "GET", 503)
        timed_out = post(url, "digits/infer", {"inputs": [image_tensor(batch[1][:1])]}, **key)
        conforms(timed_out, "/v2/models/{name}/infer", "POST", 504)

    nowhere = connections.connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    with serving(create_app(settings, nowhere, nowhere)) as url:
        for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/health/ready"):
            response = requests.get(url + path.format(name="digits"), timeout=30)
            assert "unavailable" in conforms(response, path, "GET", 503)["error"]
        response = post(url, "digits/infer", {"inputs": [image_tensor(batch[1][:1])]})
        conforms(response, "/v2/models/{name}/infer", "POST", 503)
        assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200


def infer_body(tensor: dict, **request: object) -> bytes:
    return json.dumps({"inputs": [tensor], **request}).encode()


def pixels_tensor(data: object, shape: list[int] | None = None) -> dict:
    return {"name": "pixels", "datatype": "UINT8", "shape": shape or [1, 8, 8, 1], "data": data}


NESTED = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
BINARY_SIZE = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": -4}}
HOSTILE = {
    "not json": (b"\x89PNG\r\n", {}),
    "not utf-8": (b'{"inputs": "\xff"}', {}),
    "a JSON array": (b"[]", {}),
    "nested 100,000 deep": (NESTED, {}),
    "header length not a number": (b"{}", {"Inference-Header-Content-Length": "1_0"}),
    "header length past the body": (b"{}", {"Inference-Header-Content-Length": "99"}),
    "negative binary size": (infer_body(BINARY_SIZE), {}),
    "shape of a trillion": (infer_body(pixels_tensor([1], [10**12, 8, 8, 1])), {}),
    "ragged data": (infer_body(pixels_tensor([[1, 2], [3]])), {}),
    "booleans as pixels": (infer_body(pixels_tensor([True] * 64)), {}),
    "a huge integer": (infer_body(pixels_tensor([10**40] * 64)), {}),
    "text that is no base64": (infer_body({**image_tensor([b"x"]), "data": ["%%%"]}), {}),
    "classification true": (
        infer_body(image_tensor([b"x"]), outputs=[{"name": "probabilities", "parameters": {"classification": True}}]),
        {},
    ),
    "too many images": (infer_body(image_tensor([b"x"] * 1025)), {}),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bodies_get_a_400_and_nothing_is_queued(url, model_servers, r, name):
    body, headers = HOSTILE[name]
    response = requests.post(f"{url}/v2/models/digits/infer", data=body, headers=headers, timeout=60)
    protocol_error(response, 400)
    assert model_servers.computed == [] and r.llen(wire.ModelKeys("digits", 1).queue) == 0
