"""The model tier: load MODEL, then take batches of its jobs from Redis and answer them until stopped.

Run one per GPU (pin it with CUDA_VISIBLE_DEVICES); any number, for any number of models, may
share one Redis. KERAS_BACKEND picks TensorFlow (the default), JAX or PyTorch. SIGTERM or Ctrl-C:
compute and answer the batches in hand, take no more, exit 0. From its start, while it loads and
warms up its model, its version counts as alive (serving.registry.starting), so that a restart
keeps the requests waiting for it. The loop itself is serving.modelserver.ModelServer.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import sys

import redis

from serving import connections, logs, registry, wire, zoo
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


def use_threads(count: int) -> None:
    """Let one predict use at most `count` threads (0: the backend's own choice, every core); called
    before the backend computes anything."""
    if not count:
        return
    # XLA reads its flags when JAX starts, so they are set before Keras imports it.
    flags = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(count)
    elif keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(count)


def predict_threads() -> int | str:
    """The threads one predict may use, as the backend reports them ("all" for its own choice)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or "all"
    if keras.backend.backend() == "torch":
        import torch

        return torch.get_num_threads()
    limit = re.search(r"intra_op_parallelism_threads=(\d+)", os.environ.get("XLA_FLAGS", ""))  # JAX
    return int(limit.group(1)) if limit else "all"


def main() -> int:
    # Until the server exists, SIGTERM or Ctrl-C has no batch to finish: exit 0 at once, as afterwards.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    settings = Settings.from_env()
    logs.setup("model_server", settings)
    name = connections.client_name("model", settings.model_name)
    r = connections.connect(settings.redis_url, socket_timeout=BLOCK_S + 5, name=name)
    keys = wire.ModelKeys(settings.model_name, settings.model_version)
    try:
        with registry.starting(r, keys, settings.heartbeat_s, settings.alive_ttl_s, settings.heartbeat_ttl_s):
            server = warmed_up(settings, r)
    except zoo.ModelUnavailable as exc:
        log.error("%s", exc)
        return 2
    # The backend and the model live as long as the server: out of the collector's sight, a full collection
    # no longer walks their 430,000 objects while a batch waits (250 ms each time, here; python -m bench.gc_pause).
    gc.freeze()
    server.run()
    return 0


def warmed_up(settings: Settings, r: redis.Redis) -> ModelServer:
    """A model server with its model loaded and warmed up, that stops on SIGTERM or Ctrl-C; raises
    zoo.ModelUnavailable when the model cannot be loaded."""
    use_threads(settings.model_threads)  # imports the backend: seconds, while the version is listed as starting
    servable = load(settings)
    import keras  # loaded by zoo.load already: which backend it runs on is worth a line in the log

    logs.event(log, "loaded", model=settings.model, backend=keras.backend.backend(), threads=predict_threads())
    server = ModelServer(servable, r, settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.warm_up()
    return server


if __name__ == "__main__":
    sys.exit(main())
