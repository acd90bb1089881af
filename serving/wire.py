"""The wire format between the web tier and the model servers: Redis key names and every message.

Everything that crosses Redis is JSON with base64 for binary data, never pickle, so a hostile or
corrupt entry can at worst be rejected, not executed. Every key of one model version carries the
hash tag {name:version}: a script or transaction touches one model's keys only, so they all sit
in one Redis Cluster slot.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

import numpy as np
import orjson
import pybase64

PREFIX = "serving"
# Sorted set of "name:version" -> Redis time (s) of the last heartbeat of any of its model servers.
MODELS = f"{PREFIX}:models"
# Sorted set of "name:version" -> Redis time (s) until which a model server of it counts as loading its model.
STARTING = f"{PREFIX}:starting"


class MalformedMessage(ValueError):
    """An entry in Redis that does not hold what its key promises."""


@dataclass(frozen=True, order=True)
class ModelKeys:
    """The Redis keys of one model version."""

    name: str
    version: int

    @property
    def member(self) -> str:
        """How MODELS names this version."""
        return f"{self.name}:{self.version}"

    @property
    def named(self) -> str:
        """How messages to people name this version: "digits version 2"."""
        return f"{self.name} version {self.version}"

    @classmethod
    def from_member(cls, member: str | bytes) -> ModelKeys:
        text = member.decode() if isinstance(member, bytes) else member
        name, _, version = text.rpartition(":")
        if not name or not version.isdigit():
            raise MalformedMessage(f"model registry entry {text!r}")
        return cls(name, int(version))

    def _key(self, *parts: str) -> str:
        return ":".join((PREFIX, f"{{{self.member}}}", *parts))

    @property
    def queue(self) -> str:
        """List of jobs: pushed on the left by the web tier, taken from the right."""
        return self._key("queue")

    @property
    def info(self) -> str:
        """JSON ModelInfo, published by every model server of this version."""
        return self._key("info")

    @property
    def servers(self) -> str:
        """Set of the ids of model servers that may hold jobs of this version."""
        return self._key("servers")

    @property
    def alive(self) -> str:
        """Exists while some model server of this version beat within NO_SERVER_GRACE_S."""
        return self._key("alive")

    @property
    def stats(self) -> str:
        """Hash of the model servers' counters and histograms, read by /metrics."""
        return self._key("stats")

    @property
    def speeds(self) -> str:
        """Hash of server id -> JSON Speed, published by each model server every heartbeat."""
        return self._key("speeds")

    def heartbeat(self, server_id: str) -> str:
        return self._key("heartbeat", server_id)

    def inflight(self, server_id: str, slot: int) -> str:
        """The jobs a model server has taken for one of its batches and not answered yet."""
        return self._key("inflight", server_id, str(slot))

    def inbox(self, worker_id: str) -> str:
        """Stream of answers for the requests of one web worker: an entry per batch (inbox_entry)."""
        return self._key("inbox", worker_id)


def inbox_entry(answers: list[str]) -> dict[str, str]:
    """One batch's encoded Results for one web worker as the fields of one inbox entry, named by position."""
    return {str(n): answer for n, answer in enumerate(answers)}


@dataclass(frozen=True)
class ModelInfo:
    """What the web tier must know to prepare images and read answers: published by the model server."""

    name: str
    version: int
    height: int
    width: int
    channels: int
    labels: tuple[str, ...]
    bgr: bool = False  # the model takes its three channels in BGR order (zoo.takes_bgr): the web tier packs them so

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def encode(self) -> str:
        return json.dumps({**self.__dict__, "labels": list(self.labels)})

    @classmethod
    def decode(cls, raw: str | bytes) -> ModelInfo:
        """Raises MalformedMessage unless raw is a complete ModelInfo; extra keys are ignored."""
        try:
            msg = json.loads(raw)
            sizes = (int(msg[k]) for k in ("version", "height", "width", "channels"))
            labels = tuple(str(label) for label in msg["labels"])
            info = cls(str(msg["name"]), *sizes, labels=labels, bgr=msg.get("bgr", False))
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedMessage(f"model info: {type(exc).__name__}: {exc}") from None
        if min(info.shape) < 1 or not labels or not isinstance(info.bgr, bool):
            raise MalformedMessage(f"model info: shape {info.shape} with {len(labels)} labels, bgr {info.bgr!r:.40}")
        return info


@dataclass(frozen=True)
class Speed:
    """How fast one model server is, as it measured itself: what the web tier's admission reads.

    A full batch every batch_seconds[batch_size] is the server's throughput (the server takes and
    answers batches while the next one computes); a job's answer comes about batch_seconds[n] +
    extra_seconds after the start of its batch of n. The keys are the server's allowed batch
    sizes (batch_size among them): a batch of fewer images is padded to the next one.
    """

    batch_size: int  # the most images it puts into one predict
    batch_seconds: dict[int, float]  # allowed batch size -> moving estimate of one predict's time
    extra_seconds: float = 0.0  # moving estimate of a batch's time outside predict (take, decode, answer)

    def encode(self) -> str:
        return json.dumps(
            {"batch_size": self.batch_size, "batch_seconds": self.batch_seconds, "extra_seconds": self.extra_seconds}
        )

    @classmethod
    def decode(cls, raw: str | bytes) -> Speed:
        try:
            msg = json.loads(raw)
            seconds = {int(size): float(s) for size, s in msg["batch_seconds"].items()}
            speed = cls(int(msg["batch_size"]), seconds, float(msg.get("extra_seconds", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedMessage(f"speed: {type(exc).__name__}: {exc}") from None
        if speed.batch_size < 1 or speed.extra_seconds < 0 or any(n < 1 or s <= 0 for n, s in seconds.items()):
            raise MalformedMessage(f"speed: {msg!r:.200}")
        return speed


@dataclass(frozen=True)
class Job:
    """One image to classify: uint8 pixels already resized to the model's input shape."""

    request_id: str
    reply_to: str  # the id of the web worker whose inbox gets the answer
    pixels: np.ndarray
    deadline: float  # Redis' clock (serving.clock), after which nobody waits for the answer
    top_k: int | None  # None: the probability of every class, in class order
    bgr: bool = False  # the pixels' channels are in BGR order (ModelInfo.bgr), else RGB (or one gray channel)

    def encode(self) -> bytes:
        """The web tier's hot path, as decode is the model server's: orjson and pybase64 take 23 us for
        a 224x224 RGB job where json and base64 took 544 us (json.dumps scans every base64 character)."""
        return orjson.dumps(
            {
                "id": self.request_id,
                "reply_to": self.reply_to,
                "shape": list(self.pixels.shape),
                "dtype": _DTYPES[self.bgr],
                "data": pybase64.b64encode(np.ascontiguousarray(self.pixels, np.uint8)).decode("ascii"),
                "deadline": self.deadline,
                "top_k": self.top_k,
            }
        )

    @classmethod
    def decode(cls, raw: str | bytes) -> Job:
        """Parse a queue message, raising MalformedMessage for anything but a well-formed job.

        The model server's hot path. A JSON parser scans and copies every base64 character (orjson: 56
        of the 70 us a 224x224 RGB job took), so a message that starts as `encode` writes it is parsed
        without its pixels, which pybase64 (SIMD) decodes from where they lie: 15 us in all. Anything
        that path does not take is parsed whole, as any JSON, and judged the same way.
        """
        head = _ENCODED_HEAD.match(raw) if isinstance(raw, bytes) else None
        if head:
            try:
                return cls._of(*_fields_and_pixels(raw, head.end()))
            except _PARSE_ERRORS:
                pass  # parsed whole below, which says what is wrong with it
        try:
            msg = orjson.loads(raw)
            return cls._of(msg, msg["data"])
        except MalformedMessage:
            raise
        except _PARSE_ERRORS as exc:
            raise MalformedMessage(f"{type(exc).__name__}: {exc}") from None

    @classmethod
    def _of(cls, msg: dict, data: str | memoryview) -> Job:
        shape = tuple(int(n) for n in msg["shape"])
        if msg["dtype"] not in _DTYPES.values() or len(shape) != 3 or min(shape) < 1:
            raise MalformedMessage(f"bad dtype/shape {msg['dtype']!r} {shape}")
        pixels = np.frombuffer(pybase64.b64decode(data, validate=True), np.uint8).reshape(shape)
        top_k = None if msg["top_k"] is None else int(msg["top_k"])
        bgr = msg["dtype"] == _DTYPES[True]
        return cls(str(msg["id"]), str(msg["reply_to"]), pixels, float(msg["deadline"]), top_k, bgr)


_PARSE_ERRORS = (MalformedMessage, ValueError, KeyError, TypeError, binascii.Error)
# A job's pixels by their channel order (Job.bgr). BGR is a dtype of its own, not a key: a model server that
# predates BGR jobs ignores keys it does not know, and answered a BGR job for the colour-swapped image (seen
# by a probe in a rolling upgrade), where it refuses an unknown dtype as malformed. RGB jobs are written as before.
_DTYPES = {False: "uint8", True: "uint8-bgr"}
# How Job.encode starts a message, up to the first character of its base64 pixels. Each string before
# them is free of quotes and escapes, so the match ends inside the top-level "data" value and nowhere else.
_ENCODED_HEAD = re.compile(
    rb'\{"id":"[^"\\]*","reply_to":"[^"\\]*","shape":\[\d+,\d+,\d+\],"dtype":"uint8(?:-bgr)?","data":"'
)


def _fields_and_pixels(raw: bytes, start: int) -> tuple[dict, memoryview]:
    """A message's fields with "data" parsed as "", and its base64 pixels (from `start` to the next quote:
    b64decode's validation refuses an escape within them)."""
    end = raw.index(b'"', start)
    msg = orjson.loads(raw[:start] + raw[end:])
    if msg["data"] != "":  # a second "data" key, which a JSON parser lets win
        raise MalformedMessage("two pixel fields")
    return msg, memoryview(raw)[start:end]


def reply_address(raw: str | bytes) -> tuple[str, str] | None:
    """(request id, reply_to) of a message that may be malformed otherwise; None if it has neither."""
    try:
        msg = orjson.loads(raw)
        return str(msg["id"]), str(msg["reply_to"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Result:
    """The model tier's answer to one job: its top classes, every probability, or why it failed."""

    request_id: str
    top: tuple[tuple[int, float], ...] = ()  # (class index, probability), most probable first
    probabilities: np.ndarray | None = None  # float32, every class in class order
    error_code: str = ""  # "late", "model_changed", "malformed" or "model_error"
    error: str = ""

    def encode(self) -> str:
        msg: dict[str, object] = {"id": self.request_id}
        if self.error_code:
            msg["error"] = {"code": self.error_code, "message": self.error}
        elif self.probabilities is not None:
            msg["probabilities"] = base64.b64encode(np.ascontiguousarray(self.probabilities, "<f4")).decode()
        else:
            msg["top"] = [[index, probability] for index, probability in self.top]
        return json.dumps(msg)

    @classmethod
    def decode(cls, raw: str | bytes) -> Result:
        """Raises MalformedMessage unless raw names its request; an unreadable body reads as an error."""
        try:
            msg = json.loads(raw)
            request_id = str(msg["id"])
        except (ValueError, KeyError, TypeError):
            raise MalformedMessage("an answer without a request id") from None
        try:
            if "error" in msg:
                return cls(request_id, error_code=str(msg["error"]["code"]), error=str(msg["error"]["message"]))
            if "probabilities" in msg:
                data = base64.b64decode(msg["probabilities"], validate=True)
                return cls(request_id, probabilities=np.frombuffer(data, "<f4"))
            return cls(request_id, top=tuple((int(i), float(p)) for i, p in msg["top"]))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return cls(request_id, error_code="model_error", error=f"unreadable answer: {type(exc).__name__}")
