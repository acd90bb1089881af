"""serving.queue and serving.registry against the session's real Redis: submit, take, answer, requeue."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from scripts.processes import wait_until
from serving import queue, registry, wire
from tests.conftest import in_inbox

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


def test_submit_needing_nothing_queues_where_no_model_server_is_alive_yet(r):
    """What a web worker queues again after Redis restarted: the model servers come back on their next beat."""
    assert queue.submit(r, KEYS, [job("a")], limit=10, needs="nothing")[0] is queue.Submitted.QUEUED
    assert queue.submit(r, KEYS, [job("b")], limit=1, needs="nothing")[0] is queue.Submitted.FULL
    assert ids(r.lrange(KEYS.queue, 0, -1)) == ["a"]


def test_submit_asked_for_a_registered_server_refuses_once_the_last_one_left(r, alive):
    """A version kept alive for its grace, whose servers have all deregistered (a graceful stop)."""
    assert queue.submit(r, KEYS, [job("a")], limit=10, needs="registered")[0] is queue.Submitted.NOT_REGISTERED
    assert queue.submit(r, KEYS, [job("b")], limit=10)[0] is queue.Submitted.QUEUED  # not asked: it waits
    r.sadd(KEYS.servers, "server-1")
    assert queue.submit(r, KEYS, [job("c")], limit=10, needs="registered")[0] is queue.Submitted.QUEUED
    assert ids(r.lrange(KEYS.queue, 0, -1)) == ["c", "b"]


def test_answers_reach_each_web_workers_inbox_and_clear_the_inflight_list(r, alive):
    queue.submit(r, KEYS, [job("a", "w1"), job("b", "w2"), job("c", "w1")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    taken = [wire.Job.decode(m) for m in server.take(0, 10, 0, 0.1)]

    server.answer(0, [(j.reply_to, wire.Result(j.request_id, top=((7, 1.0),))) for j in taken], ttl_s=30)

    inbox = {w: [result.request_id for result in in_inbox(r, KEYS.inbox(w))] for w in ("w1", "w2")}
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


def test_a_server_taken_for_dead_that_answers_after_all_delivers_nothing_and_the_peer_answers_once(r, alive):
    """Paused past its heartbeat's TTL (SIGSTOP, swapping): a peer requeued its jobs, then it ran on."""
    queue.submit(r, KEYS, [job("a"), job("b")], limit=10)
    stalled, peer = queue.ServerQueue(r, KEYS, "stalled"), queue.ServerQueue(r, KEYS, "peer")
    held = [wire.Job.decode(m) for m in stalled.take(0, 2, 0, 0.1)]
    assert peer.requeue_if_dead("stalled") == 2

    answers = [(j.reply_to, wire.Result(j.request_id, top=((7, 1.0),))) for j in held]
    assert stalled.answer(0, answers, ttl_s=30) is False
    taken = [wire.Job.decode(m) for m in peer.take(0, 2, 0, 0.1)]
    assert peer.answer(0, [(j.reply_to, wire.Result(j.request_id, top=((7, 1.0),))) for j in taken], ttl_s=30)

    assert sorted(result.request_id for result in in_inbox(r, KEYS.inbox("worker-a"))) == ["a", "b"]


def test_a_server_taken_for_dead_halfway_through_a_take_takes_no_more_into_that_batch(r, alive):
    """Paused between a batch's first job and the rest: jobs moved into a new in-flight list would make its
    answer transaction see a list, and answer the requeued job too."""
    queue.submit(r, KEYS, [job("a")], limit=10)
    stalled, peer = queue.ServerQueue(r, KEYS, "stalled"), queue.ServerQueue(r, KEYS, "peer")
    held = [wire.Job.decode(m) for m in stalled.take(0, 1, 0, 0.1)]
    assert peer.requeue_if_dead("stalled") == 1
    queue.submit(r, KEYS, [job("b")], limit=10)

    assert stalled.take_more(0, 1, 0) == []
    answers = [(j.reply_to, wire.Result(j.request_id, top=((7, 1.0),))) for j in held]
    assert stalled.answer(0, answers, ttl_s=30) is False
    assert ids(r.lrange(KEYS.queue, 0, -1)) == ["b", "a"]  # both for whoever takes them next


def test_a_slot_left_over_from_a_failed_batch_is_requeued_before_it_is_used_again(r, alive):
    queue.submit(r, KEYS, [job("a"), job("b")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(0, 1, 0, 0.1)  # "a" taken, then Redis went away before the answer

    assert ids(server.take(0, 2, 0, 0.1)) == ["a", "b"]


def test_withdraw_takes_back_only_the_jobs_named_and_still_queued(r, alive):
    queue.submit(r, KEYS, [job("a"), job("b"), job("c")], limit=10)
    queue.ServerQueue(r, KEYS, "s1").take(0, 1, 0, 0.1)  # "a" is in a server's hands

    assert queue.withdraw(r, KEYS, [job("a"), job("c")]) == 1
    assert ids(r.lrange(KEYS.queue, 0, -1)) == ["b"] and ids(r.lrange(KEYS.inflight("s1", 0), 0, -1)) == ["a"]


def test_models_keep_their_own_queues(r, alive):
    queue.submit(r, KEYS, [job("v1")], limit=10)
    queue.submit(r, OTHER, [job("v2")], limit=10)

    assert ids(queue.ServerQueue(r, OTHER, "s").take(0, 10, 0, 0.1)) == ["v2"]
    assert ids(queue.ServerQueue(r, KEYS, "s").take(0, 10, 0, 0.1)) == ["v1"]


def test_every_key_of_a_model_is_in_one_cluster_slot():
    tagged = [KEYS.queue, KEYS.info, KEYS.servers, KEYS.alive, KEYS.stats, KEYS.speeds]
    tagged += [KEYS.heartbeat("s"), KEYS.inflight("s", 2), KEYS.inbox("w")]
    assert {key.split("{", 1)[1].split("}", 1)[0] for key in tagged} == {"digits:1"}


def test_the_suites_redis_refuses_scripts_and_transactions_across_slots_as_redis_cluster_does(r):
    """The net under every test on the session's Redis (conftest.redis_url): without it, the test above
    would be the only check, and it sees only the keys it lists."""
    with pytest.raises(redis.ResponseError, match="same slot"):
        r.eval("return redis.call('exists', KEYS[1], KEYS[2])", 2, KEYS.queue, OTHER.queue)
    with pytest.raises(redis.ResponseError, match="same slot"):
        r.pipeline(transaction=True).llen(KEYS.queue).llen(OTHER.queue).execute()
    assert r.pipeline(transaction=True).llen(KEYS.queue).llen(KEYS.info).execute() == [0, 0]


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


def test_the_states_of_several_versions_read_at_once_keep_each_versions_servers_and_jobs_apart(r):
    for keys, server_ids in ((KEYS, ["a1", "a2"]), (OTHER, ["b1"])):
        info = wire.ModelInfo(keys.name, keys.version, 8, 8, 1, tuple("0123456789"))
        for server_id in server_ids:
            registry.Registration(r, info, server_id).beat(now=1000.0, ttl_s=60, grace_s=60)
    r.delete(KEYS.heartbeat("a2"))  # a2 died holding two jobs: they are nobody's now, until requeued
    r.rpush(KEYS.inflight("a2", 0), "x", "y")
    r.rpush(KEYS.inflight("a1", 1), "z")
    r.rpush(OTHER.inflight("b1", 2), "w", "v", "u")
    r.rpush(OTHER.queue, "t")

    first, second = registry.states(r, [KEYS, OTHER])

    assert (first.keys, first.live_servers, first.held, first.queued) == (KEYS, 1, 1, 0)
    assert (second.keys, second.live_servers, second.held, second.queued) == (OTHER, 1, 3, 1)
    assert registry.states(r, []) == []


def test_a_starting_server_keeps_its_version_alive_past_the_grace_and_only_that(r):
    with registry.starting(r, KEYS, every_s=0.05, grace_s=1.0, listed_s=1.0):
        time.sleep(2.5)  # more than twice the grace: the key lives only because it is refreshed
        assert r.exists(KEYS.alive) == 1 and registry.starting_models(r, now=time.time()) == [KEYS]
        assert sorted(r.keys("*")) == sorted([KEYS.alive.encode(), wire.STARTING.encode()])  # nothing else yet
    wait_until(lambda: not r.exists(KEYS.alive), 10, "the grace over once it stopped")
    assert registry.starting_models(r, now=time.time()) == []


def test_a_queue_may_fill_up_to_its_limit_exactly(r, alive):
    assert queue.submit(r, KEYS, [job("a"), job("b"), job("c")], limit=3) == (queue.Submitted.QUEUED, 0)
    assert queue.submit(r, KEYS, [job("d")], limit=3) == (queue.Submitted.FULL, 3)
    assert r.llen(KEYS.queue) == 3


def test_take_waits_out_its_window_for_a_full_batch_and_takes_no_more_than_asked(r, alive):
    server = queue.ServerQueue(r, KEYS, "s1")
    queue.submit(r, KEYS, [job("first")], limit=10)

    def later() -> None:
        wait_until(lambda: r.llen(KEYS.inflight("s1", 0)) == 1, 10, "the first taken")
        queue.submit(r, KEYS, [job("second"), job("third"), job("fourth")], limit=10)

    pusher = threading.Thread(target=later)
    pusher.start()
    taken = server.take(0, size=3, wait_s=30, block_s=1)  # back as soon as the batch is full
    pusher.join()

    assert ids(taken) == ["first", "second", "third"] and ids(r.lrange(KEYS.queue, 0, -1)) == ["fourth"]


def test_take_gives_up_after_block_s_when_nothing_comes(r, alive):
    assert queue.ServerQueue(r, KEYS, "s1").take(0, 8, wait_s=0, block_s=0.05) == []
    assert not r.exists(KEYS.inflight("s1", 0))


def test_malformed_messages_are_taken_as_they_are_and_dropped_with_their_batch(r, alive):
    """The queue never parses jobs: junk goes in flight like a job, and the answer of its batch deletes it."""
    junk = [b"not json", b'{"id": "x"}', b"\x80\x04pickle"]
    r.lpush(KEYS.queue, *junk)
    queue.submit(r, KEYS, [job("real", "w1")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")

    taken = server.take(0, 10, 0, 0.1)
    server.answer(0, [("w1", wire.Result("real", top=((7, 1.0),)))], ttl_s=30)

    assert taken[:3] == junk and ids(taken[3:]) == ["real"]
    assert not r.exists(KEYS.inflight("s1", 0)) and r.llen(KEYS.queue) == 0
    assert [result.request_id for result in in_inbox(r, KEYS.inbox("w1"))] == ["real"]


def test_a_batch_with_nothing_to_answer_still_clears_its_inflight_list(r, alive):
    r.lpush(KEYS.queue, b"junk")
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(1, 10, 0, 0.1)

    server.answer(1, [], ttl_s=30)

    assert not r.exists(KEYS.inflight("s1", 1))


def test_give_back_requeues_a_servers_own_leftovers_oldest_first(r, alive):
    queue.submit(r, KEYS, [job(f"j{n}") for n in range(5)], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(0, 2, 0, 0.1)  # j0, j1
    server.take(2, 2, 0, 0.1)  # j2, j3
    r.set(KEYS.heartbeat("s1"), 1)  # alive: giving back does not wait for its beat to expire

    assert server.give_back() == 4

    assert [key for key in r.scan_iter(match=KEYS.inflight("s1", 0).removesuffix(":0"))] == []
    assert ids(queue.ServerQueue(r, KEYS, "s2").take(0, 5, 0, 0.1)) == ["j0", "j1", "j2", "j3", "j4"]


def test_requeue_of_a_dead_server_that_held_nothing_moves_nothing(r, alive):
    assert queue.ServerQueue(r, KEYS, "live").requeue_if_dead("gone") == 0


def test_registry_forgets_a_server_that_leaves_and_skips_what_it_cannot_read(r):
    info = wire.ModelInfo("digits", 1, 8, 8, 1, tuple("0123456789"))
    server = registry.Registration(r, info, "s1")
    server.beat(now=1000.0, ttl_s=5, grace_s=15, speed=wire.Speed(8, {8: 0.01}))
    r.zadd(wire.MODELS, {"no version": 1000.0, OTHER.member: 1000.0})
    r.set(OTHER.info, wire.ModelInfo("digits", 3, 8, 8, 1, ("a",)).encode())  # another version's info
    r.hset(KEYS.speeds, "junk", "not json")
    r.sadd(KEYS.servers, "junk")
    r.set(KEYS.heartbeat("junk"), 1)

    assert registry.known_models(r, now=1000.0) == [KEYS, OTHER]
    assert registry.state(r, OTHER).info is None  # published under the wrong version: not trusted
    assert registry.state(r, KEYS).speeds == (wire.Speed(8, {8: 0.01}),)  # the unreadable one left out
    assert sorted(server.peers()) == ["junk", "s1"]

    server.leave()

    state = registry.state(r, KEYS)
    assert (state.live_servers, state.alive, state.ready) == (1, True, True)  # "junk" still beats
    assert "s1" not in server.peers() and not r.hexists(KEYS.speeds, "s1")


def test_take_more_adds_to_a_slot_already_holding_jobs(r, alive):
    queue.submit(r, KEYS, [job(f"j{n}") for n in range(4)], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(0, 1, 0, 0.1)  # j0

    assert ids(server.take_more(0, 2, wait_s=0)) == ["j1", "j2"]
    assert ids(server.take_more(0, 0, wait_s=30)) == []  # nothing asked for: back at once
    assert ids(reversed(r.lrange(KEYS.inflight("s1", 0), 0, -1))) == ["j0", "j1", "j2"]


def test_answering_some_of_a_slot_keeps_the_others_held(r, alive):
    queue.submit(r, KEYS, [job("a", "w1"), job("b", "w1"), job("c", "w1")], limit=10)
    server = queue.ServerQueue(r, KEYS, "s1")
    server.take(0, 3, 0, 0.1)  # a, b, c: taken first, second, third

    server.answer(0, [("w1", wire.Result("a", top=((7, 1.0),))), ("w1", wire.Result("c", top=((7, 1.0),)))], 30, [0, 2])

    assert ids(r.lrange(KEYS.inflight("s1", 0), 0, -1)) == ["b"]
    assert [result.request_id for result in in_inbox(r, KEYS.inbox("w1"))] == ["a", "c"]
    assert server.give_back() == 1 and ids(r.lrange(KEYS.queue, 0, -1)) == ["b"]
