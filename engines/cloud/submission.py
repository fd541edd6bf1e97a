"""At most one paid request per job attempt, whatever is killed when.

A cloud has no idempotency key: a submit whose answer never came may or may not have been
accepted (and billed). So before the paid POST an *intent* is written durably (endpoint,
arguments hash, time) and the daily ledger counts it; after the answer the *request record* is
written. On every (re)start the pair decides (`decide`, pure):

  no intent, no record  -> submit (nothing can have reached the cloud)
  record                -> re-attach to the request on record
  intent, no record     -> submission uncertain: never sent again by itself; the job fails with
                           the kind `submission_uncertain`, and only `lorad retry JOB --resubmit`
                           (engines.base.allow_resubmit) lets the next attempt pay again.

Only failures that certainly happened before any byte was sent (connection refused, DNS, a
connect timeout) are retried; every other error of the submit is "uncertain".
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from engines.base import RESUBMIT_FILE, UNCERTAIN_FILE
from lorad_base.fsutil import atomic_write_text

INTENT_FILE = "intent.json"
REQUEST_FILE = "request.json"
KILL_ENV = "TEST_LORAD_KILL_AT"  # tests only: kill -9 this process at a named submit point
FAL_DASHBOARD = "https://fal.ai/dashboard/requests"
KILL_POINTS = ("before_intent", "after_intent", "after_accept", "after_record")


class Next(enum.Enum):
    SUBMIT = "submit"
    REATTACH = "reattach"
    UNCERTAIN = "uncertain"
    RESUBMIT = "resubmit"  # uncertain, and the user said --resubmit: archive the intent, pay again


def decide(has_intent: bool, has_record: bool, resubmit_allowed: bool) -> Next:
    """What this attempt does with the cloud (pure; see the module docstring)."""
    if has_record:
        return Next.REATTACH
    if not has_intent:
        return Next.SUBMIT
    return Next.RESUBMIT if resubmit_allowed else Next.UNCERTAIN


def arguments_hash(arguments: dict) -> str:
    return hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()


def kill_point(name: str) -> None:
    """Tests only (TEST_LORAD_KILL_AT=<point>): die by SIGKILL here, as a power cut would."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Records:
    """The submission records of one job's cloud folder (`<workdir>/<cloud>/`)."""

    folder: Path

    @property
    def intent(self) -> Path:
        return self.folder / INTENT_FILE

    @property
    def record(self) -> Path:
        return self.folder / REQUEST_FILE

    @property
    def workdir(self) -> Path:
        return self.folder.parent

    def next_step(self) -> Next:
        return decide(self.intent.is_file(), self.record.is_file(), (self.workdir / RESUBMIT_FILE).is_file())

    def write_intent(self, endpoint: str, arguments: dict, job_id: str | None) -> dict:
        """Durably, before the paid POST (atomic write + fsync of file and folder)."""
        intent = {
            "endpoint": endpoint,
            "arguments_sha256": arguments_hash(arguments),
            "at": time.time(),
            "job_id": job_id,
        }
        atomic_write_text(self.intent, json.dumps(intent))
        return intent

    def write_record(self, record: dict) -> None:
        atomic_write_text(self.record, json.dumps(record))
        (self.workdir / UNCERTAIN_FILE).unlink(missing_ok=True)

    def read_record(self) -> dict:
        return json.loads(self.record.read_text(encoding="utf-8"))

    def read_intent(self) -> dict:
        try:
            return json.loads(self.intent.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def mark_uncertain(
        self, reason: str, job_id: str | None = None, cloud: str = "fal", dashboard: str = FAL_DASHBOARD
    ) -> str:
        """The job-level marker `lorad retry` reads; returns the user-facing error text."""
        intent = self.read_intent()
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(intent.get("at") or time.time()))
        text = uncertain_message(
            str(intent.get("endpoint", "?")), when, reason, job_id or "JOB", cloud=cloud, dashboard=dashboard
        )
        atomic_write_text(self.workdir / UNCERTAIN_FILE, json.dumps({**intent, "reason": reason}))
        return text

    def archive(self, which: Path, why: str) -> Path | None:
        """Move a record aside (kept for the user: it names a paid request) so the next attempt
        submits anew; returns where it went."""
        if not which.is_file():
            return None
        dest = which.with_name(f"{which.stem}.{why}.{int(time.time() * 1000)}.json")
        os.replace(which, dest)
        return dest

    def close_request(self, why: str) -> None:
        """The request on record ended on the cloud's side (failed, cancelled): its intent and
        record go aside together, so the next attempt (`lorad retry`) submits anew."""
        self.archive(self.intent, why)
        self.archive(self.record, why)

    def start_resubmit(self) -> None:
        """The user said --resubmit: the uncertain intent goes aside, the permission is used up."""
        self.archive(self.intent, "uncertain")
        (self.workdir / UNCERTAIN_FILE).unlink(missing_ok=True)
        (self.workdir / RESUBMIT_FILE).unlink(missing_ok=True)


def uncertain_message(
    endpoint: str,
    when: str,
    reason: str,
    job_id: str = "JOB",
    cloud: str = "fal",
    dashboard: str = FAL_DASHBOARD,
) -> str:
    """The error of a submission-uncertain job (pure): what happened and what to do."""
    return (
        f"submission uncertain: a training request to {endpoint} was being sent at {when} and lorad "
        f"never got {cloud}'s answer ({reason}); it may have been accepted and billed. Check {cloud}'s dashboard "
        f"({dashboard}) before paying again; lorad will not send it again by itself. "
        f"To pay for a new request: lorad retry {job_id} --resubmit"
    )


def certainly_not_sent(exc: BaseException) -> bool:
    """True only for failures before any byte of the request left (connection refused, DNS,
    connect timeout, TLS handshake): retrying those cannot pay twice."""
    import httpx

    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


class Ledger:
    """`<state>/<cloud>/submitted.jsonl`: one line per POST that may have reached the cloud
    (written with the intent, before the POST): the daily guard counts these."""

    def __init__(self, path: Path):
        self.path = path

    def last_day(self, now: float | None = None) -> int:
        if not self.path.is_file():
            return 0
        since = (now or time.time()) - 86400
        count = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                count += json.loads(line)["ts"] >= since
            except (ValueError, KeyError, TypeError):
                continue
        return count

    def append(self, **entry: object) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"ts": time.time(), **entry}, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
