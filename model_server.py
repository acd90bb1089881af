"""The model tier: load MODEL, then take batches of its jobs from Redis and answer them until stopped.

Run one per GPU (pin it with CUDA_VISIBLE_DEVICES); any number, for any number of models, may
share one Redis. KERAS_BACKEND picks TensorFlow (the default), JAX or PyTorch. SIGTERM or Ctrl-C:
compute and answer the batches in hand, take no more, exit 0.
The loop itself is serving.modelserver.ModelServer.
"""

from __future__ import annotations

import logging
import signal
import sys

from serving import connections, logs, zoo
from serving.modelserver import BLOCK_S, ModelServer
from settings import Settings

log = logging.getLogger("model_server")


def load(settings: Settings) -> zoo.KerasServable:
    """The model these settings name, as this server serves it; raises zoo.ModelUnavailable."""
    return zoo.load(
        settings.model,
        settings.model_weights,
        settings.labels,
        settings.preprocess,
        name=settings.model_name,
        version=settings.model_version,
    )


def main() -> int:
    settings = Settings.from_env()
    logs.setup("model_server", settings)
    try:
        servable = load(settings)
    except zoo.ModelUnavailable as exc:
        log.error("%s", exc)
        return 2
    import keras  # loaded by zoo.load already: which backend it runs on is worth a line in the log

    logs.event(log, "loaded", model=settings.model, backend=keras.backend.backend())
    name = connections.client_name("model", settings.model_name)
    r = connections.connect(settings.redis_url, socket_timeout=BLOCK_S + 5, name=name)
    server = ModelServer(servable, r, settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
