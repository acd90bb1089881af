"""Tensors in the Open Inference Protocol's HTTP bodies: reading an inference request, writing its response.

A body is one JSON object, followed, when some tensors travel as binary data (the binary tensor data
extension), by their bytes in the order the JSON lists them; the header Inference-Header-Content-Length
gives the JSON's length. Binary data is row-major and little-endian; a BYTES element is a 4-byte
length followed by its bytes. Only the datatypes this server takes are read (BYTES, UINT8) and
written (BYTES, FP32). Knows nothing of HTTP or models: what is wrong raises BadTensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# The most dimensions a tensor may have here; more is no image batch.
_MAX_DIMS = 8


class BadTensor(ValueError):
    """The body breaks the protocol; the message says how, for the client."""


@dataclass(frozen=True)
class Input:
    name: str
    datatype: str  # "BYTES" or "UINT8"
    shape: tuple[int, ...]
    data: list[str | bytes] | np.ndarray  # BYTES: its elements (str from JSON, bytes from binary); UINT8: `shape`


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int  # k > 0: the k most probable classes instead of the tensor
    binary: bool | None  # None: as the request's binary_data_output says


@dataclass(frozen=True)
class InferenceRequest:
    id: str | None
    inputs: list[Input]
    outputs: list[RequestedOutput]  # empty: every output, with default settings
    binary_output: bool  # the request's "binary_data_output" parameter


@dataclass(frozen=True)
class Output:
    """A tensor to answer with: FP32 as a float32 array, BYTES as an array of str."""

    name: str
    datatype: str
    values: np.ndarray


def read_request(body: bytes, header_length: str | None) -> InferenceRequest:
    """The inference request in `body`; header_length is the Inference-Header-Content-Length header, if any."""
    header, binary = _split(body, header_length)
    try:
        message = json.loads(header)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise BadTensor("the body must start with a JSON object (the inference request)") from None
    if not isinstance(message, dict):
        raise BadTensor('the inference request must be a JSON object: {"inputs": [...]}')
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadTensor('"id" must be a string')
    inputs = _inputs(message.get("inputs"), binary)
    outputs = message.get("outputs")  # absent or null: the default output
    outputs = [_requested_output(raw) for raw in _list([] if outputs is None else outputs, '"outputs"')]
    binary_output = _flag(_parameters(message), "binary_data_output", "the request")
    return InferenceRequest(request_id, inputs, outputs, bool(binary_output))


def write_response(header: dict, outputs: list[tuple[Output, bool]]) -> tuple[bytes, dict[str, str]]:
    """The response body and its content headers: `header` with every (output, as binary data) in it."""
    described, chunks = [], []
    for output, binary in outputs:
        tensor = {"name": output.name, "datatype": output.datatype, "shape": list(output.values.shape)}
        if binary:
            chunks.append(_to_binary(output))
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = output.values.ravel().tolist()
        described.append(tensor)
    text = json.dumps({**header, "outputs": described}).encode()
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *chunks]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > len(body):
        raise BadTensor(f"{HEADER_LENGTH} must be the length of the JSON at the start of the body, not {text!r:.40}")
    return body[: int(text)], body[int(text) :]


def _inputs(raw: object, binary: bytes) -> list[Input]:
    inputs, offset = [], 0
    for tensor in _list(raw, '"inputs"'):
        size = _binary_size(tensor)
        if size is not None and offset + size > len(binary):
            raise BadTensor(f"binary data of {size} bytes announced, {len(binary) - offset} left in the body")
        chunk = None if size is None else binary[offset : offset + size]
        inputs.append(_input(tensor, chunk))
        offset += size or 0
    if not inputs:
        raise BadTensor('"inputs" must list the input tensors')
    if offset != len(binary):
        raise BadTensor(f"{len(binary) - offset} bytes after the JSON that no input's binary_data_size covers")
    return inputs


def _input(tensor: dict, chunk: bytes | None) -> Input:
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if not isinstance(name, str):
        raise BadTensor(f'each input needs a "name" string, not {name!r:.40}')
    if datatype not in ("BYTES", "UINT8"):
        raise BadTensor(f'input {name!r:.40} needs a "datatype" of BYTES or UINT8, not {datatype!r:.40}')
    shape = _shape(tensor.get("shape"), name)
    if chunk is None and "data" not in tensor:
        raise BadTensor(f'input {name!r} has neither "data" nor binary data')
    if chunk is not None and "data" in tensor:  # which would count is a guess: told, not guessed
        raise BadTensor(f'input {name!r} has both "data" and binary data (binary_data_size): send one')
    if datatype == "BYTES":
        elements = _bytes_elements(chunk) if chunk is not None else _strings(tensor["data"], name)
        data: list[str | bytes] | np.ndarray = elements
        count = len(elements)
    else:
        data = _uint8(chunk if chunk is not None else tensor["data"], name)
        count = data.size
    if count != math.prod(shape):
        raise BadTensor(f"input {name!r} has {count} elements, but its shape {list(shape)} holds {math.prod(shape)}")
    return Input(name, datatype, shape, data if datatype == "BYTES" else data.reshape(shape))


def _shape(raw: object, name: str) -> tuple[int, ...]:
    dims = raw if isinstance(raw, list) and len(raw) <= _MAX_DIMS else None
    if dims is None or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims):
        raise BadTensor(f'input {name!r} needs a "shape": a list of up to {_MAX_DIMS} whole numbers')
    return tuple(dims)


def _bytes_elements(chunk: bytes) -> list[bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(chunk):
        if at + _LENGTH.size > len(chunk):
            raise BadTensor("a BYTES element's 4-byte length is cut off")
        (length,) = _LENGTH.unpack_from(chunk, at)
        at += _LENGTH.size
        if at + length > len(chunk):
            raise BadTensor(f"a BYTES element of {length} bytes runs past its tensor's binary data")
        elements.append(chunk[at : at + length])
        at += length
    return elements


def _strings(data: object, name: str) -> list[str]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise BadTensor(f'input {name!r}: BYTES "data" must be a list of strings')
    return data


def _uint8(data: object, name: str) -> np.ndarray:
    """UINT8 from binary bytes or from JSON numbers (flat or nested), checked to be whole numbers 0 to 255."""
    if isinstance(data, bytes):
        return np.frombuffer(data, np.uint8)
    try:
        values = np.asarray(data) if isinstance(data, list) else None
    except ValueError:  # ragged nesting, or deeper than numpy takes
        values = None
    if values is None or (values.size and values.dtype.kind not in "iu") or not _within(values, 0, 255):
        raise BadTensor(f'input {name!r}: UINT8 "data" must be a list of whole numbers from 0 to 255')
    return values.astype(np.uint8).ravel()


def _within(values: np.ndarray, low: int, high: int) -> bool:
    return not values.size or (int(values.min()) >= low and int(values.max()) <= high)


def _requested_output(raw: object) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise BadTensor('each requested output needs a "name"')
    parameters = _parameters(raw)
    k = parameters.get("classification")
    k = 0 if k is None else k  # null is absent, as everywhere in the protocol's JSON
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise BadTensor(f'"classification" must be a whole number of classes, not {k!r:.40}')
    return RequestedOutput(raw["name"], k, _flag(parameters, "binary_data", f"output {raw['name']!r}"))


def _binary_size(tensor: object) -> int | None:
    if not isinstance(tensor, dict):
        raise BadTensor("each input must be a JSON object")
    size = _parameters(tensor).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise BadTensor(f'"binary_data_size" must be a whole number of bytes, not {size!r:.40}')
    return size


def _parameters(message: dict) -> dict:
    parameters = message.get("parameters")
    if parameters is None:  # absent or null
        return {}
    if not isinstance(parameters, dict):
        raise BadTensor('"parameters" must be a JSON object')
    return parameters


def _flag(parameters: dict, name: str, where: str) -> bool | None:
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadTensor(f"{where}: {name!r} must be true or false")
    return value


def _list(raw: object, what: str) -> list:
    if not isinstance(raw, list):
        raise BadTensor(f"{what} must be a list")
    return raw


def _to_binary(output: Output) -> bytes:
    if output.datatype == "FP32":
        return np.ascontiguousarray(output.values, "<f4").tobytes()
    encoded = [value.encode() for value in output.values.ravel()]
    return b"".join(_LENGTH.pack(len(value)) + value for value in encoded)
