"""Train the small `digits` model on scikit-learn's bundled handwritten digits (works offline).

Writes models/digits.keras, models/digits.json (held-out accuracy and the split used, so the
tests can rebuild exactly the held-out set), and a few sample PNGs under samples/.

    .venv/bin/python scripts/train_digits.py
"""

import json
import pathlib

import keras
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPLIT = {"test_size": 0.25, "random_state": 0}


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits as uint8 images (0..16 ink levels spread over 0..255) and labels."""
    data = load_digits()
    pixels = np.round(data.images * (255 / 16)).astype(np.uint8)
    return pixels[..., np.newaxis], data.target


def build() -> keras.Model:
    # Rescaling lives inside the model so it takes raw uint8 pixels (PREPROCESS=none).
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    keras.utils.set_random_seed(0)
    x, y = digit_images()
    x_train, x_test, y_train, y_test = train_test_split(x, y, stratify=y, **SPLIT)
    model = build()
    model.fit(x_train, y_train, epochs=40, batch_size=32, verbose=2)
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test))
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} images")
    model.save(ROOT / "models" / "digits.keras")
    meta = {"held_out_accuracy": accuracy, "held_out_images": len(y_test), "split": SPLIT}
    (ROOT / "models" / "digits.json").write_text(json.dumps(meta, indent=2) + "\n")
    for digit in range(10):  # the first held-out image of each digit, enlarged for people
        image = x_test[list(y_test).index(digit)][..., 0]
        Image.fromarray(image).resize((64, 64), Image.NEAREST).save(ROOT / "samples" / f"digit_{digit}.png")


if __name__ == "__main__":
    main()
