"""A ResNet50 with random weights, saved to a .keras file, served through the same path as any model."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

import model_server
from serving import images, zoo
from settings import Settings
from tests.conftest import upload


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    import keras

    keras.utils.set_random_seed(1)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_random.keras"
    keras.applications.ResNet50(weights=None).save(path)
    return path


def test_random_resnet50_file_serves_with_caffe_preprocessing(model_servers, redis_url, make_app, resnet_file):
    import keras

    config = Settings(redis_url=redis_url, model=str(resnet_file), preprocess="caffe", labels=str(zoo.IMAGENET_CLASSES))
    servable = model_server.load(config)  # as `python model_server.py` loads MODEL
    model_servers.start(servable)
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95)

    response = upload(make_app().test_client(), buffer.getvalue(), top_k=3)

    assert response.status_code == 200, response.text
    body = response.json
    assert body["model"] == "resnet50_random" and servable.info.shape == (224, 224, 3)
    served = body["predictions"]
    # The same pixels through the same Keras model, with Keras' own ResNet50 (caffe) preprocessing.
    pixels = images.decode(buffer.getvalue(), 224, 224, 3)
    x = keras.applications.resnet50.preprocess_input(pixels[np.newaxis].astype(np.float32))
    probabilities = np.asarray(servable.model.predict_on_batch(x))[0]
    best = np.argsort(-probabilities, kind="stable")[:3]
    labels = zoo.IMAGENET_CLASSES.read_text().splitlines()
    assert [p["label"] for p in served] == [labels[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in served], probabilities[best], atol=1e-5)
    assert all(p["label"] in servable.info.labels for p in served)
