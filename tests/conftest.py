"""Fixtures: real redis-server processes on free ports, real model and web servers, real HTTP."""

from __future__ import annotations

import io
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from serving.launch import Stack


@pytest.fixture(scope="session")
def digits_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Redis, one digits model server and one web server, shared by the tests that only read."""
    stack = Stack(tmp_path_factory.mktemp("digits"))
    try:
        stack.model_server()
        stack.url = stack.web_server()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def make_stack(tmp_path: pathlib.Path) -> Iterator[Callable[..., Stack]]:
    """A stack of the test's own, for tests that start, kill or reconfigure servers."""
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stacks.append(Stack(tmp_path / f"stack-{len(stacks)}", **env))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture(scope="session")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    """The digits the shipped model never saw in training: (uint8 images N x 8 x 8 x 1, labels)."""
    from sklearn.model_selection import train_test_split

    from scripts.train_digits import SPLIT, digit_images

    x, y = digit_images()
    _, x_test, _, y_test = train_test_split(x, y, stratify=y, **SPLIT)
    return x_test, y_test


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def post_image(url: str, data: bytes, timeout: float = 60, **form: object) -> requests.Response:
    return requests.post(f"{url}/predict", files={"image": ("image.png", data)}, data=form, timeout=timeout)


@pytest.fixture(scope="session")
def slow_model_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A model for digit-sized images that takes long enough per batch to be caught mid-batch."""
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Resizing(192, 192),  # about 0.4 s for a batch of 8 on two cores
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("slow") / "slow.keras"
    model.save(path)
    return path
