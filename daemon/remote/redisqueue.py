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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from huey import PriorityRedisHuey
from huey.registry import Message
from huey.serializer import Serializer

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


@dataclass(frozen=True)
class Queued:
    """One queue entry: the raw member (what a claim removes) and its offer."""

    member: bytes
    offer: dict


class RedisQueue:
    """Enqueue offers (coordinator), list them in order (workers, coordinator)."""

    def __init__(self, pool, client) -> None:
        self.client = client
        self.huey = PriorityRedisHuey(
            lease.QUEUE_NAME, connection_pool=pool, results=False, serializer=JsonSerializer(), utc=True
        )
        self.task = self.huey.task(name=TASK_NAME, retries=0)(_never_run)
        self.key = self.huey.storage.queue_key

    def enqueue(self, offer: dict, priority: int, ready_at: float) -> None:
        self.huey.enqueue(self.task.s(offer, priority=huey_priority(priority, ready_at)))
        self.client.publish(lease.WAKE, offer.get("job_id", ""))

    def entries(self) -> list[Queued]:
        """The queue in dequeue order; entries that are not lorad offers are skipped."""
        found = []
        for member in self.client.zrange(self.key, 0, -1):
            offer = decode_offer(self.huey, member)
            if offer is not None:
                found.append(Queued(member, offer))
        return found

    def remove(self, member: bytes) -> bool:
        return bool(self.client.zrem(self.key, member))


def decode_offer(huey, member: bytes) -> dict | None:
    try:
        message = huey.serializer.deserialize(member[8:])  # huey prefixes an 8-byte timestamp
    except (ValueError, TypeError):
        return None
    name = str(getattr(message, "name", ""))
    if not (name == TASK_NAME or name.endswith("." + TASK_NAME)) or not message.args:  # huey qualifies it
        return None
    offer = message.args[0]
    return offer if isinstance(offer, dict) and offer.get("job_id") else None


def _never_run(offer: dict) -> None:  # pragma: no cover - workers claim offers, huey's consumer never runs
    raise RuntimeError("lorad offers are claimed by `lorad worker`, not by huey's consumer")


def client_pair(url: str, *, name: str, socket_timeout: float = 10.0) -> tuple[Any, Any]:
    """(client, pool) with bounded calls (R1's redisurl)."""
    from daemon.remote.redisurl import make_client, make_pool

    return make_client(url, socket_timeout=socket_timeout, client_name=name), make_pool(
        url, socket_timeout=socket_timeout
    )


Wake = Callable[[], None]
