"""The Redis queue backend: huey's PriorityRedisHuey carrying job offers to workers.

Same ordering rule as the SQLite queue (daemon/queue.py `huey_priority`: priority, then READY
time). Two differences, both deliberate:

- Task messages are JSON, not pickle: a worker never unpickles what it reads from a shared
  Redis.
- Workers do not pop blindly (huey's BZPOPMIN): a worker reads the queue in order, plans each
  offer with its own engine and memory, and claims the first one it can fit by removing exactly
  that member in a Lua script that also takes the lease (daemon/remote/lease.py CLAIM). An offer
  nobody can fit stays queued for a bigger worker instead of bouncing between workers, and a
  task is never "in flight" without a lease (huey drops a task whose consumer dies).

huey's public API pops only the head, so `ClaimingPriorityRedisStorage` (a subclass of huey's own
storage) owns the two things it lacks: listing the queue's members in dequeue order and claiming
one of them with its lease. It is the only code in lorad that touches huey's queue key or the
layout of huey's members; messages are decoded through huey's `deserialize_task`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huey import PriorityRedisHuey
from huey.registry import Message
from huey.serializer import Serializer
from huey.storage import PriorityRedisStorage

from daemon.queue import huey_priority
from daemon.remote import lease

TASK_NAME = "lorad.remote_job"


class JsonSerializer(Serializer):
    """huey messages as JSON (no pickle from a shared server)."""

    def _serialize(self, data: Any) -> bytes:
        return json.dumps(list(data), default=str).encode()

    def _deserialize(self, data: bytes) -> Any:
        values = json.loads(data)
        if not isinstance(values, list):
            raise ValueError("not a lorad task message")
        return Message(*values)


class ClaimingPriorityRedisStorage(PriorityRedisStorage):
    """huey's priority storage plus what a planning worker needs and huey's API does not offer
    (it only pops the head): the queue's members in dequeue order, removing one, and claiming one
    atomically with its lease. A member is opaque outside this class."""

    # huey's RedisPriorityQueue stores `8-byte big-endian enqueue time + message` (its `enqueue`,
    # unprefixed again by its `dequeue` and `enqueued_items`). Pinned to huey's own
    # `enqueued_items` by tests/integration/test_redis_queue.py.
    MEMBER_PREFIX = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim = self.conn.register_script(lease.CLAIM)

    def members(self) -> list[tuple[bytes, bytes]]:
        """(member, message) for every queued entry, in dequeue order (one ZRANGE)."""
        return [(member, member[self.MEMBER_PREFIX :]) for member in self.conn.zrange(self.queue_key, 0, -1)]

    def discard(self, member: bytes) -> bool:
        """Remove one entry (a forged offer, or one whose job ended); False when it was gone."""
        return bool(self.conn.zrem(self.queue_key, member))

    def claim(self, member: bytes, *, job_id: str, token: str, lease_value: str, ttl_ms: int) -> int:
        """Remove exactly `member` and take the job's lease in one Lua script (lease.CLAIM):
        1 = claimed; 0 = another worker took it; -1 = stale (its token is not the job's)."""
        keys = [self.queue_key, lease.token_key(job_id), lease.lease_key(job_id)]
        return int(self._claim(keys=keys, args=[member, token, lease_value, ttl_ms]))


class LoradRedisHuey(PriorityRedisHuey):
    storage_class = ClaimingPriorityRedisStorage


@dataclass(frozen=True)
class Queued:
    """One queue entry: its member (the handle a claim or removal takes) and its offer."""

    member: bytes
    offer: dict


class RedisQueue:
    """Enqueue offers (coordinator), list them in order (workers, coordinator), remove or claim
    one (through the storage)."""

    def __init__(self, pool, client) -> None:
        self.client = client
        self.huey = LoradRedisHuey(
            lease.QUEUE_NAME, connection_pool=pool, results=False, serializer=JsonSerializer(), utc=True
        )
        self.task = self.huey.task(name=TASK_NAME, retries=0)(_never_run)
        self.storage: ClaimingPriorityRedisStorage = self.huey.storage

    def enqueue(self, offer: dict, priority: int, ready_at: float) -> None:
        self.huey.enqueue(self.task.s(offer, priority=huey_priority(priority, ready_at)))
        self.client.publish(lease.WAKE, offer.get("job_id", ""))

    def entries(self) -> list[Queued]:
        """The queue in dequeue order; entries that are not lorad offers are skipped."""
        found = []
        for member, message in self.storage.members():
            offer = self.offer_of(message)
            if offer is not None:
                found.append(Queued(member, offer))
        return found

    def offer_of(self, message: bytes) -> dict | None:
        """The offer dict a lorad task carries (still to be validated by Offer.from_dict), or None
        for anything else in the queue: garbage, another task, a task without an offer."""
        try:
            task = self.huey.deserialize_task(message)
        except Exception:  # hostile bytes from a shared Redis may fail anywhere inside huey
            return None
        if not isinstance(task, self.task.task_class) or not task.args:
            return None
        offer = task.args[0]
        return offer if isinstance(offer, dict) and offer.get("job_id") else None

    def remove(self, member: bytes) -> bool:
        return self.storage.discard(member)

    def claim(self, member: bytes, *, job_id: str, token: str, lease_value: str, ttl_ms: int) -> int:
        return self.storage.claim(member, job_id=job_id, token=token, lease_value=lease_value, ttl_ms=ttl_ms)


def _never_run(offer: dict) -> None:  # pragma: no cover - workers claim offers, huey's consumer never runs
    raise RuntimeError("lorad offers are claimed by `lorad worker`, not by huey's consumer")


def client_pair(url: str, *, name: str, socket_timeout: float = 10.0) -> tuple[Any, Any]:
    """(client, pool) with bounded calls (R1's redisurl)."""
    from daemon.remote.redisurl import make_client, make_pool

    return make_client(url, socket_timeout=socket_timeout, client_name=name), make_pool(
        url, socket_timeout=socket_timeout
    )


Wake = Callable[[], None]
