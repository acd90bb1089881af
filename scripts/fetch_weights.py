"""Download the ImageNet weights of every Keras application in the zoo into Keras' cache.

Run at image build time only (the Dockerfile's model stage): Keras caches each file under
$KERAS_HOME/models, where the model server finds it, so containers start without a download.
Fails if a file did not land where serving/zoo.py expects it.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from serving.zoo import APPLICATIONS  # noqa: E402  (needs the repo on the path)


def cache_dir() -> pathlib.Path:
    """Where Keras caches downloads, as serving/zoo.py computes it."""
    return pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras")) / "models"


def main() -> int:
    import keras

    missing = []
    for name, app in APPLICATIONS.items():
        print(f"fetching the ImageNet weights of {name} ({app.constructor})", flush=True)
        getattr(keras.applications, app.constructor)(weights="imagenet")
        keras.backend.clear_session()
        path = cache_dir() / app.weights_file
        if path.is_file():
            print(f"  {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
        else:
            missing.append(str(path))
    if missing:
        print(f"Keras did not cache these where the model server looks: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
