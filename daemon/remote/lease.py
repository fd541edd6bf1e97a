"""Leases and fencing for remote jobs (scale-out).

A worker holds a job by a lease key with a TTL that it renews every ttl/3; the coordinator
hands each dispatch of a job a fresh *fencing token* (the job's attempt + a random nonce) kept
at `lorad:token:<job>`. Every write a worker makes about a job (claim, lease renewal, events:
progress, checkpoints, final artifacts) is a Lua compare-and-set against that token, run
atomically inside Redis. When a lease lapses the coordinator deletes the token (again a
compare-and-set, only while no lease exists), so a worker that comes back afterwards finds its
token gone: every write it tries is refused, it stops training and nothing it made is published.

The decisions are pure functions below (table-tested); the scripts are the only I/O.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

PREFIX = "lorad"
EVENTS = f"{PREFIX}:events"  # worker -> coordinator stream
EVENTS_GROUP = "coordinator"
WAKE = f"{PREFIX}:wake"  # pub/sub channel: "the queue changed, look again"
QUEUE_NAME = "lorad"  # the huey queue's name (its key belongs to redisqueue.ClaimingPriorityRedisStorage)
EVENTS_MAXLEN = 10_000


def token_key(job_id: str) -> str:
    return f"{PREFIX}:token:{job_id}"


def lease_key(job_id: str) -> str:
    return f"{PREFIX}:lease:{job_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def declined_key(job_id: str) -> str:
    return f"{PREFIX}:declined:{job_id}"


def files_key(job_id: str, token: str = "") -> str:
    """Where a job's transfers live (snapshot, checkpoints, results): deleted when it ends."""
    return f"job:{job_id}" + (f":{token}" if token else "")


def new_token(attempt: int) -> str:
    """A fencing token for one dispatch of a job: unique even for the same attempt."""
    return f"{attempt}.{secrets.token_hex(6)}"


def beat_interval(ttl_s: float) -> float:
    """Heartbeats and lease renewals every third of the TTL: two may be lost before it lapses."""
    return max(0.2, ttl_s / 3.0)


def lease_value(worker_id: str, token: str, now: float, ttl_s: float) -> str:
    return json.dumps({"worker": worker_id, "token": token, "expires": round(now + ttl_s, 3)})


def parse_lease(raw: bytes | str | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- pure decisions ----------------------------------------------------------------------------


def event_is_current(current_token: str | None, event_token: str | None) -> bool:
    """A worker's event counts only if it carries the job's current token (pure)."""
    return bool(current_token) and current_token == event_token


@dataclass(frozen=True)
class Decline:
    """A worker that planned a job and cannot fit it."""

    worker: str
    reason: str
    needs_gb: float | None = None
    has_gb: float | None = None


def waiting_reason(declines: list[Decline]) -> str:
    """What `lorad status` shows for a job every live worker declined (pure)."""
    needs = [d.needs_gb for d in declines if d.needs_gb is not None]
    has = [d.has_gb for d in declines if d.has_gb is not None]
    if needs and has:
        return f"waiting: needs ≥ {max(needs):g} GB, largest worker has {max(has):.0f} GB"
    reasons = sorted({d.reason for d in declines})
    return "waiting: no live worker can train it (" + "; ".join(reasons) + ")"


def waiting_verdict(live_workers: set[str], declines: list[Decline]) -> str | None:
    """None when some live worker has not declined the job (it may still take it); else the
    waiting reason. No live worker at all is its own reason (pure)."""
    if not live_workers:
        return "waiting: no live worker (start one: lorad worker --queue <url>)"
    declined = {d.worker for d in declines}
    if live_workers - declined:
        return None
    return waiting_reason([d for d in declines if d.worker in live_workers])


def lease_action(*, lease_held: bool, task_queued: bool) -> str:
    """What the coordinator does about a dispatched job (pure): `keep` while a worker holds it
    or it waits in the queue, else `reclaim` (its worker is gone, or Redis forgot it)."""
    return "keep" if lease_held or task_queued else "reclaim"


# -- scripts (atomic inside Redis) -----------------------------------------------------------

# KEYS: queue, token, lease. ARGV: member, token, lease json, ttl ms. Run only by the queue's
# storage (redisqueue.ClaimingPriorityRedisStorage.claim), which owns the queue key.
# 1 = claimed; 0 = another worker took it; -1 = stale task (its token is not the job's).
CLAIM = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
return 1
"""

# KEYS: token, lease. ARGV: token, lease json, ttl ms. 1 = renewed; 0 = fenced out.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: token, stream. ARGV: token, maxlen, then field/value pairs. The entry id, or false (fenced).
FENCED_XADD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call(unpack(args))
"""

# KEYS: token, lease. ARGV: token. 1 = released; 0 = not ours.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: token, lease. ARGV: the token the coordinator dispatched with.
# 1 = the job is free again (token deleted, or already gone); 0 = a lease exists (still held);
# -1 = the token is another one (dispatched again meanwhile).
RECLAIM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return 1
"""


class Scripts:
    """The Lua scripts registered on one client (redis-py caches them by sha: EVALSHA). CLAIM is
    not here: it touches the queue, so the queue's storage registers it."""

    def __init__(self, client):
        self.renew = client.register_script(RENEW)
        self.fenced_xadd = client.register_script(FENCED_XADD)
        self.release = client.register_script(RELEASE)
        self.reclaim = client.register_script(RECLAIM)
