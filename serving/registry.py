"""Which models are served and by which live model servers: written by the model servers, read by the web tier.

A model server announces itself on every heartbeat: its heartbeat key (expiring), its model's info,
the model's "alive" key (expiring after NO_SERVER_GRACE_S) and the model's entry in the registry of
every model (wire.MODELS). Before that, while it loads its model, its version is listed as starting
(wire.STARTING). Nothing needs cleaning up after a crash: keys expire, and live servers reap the dead
(serving.queue requeues what they held).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import redis

from serving import wire
from serving.queue import INFLIGHT_SLOTS

# A model version no server has announced for this long is forgotten: 404 instead of 503.
MODEL_RETENTION_S = 24 * 3600.0


class Registration:
    """One model server's presence in the registry."""

    def __init__(self, r: redis.Redis, info: wire.ModelInfo, server_id: str) -> None:
        self.r = r
        self.keys = wire.ModelKeys(info.name, info.version)
        self.info = info
        self.server_id = server_id

    def beat(self, now: float, ttl_s: float, grace_s: float, speed: wire.Speed | None = None) -> None:
        """Announce this server alive for ttl_s, its model alive for grace_s; `now` is Redis' clock."""
        pipe = self.r.pipeline(transaction=False)
        if speed is not None:
            pipe.hset(self.keys.speeds, self.server_id, speed.encode())
        pipe.sadd(self.keys.servers, self.server_id)
        pipe.set(self.keys.heartbeat(self.server_id), 1, px=int(ttl_s * 1000))
        _hold_alive(pipe, self.keys, grace_s)
        # Republished every beat: a Redis that restarted empty learns the model again by itself.
        pipe.set(self.keys.info, self.info.encode())
        pipe.zadd(wire.MODELS, {self.keys.member: now})
        pipe.zremrangebyscore(wire.MODELS, "-inf", now - MODEL_RETENTION_S)
        pipe.zrem(wire.STARTING, self.keys.member)  # announced: it starts no more (in the same round trip)
        pipe.execute()

    def peers(self) -> list[str]:
        """Every server id registered for this model, this one included, live or not."""
        return [raw.decode() for raw in self.r.smembers(self.keys.servers)]

    def forget(self, server_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.srem(self.keys.servers, server_id)
        pipe.hdel(self.keys.speeds, server_id)
        pipe.execute()

    def leave(self) -> None:
        """On a clean exit (after giving back its jobs): stop counting as alive at once."""
        self.r.delete(self.keys.heartbeat(self.server_id))
        self.forget(self.server_id)


@contextmanager
def starting(r: redis.Redis, keys: wire.ModelKeys, every_s: float, grace_s: float, listed_s: float) -> Iterator[None]:
    """Within the block, while a model server loads and warms up its model, its version counts as alive for
    grace_s (NO_SERVER_GRACE_S) and as starting (wire.STARTING) for listed_s (HEARTBEAT_TTL_S, as a server's
    own heartbeat), each refreshed every every_s, and nothing else is published.

    A restart of a version's only server then keeps the requests waiting for it, and takes new ones, however
    long the start takes (ResNet50 here: 16 s, longer than the grace): a server is gone only once no process
    of its version runs. On a model's first start, a request naming it is told that it starts (503), not
    that no such model exists (404). A block left by an exception (the model would not load, a SIGTERM)
    takes the version off the starting list at once; after a SIGKILL it lapses within listed_s. A block
    that ends normally leaves it there for the server's first beat to remove, in the round trip that
    announces the version: removed any earlier, the version would be in neither list meanwhile (404)."""
    done = threading.Event()

    def hold_once() -> None:
        try:
            _hold_alive(r, keys, grace_s)
            _list_starting(r, keys, listed_s)
        except redis.RedisError:
            pass  # Redis may come up after us: the server's first beat waits for it and says so

    def hold() -> None:
        while not done.wait(every_s):
            hold_once()

    hold_once()  # from the block's first moment, not from the thread's first turn
    thread = threading.Thread(target=hold, name="starting", daemon=True)
    thread.start()
    loaded = False
    try:
        yield
        loaded = True
    finally:
        done.set()
        thread.join()  # before the removal below, which it would otherwise undo
        if not loaded:
            with suppress(redis.RedisError):
                r.zrem(wire.STARTING, keys.member)


def _hold_alive(r: redis.Redis | redis.client.Pipeline, keys: wire.ModelKeys, grace_s: float) -> None:
    r.set(keys.alive, 1, px=int(grace_s * 1000))


def _list_starting(r: redis.Redis, keys: wire.ModelKeys, listed_s: float) -> None:
    """Until listed_s from now on Redis' clock: a server that dies while it loads is forgotten by itself."""
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    pipe = r.pipeline(transaction=False)
    pipe.zadd(wire.STARTING, {keys.member: now + listed_s})
    pipe.zremrangebyscore(wire.STARTING, "-inf", now)
    pipe.execute()


@dataclass(frozen=True)
class ModelState:
    """A model version as the web tier sees it."""

    keys: wire.ModelKeys
    info: wire.ModelInfo | None  # None while nothing readable was published
    live_servers: int
    alive: bool  # some server beat within NO_SERVER_GRACE_S
    queued: int  # jobs waiting in its queue
    speeds: tuple[wire.Speed, ...]  # of its live servers
    held: int = 0  # jobs its live servers have taken and not answered yet: ahead of the whole queue

    @property
    def ready(self) -> bool:
        return self.info is not None and self.live_servers > 0


def known_models(r: redis.Redis, now: float) -> list[wire.ModelKeys]:
    """Every model version announced within MODEL_RETENTION_S (`now` is Redis' clock)."""
    return _versions(r.zrangebyscore(wire.MODELS, now - MODEL_RETENTION_S, "+inf"))


def starting_models(r: redis.Redis, now: float) -> list[wire.ModelKeys]:
    """Every model version a model server is loading now (`now` is Redis' clock), announced or not."""
    return _versions(r.zrangebyscore(wire.STARTING, now, "+inf"))


def _versions(members: list[bytes]) -> list[wire.ModelKeys]:
    found = []
    for member in members:
        try:
            found.append(wire.ModelKeys.from_member(member))
        except wire.MalformedMessage:
            continue
    return sorted(found)


def state(r: redis.Redis, keys: wire.ModelKeys) -> ModelState:
    """What is published of one model version, and how many of its servers are alive."""
    return states(r, [keys])[0]


def states(r: redis.Redis, versions: list[wire.ModelKeys]) -> list[ModelState]:
    """state() of each version, in three round trips whatever their number. The registry keeps a version for
    MODEL_RETENTION_S after its last server left; with three round trips each, the web tier's read of 100
    versions took 36 ms here, every REFRESH_S, and every request of that worker waited for it (now 8.5 ms)."""
    pipe = r.pipeline(transaction=False)
    for keys in versions:
        pipe.get(keys.info).smembers(keys.servers).exists(keys.alive).llen(keys.queue).hgetall(keys.speeds)
    raw = pipe.execute()
    published = [raw[n : n + 5] for n in range(0, len(raw), 5)]
    servers = [(keys, i) for keys, found in zip(versions, published, strict=True) for i in _ids(found[1])]
    beating = _each(r, "exists", [keys.heartbeat(i) for keys, i in servers])
    live: dict[wire.ModelKeys, list[str]] = {keys: [] for keys in versions}
    for (keys, i), beats in zip(servers, beating, strict=True):
        if beats:
            live[keys].append(i)
    slots = range(INFLIGHT_SLOTS)
    inflight = [(keys, keys.inflight(i, slot)) for keys, ids in live.items() for i in ids for slot in slots]
    held = dict.fromkeys(versions, 0)
    for (keys, _), jobs in zip(inflight, _each(r, "llen", [name for _, name in inflight]), strict=True):
        held[keys] += jobs
    return [_state(keys, found, live[keys], held[keys]) for keys, found in zip(versions, published, strict=True)]


def _state(keys: wire.ModelKeys, published: list, live_ids: list[str], held: int) -> ModelState:
    raw_info, _, alive, queued, raw_speeds = published
    speeds = tuple(s for i in live_ids if (s := _speed(raw_speeds.get(i.encode()))) is not None)
    return ModelState(keys, _info(raw_info, keys), len(live_ids), bool(alive), queued, speeds, held)


def _ids(raw: set[bytes]) -> list[str]:
    return sorted(i.decode() for i in raw)


def _each(r: redis.Redis, command: str, names: list[str]) -> list[int]:
    """One command ("exists", "llen") on each key, in one round trip."""
    pipe = r.pipeline(transaction=False)
    for name in names:
        getattr(pipe, command)(name)
    return pipe.execute() if names else []


def _speed(raw: bytes | None) -> wire.Speed | None:
    try:
        return None if raw is None else wire.Speed.decode(raw)
    except wire.MalformedMessage:
        return None


def _info(raw: bytes | None, keys: wire.ModelKeys) -> wire.ModelInfo | None:
    try:
        info = None if raw is None else wire.ModelInfo.decode(raw)
    except wire.MalformedMessage:
        return None
    return info if info is not None and (info.name, info.version) == (keys.name, keys.version) else None
