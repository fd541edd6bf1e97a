"""`lorad run`: the long-running daemon that launchd (or systemd) starts.

Threads: the main thread (signals, periodic rescan), the watchdog observer, the intake loop
(serial intakes), and huey's single worker (one job at a time; training in a child process).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

from daemon import logs
from daemon.fsutil import remove_stale_temps
from daemon.intake.take import Intake
from daemon.jobs import ACTIVE, CorruptDatabase, JobStore
from daemon.lock import AlreadyRunning, InstanceLock
from daemon.pipeline import Pipeline, check_engine_settings
from daemon.queue import Queue
from daemon.settings import Settings, SettingsError
from daemon.watch import IntakeLoop, Watcher


def reconcile(store: JobStore, queue: Queue) -> dict:
    """Make huey's queue match the jobs table (huey lost whatever was running when we died)."""
    interrupted = []
    for job in store.list(ACTIVE):
        store.transition(job.id, "interrupted", error=None)
        interrupted.append(job.id)
    pending = queue.pending_job_ids()
    runnable = store.runnable_in_order()
    runnable_ids = {j.id for j in runnable}
    dropped = [job_id for job_id in pending if job_id not in runnable_ids]
    missing = [j.id for j in runnable if j.id not in set(pending)]
    queue.rebuild([(j.id, j.priority, j.ready_at) for j in runnable])
    return {"interrupted": interrupted, "requeued": missing, "dropped": dropped, "queued": len(runnable)}


def clean_work_dirs(settings: Settings, store: JobStore) -> list[str]:
    """Remove what a killed daemon left half-written: snapshots being built (.intake-*), work dirs
    of jobs the table never recorded, and lorad's own temp files (outputs, registry, markers)."""
    removed = []
    if settings.jobs_dir.is_dir():
        for path in settings.jobs_dir.iterdir():
            if path.name.startswith(".intake-") or (path.is_dir() and store.get(path.name) is None):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif path.is_dir():
                removed += remove_stale_temps(path)
    folders = [settings.loras, settings.registry.parent, settings.state]
    if settings.training_data.is_dir():
        folders += [p for p in settings.training_data.iterdir() if p.is_dir() and not p.is_symlink()]
    for folder in folders:
        removed += remove_stale_temps(folder)
    return removed


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.shutdown = threading.Event()
        self.signals = 0
        self.log = logs.get_logger()

    def _on_stop_signal(self, signum, _frame) -> None:
        self.signals += 1
        if self.signals > 1:
            # Second signal: leave now. The child notices we are gone, checkpoints and exits;
            # the next start marks the job interrupted and resumes it.
            self.log.warning("daemon.exit_now", signal=signal.Signals(signum).name)
            logging_flush()
            os._exit(0)
        self.log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.shutdown.set()

    def _on_wake(self, _signum, _frame) -> None:
        self.queue.wake.set()

    def run(self) -> int:
        s = self.settings
        logs.configure(level=s.log_level, log_file=s.log_file, max_bytes=s.log_max_bytes, backups=s.log_backups)
        try:
            check_engine_settings(s)  # an unknown engine or a bad [engines.*] value stops the start
        except SettingsError as exc:
            print(f"lorad: {exc}", file=sys.stderr)
            self.log.error("daemon.bad_settings", reason=str(exc))
            return 2
        for note in s.deprecations:
            self.log.warning("settings.deprecated", message=note)
        lock = InstanceLock(s.state)
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            print(f"lorad: {exc}", file=sys.stderr)
            self.log.error("daemon.refused", reason=str(exc), pid=exc.pid)
            return 1
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        s = self.settings
        try:
            store = JobStore(s.jobs_db)
            self.pipeline = Pipeline(s, store, self.shutdown)
            self.queue = Queue(s.queue_db, run_job=self.pipeline.run_job)
        except CorruptDatabase as exc:
            print(f"lorad: {exc}", file=sys.stderr)
            self.log.error("daemon.corrupt_db", reason=str(exc))
            return 1
        s.training_data.mkdir(parents=True, exist_ok=True)
        s.loras.mkdir(parents=True, exist_ok=True)
        summary = reconcile(store, self.queue)
        removed = clean_work_dirs(s, store)
        self.log.info("queue.reconciled", removed_dirs=removed, **summary)

        consumer = self.queue.consumer(wake=s.queue_wake)
        consumer.start()
        # huey installed its own handlers in start(); ours replace them.
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_wake)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)

        intake = Intake(s, store, self.queue.enqueue)
        loop = IntakeLoop(intake.take, settle_s=s.settle_s)
        loop.start()
        watcher = Watcher(s.training_data, loop.schedule, polling=s.observer == "polling")
        watcher.start()
        found = loop.rescan(s.training_data)
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            assets=str(s.assets),
            state=str(s.state),
            model=s.model,
            engine=s.engine,
            observer=s.observer,
            ready_found=found,
        )
        while not self.shutdown.wait(s.rescan_interval_s):
            loop.rescan(s.training_data)

        # Graceful stop: no new intakes or jobs; the running job checkpoints and is marked interrupted.
        started = time.monotonic()
        watcher.stop()
        loop.stop()
        consumer.stop_flag.set()
        self.pipeline.stop_current("shutdown")
        self.queue.wake.set()
        deadline = started + s.stop_timeout_s + 5
        for _name, thread in consumer.worker_threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        still_running = any(t.is_alive() for _n, t in consumer.worker_threads)
        if not still_running:
            store.close()
        self.log.info(
            "daemon.stopped",
            seconds=round(time.monotonic() - started, 2),
            clean=not still_running,
        )
        logging_flush()
        return 0


def logging_flush() -> None:
    import logging

    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass


def run(settings: Settings) -> int:
    return Daemon(settings).run()
