"""The Open Inference Protocol (KServe v2) over HTTP: health, server and model metadata, and infer.

Its stock clients (tritonclient.http, KServe's) work unchanged. The models are the catalog's, as for
/predict; versions are strings here ("1", "2"), and a request without one goes where /predict's
would: to the highest version with a live model server. A model has one input, sent as either
- "image": BYTES [N], each element an image file (base64 in JSON, the raw file as binary data), or
- "pixels": UINT8 [N, height, width, channels], already at the model's input size,
and one output, "probabilities": FP32 [N, classes], or with the classification extension BYTES [N, k]
of "score:index:label", most probable first. The N images of a request are N jobs, queued at once.
Errors answer {"error": message} (serving.errors renders them so for every path under /v2).
"""

from __future__ import annotations

import time

import numpy as np
from flask import Blueprint, Response, g, jsonify, request

from serving import tensors, wire
from serving.dispatch import admit_early, find, infer, pixels_of, resolve, routed
from serving.errors import ApiError
from serving.registry import ModelState
from serving.upload import TIMEOUT_HEADER, b64decode, parse_timeout, parse_version, read_body
from serving.webtier import arrival, public, tier

PREFIX = "/v2"
v2 = Blueprint("v2", __name__, url_prefix=PREFIX)

SERVER = {"name": "keras-serving", "version": "1.0.0", "extensions": ["classification", "binary_tensor_data"]}
IMAGE, PIXELS, PROBABILITIES = "image", "pixels", "probabilities"
# Images in one request: all go into the queue in one atomic submit, whose Lua script cannot unpack
# more than about 8,000 jobs, and whose decoding holds one web worker.
MAX_IMAGES = 1024


def error_shape(code: str, message: str) -> dict:
    """The protocol's error body; the machine code stays in the logs and the status."""
    return {"error": message}


@v2.get("")
def server_metadata() -> Response:
    return jsonify(SERVER)


@v2.get("/health/live")
@public
def live() -> Response:
    return jsonify(live=True)


@v2.get("/health/ready")
@public
def ready() -> Response:
    """Ready while some model has a live server, as GET /ready: the web tier can serve."""
    catalog = tier().catalog
    if not any(state.ready for state in catalog.read()):
        raise ApiError(503, "unavailable", catalog.why_none_ready(), {"Retry-After": "1"})
    return jsonify(ready=True)


@v2.get("/models/<name>")
@v2.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    info = _resolve(name, version).info
    versions = _versions(info.name)
    image = {"name": IMAGE, "datatype": "BYTES", "shape": [-1]}
    pixels = {"name": PIXELS, "datatype": "UINT8", "shape": [-1, *info.shape]}
    probabilities = {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, info.num_classes]}
    return jsonify(name=info.name, versions=versions, platform="keras", inputs=[image, pixels], outputs=[probabilities])


@v2.get("/models/<name>/ready")
@v2.get("/models/<name>/versions/<version>/ready")
@public
def model_ready(name: str, version: str | None = None) -> Response:
    model = _resolve(name, version)
    if not model.ready:
        message = f"{model.keys.named} has no live model server"
        raise ApiError(503, "unavailable", message, {"Retry-After": "1"})
    return jsonify(name=model.keys.name, ready=True)


@v2.post("/models/<name>/infer")
@v2.post("/models/<name>/versions/<version>/infer")
def model_infer(name: str, version: str | None = None) -> Response:
    t = tier()
    # The protocol has no timeout of its own here: the header /predict takes may shorten REQUEST_TIMEOUT_S.
    timeout_s = parse_timeout(t.settings.request_timeout_s, header=request.headers.get(TIMEOUT_HEADER))
    deadline = arrival() + timeout_s  # decoding counts too
    # The URL first: an unknown model is a 404 whatever the body holds.
    _check_version(name, version)
    return routed(name, version, lambda model, movable: _inferred(model, deadline, timeout_s, movable))


def _resolve(name: str, version: str | None) -> ModelState:
    """The model version a path names (dispatch.resolve, after _check_version)."""
    _check_version(name, version)
    return resolve(name, version)


def _check_version(name: str, version: str | None) -> None:
    """The protocol's versions are strings: one that is no version number here ("two", "0") is an unknown
    version (404), where /predict's `version` option would be a 400; of an unknown model, a 404 saying so."""
    if version is None:
        return
    try:
        parse_version(version)
    except ApiError:
        find(name, None)  # of an unknown model, its own 404
        message = f"model {name!r} has no version {version!r:.40}; its versions are: {', '.join(_versions(name))}"
        raise ApiError(404, "unknown_model", message) from None


def _versions(name: str) -> list[str]:
    return [str(state.keys.version) for state in tier().catalog.states() if state.keys.name == name]


def _inferred(model: ModelState, deadline: float, timeout_s: float, movable: bool) -> Response:
    body = _read(read_body(request), request.headers.get(tensors.HEADER_LENGTH))
    wanted = _requested(body, model.info)
    tensor = _input(body.inputs, model.info)
    admit_early(model, len(tensor.data), deadline, timeout_s)  # before decoding
    pixels = _pixels(tensor, model.info, deadline)
    results = infer(model, pixels, wanted.classification or None, deadline, timeout_s, movable)
    output = _classes(results, model.info) if wanted.classification else _probabilities(results)
    request_id = g.request_id if body.id is None else body.id  # echoed as given, "" too
    header = {"model_name": model.keys.name, "model_version": str(model.keys.version), "id": request_id}
    payload, headers = tensors.write_response(header, [(output, bool(wanted.binary))])
    return Response(payload, headers=headers)


def _read(body: bytes, header_length: str | None) -> tensors.InferenceRequest:
    try:
        return tensors.read_request(body, header_length)
    except tensors.BadTensor as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def _requested(body: tensors.InferenceRequest, info: wire.ModelInfo) -> tensors.RequestedOutput:
    """The one output to answer with: the request's, or "probabilities" with its defaults."""
    if not body.outputs:
        return tensors.RequestedOutput(PROBABILITIES, 0, body.binary_output)
    (wanted, *more) = body.outputs
    if more or wanted.name != PROBABILITIES:
        raise ApiError(400, "bad_request", f"the model has one output, {PROBABILITIES!r}: request it once, or none")
    if wanted.classification > info.num_classes:
        message = f"classification must be from 1 to the model's {info.num_classes} classes"
        raise ApiError(400, "bad_request", message)
    binary = body.binary_output if wanted.binary is None else wanted.binary
    return tensors.RequestedOutput(wanted.name, wanted.classification, binary)


def _input(inputs: list[tensors.Input], info: wire.ModelInfo) -> tensors.Input:
    """The request's one input tensor, of a datatype and shape the model takes, or a 400 saying what to send."""
    (tensor, *more) = inputs
    datatype, trailing = {IMAGE: ("BYTES", ()), PIXELS: ("UINT8", info.shape)}.get(tensor.name, ("", ()))
    images = tensor.shape[0] if tensor.shape else 0
    most = min(MAX_IMAGES, tier().settings.queue_limit)  # more could never be queued: no "retry later"
    if more or tensor.datatype != datatype or tensor.shape[1:] != trailing or not 0 < images <= most:
        pixels = f"[N, {', '.join(map(str, info.shape))}]"
        got = ", ".join(f"{i.name!r:.40} {i.datatype} {list(i.shape)}" for i in inputs[:3])
        message = f"send one input, {IMAGE!r} BYTES [N] (image files) or {PIXELS!r} UINT8 {pixels}"
        raise ApiError(400, "bad_request", f"{message}, N from 1 to {most}; got {got}")
    return tensor


def _pixels(tensor: tensors.Input, info: wire.ModelInfo, deadline: float) -> list[np.ndarray]:
    """The input's images at the model's input size, in its channel order (clients send RGB)."""
    if tensor.datatype == "UINT8":
        return [image[..., ::-1] if info.bgr else image for image in tensor.data]
    return [_decoded(n, element, info, deadline) for n, element in enumerate(tensor.data)]


def _decoded(n: int, element: str | bytes, info: wire.ModelInfo, deadline: float) -> np.ndarray:
    # Between images, the worker's other requests get their turn (gevent's time.sleep): up to 1,024 big images
    # of one request held them all until its deadline.
    time.sleep(0)
    if tier().clock.now() > deadline:  # a request of many big images must not hold the worker past its deadline
        raise ApiError(504, "timeout", f"decoding the images took past the request's deadline, at image {n}")
    try:
        return pixels_of(b64decode(element) if isinstance(element, str) else element, info)
    except ApiError as exc:
        raise ApiError(exc.status, exc.code, f"image {n}: {exc.message}") from None


def _probabilities(results: list[wire.Result]) -> tensors.Output:
    return tensors.Output(PROBABILITIES, "FP32", np.stack([result.probabilities for result in results]))


def _classes(results: list[wire.Result], info: wire.ModelInfo) -> tensors.Output:
    """The classification extension's "score:index:label" strings, most probable first."""
    # The score as the FP32 output would carry it: the shortest text that reads back as that float32.
    rows = [[f"{np.float32(p)!s}:{i}:{info.labels[i]}" for i, p in result.top] for result in results]
    return tensors.Output(PROBABILITIES, "BYTES", np.array(rows, dtype=object))
