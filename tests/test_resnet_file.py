"""A ResNet50 with random weights, saved to a .keras file, served through the same path as any model."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from serving import images, zoo
from tests.conftest import post_image


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    import keras

    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_random.keras"
    keras.applications.ResNet50(weights=None).save(path)
    return path


def test_random_resnet50_file_serves_with_caffe_preprocessing(make_stack, resnet_file):
    stack = make_stack(MODEL=str(resnet_file), PREPROCESS="caffe", LABELS=str(zoo.IMAGENET_CLASSES))
    stack.model_server()
    url = stack.web_server()
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95)

    response = post_image(url, buffer.getvalue(), top_k=3)

    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    # The same pixels through the same file in-process, with Keras' own caffe preprocessing.
    local = zoo.load(str(resnet_file), labels=str(zoo.IMAGENET_CLASSES), preprocess="caffe")
    assert local.info.shape == (224, 224, 3)
    pixels = images.decode(buffer.getvalue(), 224, 224, 3)
    expected = zoo.top_k(local.predict(pixels[np.newaxis])[0], local.labels, 3)
    assert [p["label"] for p in served] == [p["label"] for p in expected]
    np.testing.assert_allclose([p["probability"] for p in served], [p["probability"] for p in expected], atol=1e-5)
    assert all(p["label"] in local.labels for p in served)
