"""The models we serve: how to load each, its preprocessing and its class names.

Only the model server imports this module (it imports Keras); the web tier learns what it needs
from the ModelInfo the model server publishes. A loaded model is wrapped in one that takes uint8
pixels and does the cast and the ImageNet arithmetic itself, so the host hands the accelerator one
byte a pixel and the accelerator, not numpy, does the arithmetic.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.wire import ModelInfo

_HERE = pathlib.Path(__file__).resolve().parent
REPO = _HERE.parent
IMAGENET_CLASSES = _HERE / "data" / "imagenet_classes.txt"
DIGITS = REPO / "models" / "digits.keras"

PREPROCESS_MODES = ("caffe", "tf", "torch", "none")
# keras.applications.imagenet_utils' constants: caffe subtracts BGR means; torch scales to [0, 1] and standardizes.
_CAFFE_BGR_MEAN = np.array((103.939, 116.779, 123.68))
_TORCH_MEAN = np.array((0.485, 0.456, 0.406))
_TORCH_STD = np.array((0.229, 0.224, 0.225))
# The same arithmetic as x * scale + offset per channel (caffe's on pixels in BGR order).
_AFFINE = {
    "caffe": (1.0, -_CAFFE_BGR_MEAN),
    "tf": (1 / 127.5, -1.0),
    "torch": (1 / (255.0 * _TORCH_STD), -_TORCH_MEAN / _TORCH_STD),
}


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded; the message tells a person what to do."""


@dataclass(frozen=True)
class _App:
    """A keras.applications model: constructor name, ImageNet preprocessing, weights file name."""

    constructor: str
    preprocess: str
    weights_file: str


# The weights file names are what keras.applications caches under ~/.keras/models.
APPLICATIONS = {
    "resnet50": _App("ResNet50", "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
    "mobilenet_v2": _App("MobileNetV2", "tf", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"),
    "efficientnet_b0": _App("EfficientNetB0", "none", "efficientnetb0.h5"),
}


class Servable(Protocol):
    """What a model server serves: a model's published info and its batched predict."""

    info: ModelInfo

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (len(batch), num_classes), for a uint8 batch of info.shape images (in BGR
        order if info.bgr)."""
        ...


@dataclass
class KerasServable:
    """A loaded Keras model ready to classify uint8 image batches."""

    info: ModelInfo
    model: object  # the keras.Model as loaded: float input, preprocessed as `preprocess` says
    preprocess: str  # one of PREPROCESS_MODES
    served: object = field(init=False)  # what predict runs: `model` behind a uint8 input, preprocessing inside

    def __post_init__(self) -> None:
        self.served = with_uint8_input(self.model, self.preprocess)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = np.asarray(self.served.predict_on_batch(batch), np.float64)
        return _as_probabilities(out)


def load(
    model: str, weights: str = "imagenet", labels: str = "", preprocess: str = "", name: str = "", version: int = 1
) -> KerasServable:
    """Load a zoo model by name, or a .keras/.h5 file by path, to serve as `name` (default: model) `version`."""
    if (model in APPLICATIONS or model == "digits") and (labels or preprocess):
        raise ModelUnavailable(f"LABELS and PREPROCESS are for a model file; MODEL={model} comes with its own")
    if model in APPLICATIONS:
        keras_model, mode, names = _load_application(model, weights), APPLICATIONS[model].preprocess, _imagenet_labels()
    elif model == "digits":
        keras_model, mode, names = _load_file(DIGITS), "none", [str(d) for d in range(10)]
    elif model.endswith((".keras", ".h5")):
        keras_model = _load_file(pathlib.Path(model))
        mode, names = preprocess or "none", _file_labels(labels, _classes(keras_model))
    else:
        raise ModelUnavailable(
            f"unknown MODEL {model!r}: use one of {', '.join([*APPLICATIONS, 'digits'])} or a path to a .keras/.h5 file"
        )
    info = _model_info(name or model, version, keras_model, names, takes_bgr(mode))
    return KerasServable(info, keras_model, mode)


def _load_application(name: str, weights: str) -> object:
    import keras

    app = APPLICATIONS[name]
    cached = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras")) / "models" / app.weights_file
    if weights != "imagenet" and not pathlib.Path(weights).is_file():
        raise ModelUnavailable(f"MODEL_WEIGHTS={weights} is not a file")
    try:
        return getattr(keras.applications, app.constructor)(weights=weights)
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        raise ModelUnavailable(
            f"could not load the ImageNet weights for {name} ({exc}).\n"
            f"Keras looks for {cached}; on a machine with internet it downloads them there once.\n"
            f"Offline, copy {app.weights_file} to that path or point MODEL_WEIGHTS=/path/to/{app.weights_file},\n"
            "or run the small model shipped in the repo: MODEL=digits"
        ) from None


def _load_file(path: pathlib.Path) -> object:
    import keras

    if not path.is_file():
        raise ModelUnavailable(f"model file {path} does not exist")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras says "File not found" of a file that is there but no model
        raise ModelUnavailable(f"{path} is not a Keras model file Keras can read (.keras or .h5): {exc}") from None


def _imagenet_labels() -> list[str]:
    return IMAGENET_CLASSES.read_text().splitlines()


def _file_labels(path: str, num_classes: int) -> list[str]:
    if not path:
        return [str(i) for i in range(num_classes)]
    try:
        names = [line.strip() for line in pathlib.Path(path).read_text().rstrip().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelUnavailable(f"LABELS={path} cannot be read as text: {exc}") from None
    if "" in names:  # skipped, it would shift every later class onto the wrong name
        raise ModelUnavailable(f"LABELS={path}: line {names.index('') + 1} is empty; give one class name a line")
    if len(names) != num_classes:
        raise ModelUnavailable(f"LABELS={path} has {len(names)} names but the model has {num_classes} classes")
    return names


def _classes(model: object) -> int:
    """How many classes the model tells apart: it scores each image once; a single score is a binary classifier's."""
    shape = model.output_shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and shape[1]):
        raise ModelUnavailable(
            f"the model must output one vector of class scores per image, shape (batch, classes); its output is {shape}"
        )
    return max(2, shape[1])


def _model_info(name: str, version: int, model: object, labels: list[str], bgr: bool) -> ModelInfo:
    if not (isinstance(model.input_shape, tuple) and len(model.input_shape) == 4):
        raise ModelUnavailable(
            "the model must take one batch of images, shape (batch, height, width, channels); "
            f"its input is {model.input_shape}"
        )
    _, height, width, channels = model.input_shape
    if None in (height, width, channels):
        raise ModelUnavailable(f"the model's input shape {model.input_shape} must be fixed (height, width, channels)")
    if channels not in (1, 3):
        raise ModelUnavailable(f"the model takes {channels} channels; only 1 (grayscale) or 3 (RGB) are supported")
    return ModelInfo(name, version, height, width, channels, tuple(labels), bgr)


def takes_bgr(mode: str) -> bool:
    """Whether with_uint8_input(model, mode) takes its pixels in BGR order: caffe's, which Keras gets by flipping
    RGB. Packing BGR costs Pillow nothing; flipping in the graph cost 40% of near_free's predict on this CPU."""
    return mode == "caffe"


def with_uint8_input(model: object, mode: str) -> object:
    """`model` behind a uint8 input: the cast and PREPROCESS arithmetic run inside the compiled graph.

    Computes what keras.applications.imagenet_utils.preprocess_input does in numpy, in keras.ops, so
    it runs on any backend and on the accelerator; except that it takes pixels already in the order
    that preprocessing would put them in (takes_bgr).
    """
    import keras
    from keras import ops

    if mode not in PREPROCESS_MODES:
        raise ModelUnavailable(f"PREPROCESS={mode!r}: use one of {', '.join(PREPROCESS_MODES)}")
    if mode != "none" and model.input_shape[-1] != 3:
        raise ModelUnavailable(f"PREPROCESS={mode} is ImageNet's RGB arithmetic; this model takes 1 channel")
    shape = model.input_shape[1:]
    pixels = keras.Input(shape, dtype="uint8", name="pixels")
    x = ops.cast(pixels, "float32")
    if mode != "none":
        scale, offset = _AFFINE[mode]
        x = x * _per_pixel(scale, shape) + _per_pixel(offset, shape)
    return keras.Model(pixels, model(x), name=f"{model.name}_uint8")


def _per_pixel(value: float | np.ndarray, shape: tuple[int, ...]) -> np.float32 | np.ndarray:
    """A per-channel constant as one of the image's whole shape: TensorFlow, and XLA on a CPU, broadcast a
    3-vector over a batch slowly (near_free's predict at batch 64, caffe: 2,200 images/s with the vector, 3,800
    like this; torch 1,300 and 5,300). A scalar stays one."""
    if np.ndim(value) == 0:
        return np.float32(value)
    return np.broadcast_to(np.asarray(value, np.float32), shape).copy()


def _as_probabilities(out: np.ndarray) -> np.ndarray:
    """Models that end in logits rather than softmax still answer with probabilities. A single score is a binary
    classifier's probability of class 1 (a sigmoid's output, or its logit): [1 - p, p]."""
    if out.shape[1] == 1:
        p = out if out.min() >= 0 and out.max() <= 1 else 1 / (1 + np.exp(-out))
        return np.concatenate([1 - p, p], axis=1)
    if out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    shifted = np.exp(out - out.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k most probable classes of one image, most probable first."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "probability": float(probabilities[i])} for i in best]
