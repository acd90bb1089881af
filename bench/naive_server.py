"""The design people start with: one Flask process holding the model, one predict per request.

The classic single-file Keras REST API: `model.predict` on each request's image, on Flask's
threaded server (its default), no queue and no batching. It shares our decode and preprocessing,
so the comparison is about the design and the predict call, not about image handling (it calls
the same uint8-input model the model server runs, preprocessing inside).

    MODEL=path PREPROCESS=caffe LABELS=file PORT=5001 python bench/naive_server.py
"""

from __future__ import annotations

import numpy as np
from flask import Flask, jsonify, request

from serving import images, zoo
from settings import Settings

settings = Settings.from_env()
app = Flask(__name__)
servable = zoo.load(settings.model, settings.model_weights, settings.labels, settings.preprocess)


@app.post("/predict")
def predict():  # noqa: ANN201
    info = servable.info
    pixels = images.decode(request.files["image"].read(), info.height, info.width, info.channels, info.bgr)
    probabilities = servable.served.predict(pixels[np.newaxis], verbose=0)[0]
    return jsonify(success=True, model=info.name, predictions=zoo.top_k(probabilities, list(info.labels), 5))


@app.get("/health")
def health():  # noqa: ANN201
    return jsonify(status="ok")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=settings.port, threaded=True)
