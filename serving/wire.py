"""The wire format between the web tier and the model servers: Redis key names and message layout.

Everything that crosses Redis is JSON with base64 for pixels, never pickle, so a hostile or
corrupt message can at worst be rejected, not executed.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

_PREFIX = "serving"
QUEUE = f"{_PREFIX}:queue"  # list of jobs: LPUSH by the web tier, popped from the right
MODEL_INFO = f"{_PREFIX}:model"  # JSON ModelInfo, published by each model server at start
SERVERS = f"{_PREFIX}:servers"  # set of model server ids that may hold in-flight jobs
ALIVE = f"{_PREFIX}:alive"  # exists while some model server beat within NO_SERVER_GRACE_S
STATS = f"{_PREFIX}:stats"  # hash of model-server counters, read by the web tier's /metrics


def result_key(request_id: str) -> str:
    return f"{_PREFIX}:result:{request_id}"


def inflight_key(server_id: str) -> str:
    return f"{_PREFIX}:inflight:{server_id}"


def heartbeat_key(server_id: str) -> str:
    return f"{_PREFIX}:heartbeat:{server_id}"


class MalformedMessage(ValueError):
    """A message on the queue that no model server can use."""


@dataclass(frozen=True)
class ModelInfo:
    """What the web tier must know to prepare images: published by the model server."""

    name: str
    height: int
    width: int
    channels: int
    num_classes: int

    def encode(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: str | bytes) -> ModelInfo:
        """Raises MalformedMessage unless raw is a complete ModelInfo; extra keys are ignored."""
        try:
            msg = json.loads(raw)
            return cls(str(msg["name"]), *(int(msg[k]) for k in ("height", "width", "channels", "num_classes")))
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedMessage(f"model info: {type(exc).__name__}: {exc}") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class Job:
    """One image to classify: uint8 pixels already resized to the model's input shape."""

    request_id: str
    pixels: np.ndarray
    deadline: float  # Unix time after which nobody waits for the answer
    top_k: int

    def encode(self) -> str:
        return json.dumps(
            {
                "id": self.request_id,
                "shape": list(self.pixels.shape),
                "dtype": "uint8",
                "data": base64.b64encode(np.ascontiguousarray(self.pixels, np.uint8)).decode(),
                "deadline": self.deadline,
                "top_k": self.top_k,
            }
        )

    @classmethod
    def decode(cls, raw: str | bytes) -> Job:
        """Parse a queue message, raising MalformedMessage for anything but a well-formed job."""
        try:
            msg = json.loads(raw)
            shape = tuple(int(n) for n in msg["shape"])
            if msg["dtype"] != "uint8" or len(shape) != 3 or min(shape) < 1:
                raise MalformedMessage(f"bad dtype/shape {msg['dtype']!r} {shape}")
            data = base64.b64decode(msg["data"], validate=True)
            pixels = np.frombuffer(data, np.uint8).reshape(shape)
            return cls(str(msg["id"]), pixels, float(msg["deadline"]), int(msg["top_k"]))
        except MalformedMessage:
            raise
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise MalformedMessage(f"{type(exc).__name__}: {exc}") from None


Prediction = dict  # {"label": str, "probability": float}


def encode_result(predictions: list[Prediction]) -> str:
    return json.dumps({"predictions": predictions})


def encode_failure(message: str) -> str:
    return json.dumps({"error": message})


def decode_result(raw: str | bytes) -> dict:
    """Either {"predictions": [...]} or {"error": "..."}; anything else reads as an error."""
    try:
        msg = json.loads(raw)
    except ValueError:
        msg = None
    if isinstance(msg, dict) and (isinstance(msg.get("predictions"), list) or "error" in msg):
        return msg
    return {"error": "the model server's answer could not be read"}
