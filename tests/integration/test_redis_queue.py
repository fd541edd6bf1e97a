"""The Redis queue (daemon/remote/redisqueue.py) against a real redis-server: huey's priority
storage with one subclass that lists members in dequeue order and claims one with its lease.

What is pinned here: the subclass's idea of huey's member layout agrees with huey's own
`enqueued_items`; dequeue order is priority, then READY time; a claim removes exactly one member
and takes the lease atomically (1 / 0 / -1 as lease.CLAIM says); anything in the queue that is not
a lorad offer (garbage bytes, another task, a task without an offer) is skipped by the queue, the
worker and the coordinator, and never crashes them.
"""

from __future__ import annotations

import json
import struct

import pytest

from daemon.remote import lease

SHA = "ab" * 32
TOKEN = "1.0123456789ab"


def _offer(job_id: str) -> dict:
    return {"job_id": job_id, "token": TOKEN, "name": "alice"}


@pytest.fixture
def queue(redis_server):
    from daemon.remote.redisqueue import RedisQueue, client_pair

    client, pool = client_pair(redis_server.url, name="test-queue")
    return RedisQueue(pool, client)


def _raw(queue, member: bytes, score: float = 0.0) -> None:
    """What anyone with access to Redis can do: put any bytes in the queue."""
    queue.client.zadd(queue.storage.queue_key, {member: score})


def _body(name: str, args: list, **fields) -> bytes:
    """A huey message in lorad's JSON framing."""
    values = {"id": "x", "name": name, "eta": None, "retries": 0, "retry_delay": 0, "priority": 0,
              "args": args, "kwargs": {}, "on_complete": None, "on_error": None, "expires": None,
              "expires_resolved": None, "timeout": None, "chord_config": None, "retry_backoff": 0}  # fmt: skip
    values.update(fields)
    return json.dumps(list(values.values())).encode()


def _message(name: str, args: list, **fields) -> bytes:
    """A queue member: the message prefixed like huey's RedisPriorityQueue does."""
    return struct.pack(">Q", 1) + _body(name, args, **fields)


def test_members_agree_with_hueys_own_unprefixing_and_dequeue_order(queue):
    for job_id, priority, ready in [("j-late", 0, 20.0), ("j-urgent", 5, 30.0), ("j-early", 0, 10.0)]:
        queue.enqueue(_offer(job_id), priority, ready)
    members = queue.storage.members()
    assert [message for _, message in members] == queue.storage.enqueued_items()
    assert [t.args[0]["job_id"] for t in queue.huey.pending()] == ["j-urgent", "j-early", "j-late"]
    assert [e.offer["job_id"] for e in queue.entries()] == ["j-urgent", "j-early", "j-late"]
    assert [e.member for e in queue.entries()] == [member for member, _ in members]


def test_messages_are_json_not_pickle(queue):
    queue.enqueue(_offer("j1"), 0, 1.0)
    ((member, message),) = queue.storage.members()
    assert json.loads(message)[6] == [_offer("j1")]  # Message.args


def test_claim_removes_exactly_that_member_and_takes_the_lease(queue):
    queue.enqueue(_offer("j1"), 0, 1.0)
    queue.enqueue(_offer("j2"), 0, 2.0)
    first, second = queue.entries()
    queue.client.set(lease.token_key("j1"), TOKEN)
    value = lease.lease_value("w", TOKEN, 100.0, 30.0)
    assert queue.claim(first.member, job_id="j1", token=TOKEN, lease_value=value, ttl_ms=30_000) == 1
    assert queue.client.get(lease.lease_key("j1")) == value.encode()
    assert 0 < queue.client.pttl(lease.lease_key("j1")) <= 30_000
    assert [e.offer["job_id"] for e in queue.entries()] == ["j2"]
    # Another worker that read the same entry: it is gone, nothing changes.
    assert queue.claim(first.member, job_id="j1", token=TOKEN, lease_value="other", ttl_ms=30_000) == 0
    assert queue.client.get(lease.lease_key("j1")) == value.encode()
    # A stale offer (its token is not the job's): removed, no lease taken.
    queue.client.set(lease.token_key("j2"), "2.newer")
    assert queue.claim(second.member, job_id="j2", token=TOKEN, lease_value=value, ttl_ms=30_000) == -1
    assert queue.client.get(lease.lease_key("j2")) is None
    assert queue.entries() == []


def test_remove_takes_one_entry(queue):
    queue.enqueue(_offer("j1"), 0, 1.0)
    (entry,) = queue.entries()
    assert queue.remove(entry.member) is True
    assert queue.remove(entry.member) is False
    assert queue.entries() == []


GARBAGE = {
    "empty": b"",
    "short": b"abc",
    "prefix only": struct.pack(">Q", 1),
    "not json": struct.pack(">Q", 1) + b"\xff\xfe not json",
    "json object": struct.pack(">Q", 1) + b'{"job_id": "j-evil"}',
    "wrong field count": struct.pack(">Q", 1) + b'["x", "daemon.remote.redisqueue.lorad.remote_job"]',
    "deep nesting": struct.pack(">Q", 1) + b"[" * 100_000 + b"]" * 100_000,
    "another task": _message("evil.module.lorad.remote_job", [_offer("j-evil")]),
    "no args": _message("daemon.remote.redisqueue.lorad.remote_job", []),
    "offer not a dict": _message("daemon.remote.redisqueue.lorad.remote_job", ["j-evil"]),
    "offer without job id": _message("daemon.remote.redisqueue.lorad.remote_job", [{"token": TOKEN}]),
    "garbage callback": _message(
        "daemon.remote.redisqueue.lorad.remote_job", [_offer("j-evil")], on_complete=["not", "a", "message"]
    ),  # fmt: skip
}


def test_the_lorad_message_framing_used_here_is_the_real_one(queue):
    """The hand-made messages above are only hostile where they mean to be: the same builder with
    a good offer decodes (so each garbage case fails for its own reason)."""
    good = _body("daemon.remote.redisqueue.lorad.remote_job", [_offer("j-ok")])
    assert queue.offer_of(good) == _offer("j-ok")


def test_garbage_members_are_skipped_not_crashed_on(queue):
    for i, member in enumerate(GARBAGE.values()):
        _raw(queue, member, score=-10.0 + i)  # all ahead of the real offer
    queue.enqueue(_offer("j-good"), 0, 1.0)
    entries = queue.entries()
    assert [e.offer["job_id"] for e in entries] == ["j-good"]
    queue.client.set(lease.token_key("j-good"), TOKEN)
    assert queue.claim(entries[0].member, job_id="j-good", token=TOKEN, lease_value="v", ttl_ms=5000) == 1
    assert queue.storage.queue_size() == len(GARBAGE)  # skipped, never removed by a reader


def test_a_worker_skips_garbage_and_refuses_a_forged_offer(queue, redis_server, tmp_path):
    from daemon.remote.worker import RemoteWorker
    from daemon.settings import resolve

    for member in GARBAGE.values():
        _raw(queue, member)
    queue.enqueue({**_offer("../escape"), "engine": "scripted"}, 0, 1.0)  # a lorad offer, but forged
    settings = resolve(flags={"assets": tmp_path / "assets", "queue": redis_server.url, "engine": "scripted"})
    worker = RemoteWorker(settings, redis_server.url, name="w-test")
    assert worker.take_one() is False
    assert len(worker.refused) == 1  # the forged one, refused by Offer.from_dict
    assert queue.storage.queue_size() == len(GARBAGE) + 1
    assert not (tmp_path / "escape").exists()


def test_the_coordinator_skips_garbage_and_removes_a_forged_offer(queue, redis_server, tmp_path):
    import threading

    from daemon.jobs import JobStore
    from daemon.remote.coordinator import Coordinator
    from daemon.settings import resolve

    for member in GARBAGE.values():
        _raw(queue, member)
    queue.enqueue(_offer("../escape"), 0, 1.0)
    queue.enqueue(
        {"job_id": "20260101-120000-ab12", "token": TOKEN, "attempt": 1, "name": "alice", "trigger": "ohwx",
         "model": "tiny-z-image", "engine": "scripted", "image_count": 2, "max_side": 512, "options": {},
         "preview_prompt": "a photo of ohwx",
         "snapshot": {"key": "job:20260101-120000-ab12:snapshot", "files": 0, "size": 0, "sha256": SHA},
         "manifest": {"key": "job:20260101-120000-ab12:manifest", "size": 10, "sha256": SHA, "chunks": 1,
                      "chunk_size": 1 << 20},
         "state": []},
        0, 2.0,
    )  # fmt: skip
    settings = resolve(flags={"assets": tmp_path / "assets", "queue": redis_server.url, "engine": "scripted"})
    coordinator = Coordinator(settings, JobStore(settings.jobs_db, write_markers=False), threading.Event())
    assert list(coordinator.queued_offers()) == ["20260101-120000-ab12"]
    assert queue.storage.queue_size() == len(GARBAGE) + 1  # the forged offer went, garbage stays
