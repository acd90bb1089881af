"""serving.queue and serving.registry against the session's real Redis: submit, take, answer, requeue."""

from __future__ import annotations

import numpy as np
import pytest

from serving import queue, registry, wire

KEYS = wire.ModelKeys("digits", 1)
OTHER = wire.ModelKeys("digits", 2)


def job(request_id: str, reply_to: str = "worker-a") -> wire.Job:
    return wire.Job(request_id, reply_to, np.full((8, 8, 1), 7, np.uint8), deadline=1e12, top_k=3)


@pytest.fixture
def alive(r):
    """The model looks alive to submit() (a model server would keep this key fresh)."""
    r.set(KEYS.alive, 1)
    r.set(OTHER.alive, 1)


def ids(raw: list[bytes]) -> list[str]:
    return [wire.Job.decode(message).request_id for message in raw]


def test_jobs_are_taken_oldest_first_into_the_servers_inflight_list(r, alive):
    for n in range(5):
        assert queue.submit(r, KEYS, [job(f"j{n}")], limit=100)[0] is queue.Submitted.QUEUED
    server = queue.ServerQueue(r, KEYS, "s1")

    taken = server.take(slot=0, size=3, wait_s=0, block_s=0.1)

    assert ids(taken) == ["j0", "j1", "j2"]
    assert r.llen(KEYS.inflight("s1", 0)) == 3 and r.llen(KEYS.queue) == 2


def test_a_request_of_several_images_is_queued_whole_or_not_at_all(r, alive):
    assert queue.submit(r, KEYS, [job("a"), job("b")], limit=3)[0] is queue.Submitted.QUEUED
    status, depth = queue.submit(r, KEYS, [job("c"), job("d")], limit=3)

    assert (status, depth) == (queue.Submitted.FULL, 2)
    assert r.llen(KEYS.queue) == 2


def test_submit_refuses_when_no_model_server_was_alive_lately(r):
    assert queue.submit(r, KEYS, [job("a")], limit=10)[0] is queue.Submitted.NO_SERVER
    assert r.llen(KEYS.queue) == 0


def test_answers_reach_each_web_workers_inbox_and_clear_the_inflight_list(r, alive):
    queue.submit(r, KEYS, [job("a", "w1"), job("b", "w2"), job("c", "w1")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    taken = [wire.Job.decode(m) for m in server.take(0, 10, 0, 0.1)]

    server.answer(0, [(j.reply_to, wire.Result(j.request_id, top=((7, 1.0),))) for j in taken], ttl_s=30)

    inbox = {w: [wire.Result.decode(m).request_id for m in r.lrange(KEYS.inbox(w), 0, -1)] for w in ("w1", "w2")}
    assert inbox == {"w1": ["a", "c"], "w2": ["b"]}
    assert 0 < r.pttl(KEYS.inbox("w1")) <= 30_000  # a dead worker's answers do not stay
    assert not r.exists(KEYS.inflight("s1", 0))


def test_a_dead_servers_jobs_go_back_to_the_head_of_the_queue_once_its_heartbeat_expired(r, alive):
    queue.submit(r, KEYS, [job(f"j{n}") for n in range(4)], limit=10)
    dead = queue.ServerQueue(r, KEYS, "dead")
    dead.take(0, 2, 0, 0.1)  # j0, j1
    dead.take(1, 1, 0, 0.1)  # j2
    reaper = queue.ServerQueue(r, KEYS, "live")
    r.set(KEYS.heartbeat("dead"), 1)

    assert reaper.requeue_if_dead("dead") == -1  # it still beats: nothing moves
    r.delete(KEYS.heartbeat("dead"))
    assert reaper.requeue_if_dead("dead") == 3

    assert ids(reaper.take(0, 4, 0, 0.1)) == ["j0", "j1", "j2", "j3"]


def test_a_slot_left_over_from_a_failed_batch_is_requeued_before_it_is_used_again(r, alive):
    queue.submit(r, KEYS, [job("a"), job("b")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(0, 1, 0, 0.1)  # "a" taken, then Redis went away before the answer

    assert ids(server.take(0, 2, 0, 0.1)) == ["a", "b"]


def test_models_keep_their_own_queues(r, alive):
    queue.submit(r, KEYS, [job("v1")], limit=10)
    queue.submit(r, OTHER, [job("v2")], limit=10)

    assert ids(queue.ServerQueue(r, OTHER, "s").take(0, 10, 0, 0.1)) == ["v2"]
    assert ids(queue.ServerQueue(r, KEYS, "s").take(0, 10, 0, 0.1)) == ["v1"]


def test_every_key_of_a_model_is_in_one_cluster_slot():
    tagged = [KEYS.queue, KEYS.info, KEYS.servers, KEYS.alive, KEYS.stats, KEYS.speeds]
    tagged += [KEYS.heartbeat("s"), KEYS.inflight("s", 2), KEYS.inbox("w")]
    assert {key.split("{", 1)[1].split("}", 1)[0] for key in tagged} == {"digits:1"}


def test_registry_lists_announced_models_and_counts_only_beating_servers(r):
    info = wire.ModelInfo("digits", 1, 8, 8, 1, tuple("0123456789"))
    first, second = registry.Registration(r, info, "s1"), registry.Registration(r, info, "s2")
    first.beat(now=1000.0, ttl_s=5, grace_s=15, speed=wire.Speed(32, {1: 0.002, 32: 0.01}))
    second.beat(now=1000.0, ttl_s=5, grace_s=15)
    r.delete(KEYS.heartbeat("s2"))  # s2 died

    assert registry.known_models(r, now=1001.0) == [KEYS]
    state = registry.state(r, KEYS)
    assert (state.info, state.live_servers, state.alive, state.ready) == (info, 1, True, True)
    assert state.speeds == (wire.Speed(32, {1: 0.002, 32: 0.01}),)
    assert registry.known_models(r, now=1000.0 + registry.MODEL_RETENTION_S + 1) == []
