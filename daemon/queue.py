"""The durable queue: a SqliteHuey at <state>/queue.db carrying job ids, one worker thread.

huey's SQLite consumer polls with exponential backoff (up to 10 s); lorad's worker instead
sleeps on an Event that every enqueue sets, so a new job starts within milliseconds while an
idle daemon costs no CPU. Another process (the CLI's retry) wakes it with SIGUSR1.

huey deletes a task when it dequeues it, so the jobs table, not huey, decides what must run:
`reconcile` rebuilds huey's queue from the table on every start.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable

from huey import SqliteHuey
from huey.consumer import Consumer, Worker

TASK_NAME = "lorad.run_job"


class Wake:
    """One Event shared by the enqueue path and the worker's sleep."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def set(self) -> None:
        self.event.set()

    def wait(self, timeout: float) -> bool:
        woke = self.event.wait(timeout)
        self.event.clear()
        return woke


class WakeableWorker(Worker):
    """huey Worker whose idle sleep ends the moment a job is enqueued (or the consumer stops)."""

    wake: Wake | None = None
    delay: float  # huey's Worker sets it

    def sleep(self) -> None:
        if self.delay > self.max_delay:
            self.delay = self.max_delay
        if self.wake is not None:
            self.wake.wait(self.delay)
        else:  # pragma: no cover - only without a wake object
            self.stop_flag.wait(self.delay)
        self.delay *= self.backoff


def open_huey(path: Path) -> SqliteHuey:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        huey = SqliteHuey(
            "lorad", filename=str(path), results=False, journal_mode="wal", fsync=True, timeout=30, utc=True
        )
        # Touch the storage now, so a corrupt file is reported at start-up, not mid-job.
        conn = sqlite3.connect(path)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(result)
        finally:
            conn.close()
        huey.storage.queue_size()
    except sqlite3.DatabaseError as exc:
        from daemon.jobs import CorruptDatabase, corrupt_message

        raise CorruptDatabase(corrupt_message(path, "queue database", exc), str(exc)) from None
    return huey


_EPOCH = 1.7e9  # keeps ready times small so one float holds priority and time at 0.1 ms


def huey_priority(priority: int, ready_at: float) -> float:
    """huey dequeues by (priority desc, insertion id); fold FIFO-by-READY-time into the priority
    so the order holds even when intakes finish out of order (pure)."""
    return priority * 1e9 - (ready_at - _EPOCH)


class Queue:
    """huey plus the lorad task; `enqueue` wakes the worker.

    `immediate=True` is the in-process dispatcher (huey's `immediate` idea, kept on the real
    SQLite queue so order and persistence are the same): `enqueue` runs the queue to empty in
    the caller's thread through `run_pending`, with no consumer thread; tests drive the pipeline
    this way without a daemon process."""

    def __init__(
        self,
        path: Path,
        run_job: Callable[[str], None] | None = None,
        wake: Wake | None = None,
        *,
        immediate: bool = False,
    ):
        self.huey = open_huey(path)
        self.wake = wake or Wake()
        self._run_job = run_job or (lambda job_id: None)
        self.task = self.huey.task(name=TASK_NAME, retries=0)(self._execute)
        self.immediate = immediate
        self._running = False  # a job run by run_pending that enqueues does not recurse

    def _execute(self, job_id: str) -> None:
        self._run_job(job_id)

    def enqueue(self, job_id: str, priority: int = 0, ready_at: float = _EPOCH) -> None:
        self.huey.enqueue(self.task.s(job_id, priority=huey_priority(priority, ready_at)))
        self.wake.set()
        if self.immediate and not self._running:
            self.run_pending()

    def run_pending(self, limit: int | None = None) -> list[str]:
        """Run queued tasks now, in this thread, in huey's order (the same dequeue and task call
        the consumer's worker makes), until the queue is empty or `limit` ran; their job ids."""
        ran: list[str] = []
        self._running = True
        try:
            while limit is None or len(ran) < limit:
                task = self.huey.dequeue()
                if task is None:
                    break
                self.huey.execute(task)
                if task.name == TASK_NAME and task.args:
                    ran.append(task.args[0])
        finally:
            self._running = False
        return ran

    def pending_job_ids(self) -> list[str]:
        ids = []
        for task in self.huey.pending():
            if task.name == TASK_NAME and task.args:
                ids.append(task.args[0])
        return ids

    def flush(self) -> None:
        self.huey.storage.flush_queue()

    def rebuild(self, jobs: list[tuple[str, int, float]]) -> None:
        """Replace huey's queue with exactly these (job id, priority, ready time) entries."""
        self.flush()
        for job_id, priority, ready_at in jobs:
            self.huey.enqueue(self.task.s(job_id, priority=huey_priority(priority, ready_at)))
        self.wake.set()

    def consumer(self, *, wake: bool = True) -> Consumer:
        if not wake:  # huey's stock polling consumer: the baseline the bench compares against
            return Consumer(
                self.huey, workers=1, worker_type="thread", periodic=False, check_worker_health=False
            )
        worker_class = type("LoradWorker", (WakeableWorker,), {"wake": self.wake})
        consumer_class = type("LoradConsumer", (Consumer,), {"worker_class": worker_class})
        # One worker: one GPU, jobs strictly one at a time. The scheduler has nothing to do
        # (no periodic or delayed tasks), so it ticks as slowly as huey allows.
        return consumer_class(
            self.huey,
            workers=1,
            worker_type="thread",
            periodic=False,
            initial_delay=0.1,
            backoff=2.0,
            max_delay=60.0,
            scheduler_interval=60,
            check_worker_health=False,
        )
