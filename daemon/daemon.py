"""`lorad run`: the long-running daemon that launchd (or systemd) starts.

Threads: the main thread (signals, periodic rescan), the watchdog observer, the intake loop
(serial intakes), and huey's single worker (one job at a time; training in a child process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import jobrecord, logs, space
from daemon.fsutil import remove_stale_temps
from daemon.intake.take import Intake
from daemon.jobs import ACTIVE, CorruptDatabase, JobStore, move_aside
from daemon.lock import AlreadyRunning, InstanceLock
from daemon.pipeline import Pipeline, cancel_cloud_requests, check_engine_settings
from daemon.queue import Queue
from daemon.settings import Settings, SettingsError
from daemon.watch import IntakeLoop, Watcher
from lorad_base.signalwake import SignalWake

if TYPE_CHECKING:
    from daemon.remote.coordinator import Coordinator


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


def _resume_fields(settings: Settings, workdir: Path, engine_name: str) -> dict:
    """Step and plan of an unfinished work dir: the marker says where it resumes, and the same
    plan is reused (the engine re-verifies its saved state when it resumes)."""
    from daemon.pipeline import make_engine

    fields: dict = {}
    try:
        state = make_engine(settings, engine_name).saved_state(workdir)
    except SettingsError:
        state = None  # an engine this lorad no longer has: the job fails clearly when it runs
    if state is not None:
        fields["step"] = state.step
    try:
        plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fields
    if isinstance(plan, dict) and plan.get("total_steps"):
        fields["plan"] = json.dumps(plan)
        fields["total_steps"] = plan["total_steps"]
    return fields


def _finished_fields(row: dict, workdir: Path) -> dict:
    """The plan of a finished job's work dir (the dashboard shows it) and, for a record written
    before it kept progress, the total steps (a done job ended at its total)."""
    try:
        plan = json.loads((workdir / "plan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(plan, dict):
        return {}
    fields: dict = {"plan": json.dumps(plan)}
    total = plan.get("total_steps")
    if row.get("total_steps") is None and isinstance(total, int) and not isinstance(total, bool):
        fields["total_steps"] = total
        if row["state"] == "done" and row.get("step") is None:
            fields["step"] = total
    return fields


def recover_work_dirs(settings: Settings, store: JobStore) -> list:
    """Re-adopt work dirs the jobs table does not know (the table was lost or rebuilt): each one's
    job.json becomes its row again, unfinished jobs as `interrupted`. A dir without a usable
    record is logged and left alone: lorad never deletes a work dir it cannot account for."""
    log = logs.get_logger()
    found = []
    if not settings.jobs_dir.is_dir():
        return []
    for path in sorted(settings.jobs_dir.iterdir()):
        if (
            path.name.startswith(".")
            or path.is_symlink()
            or not path.is_dir()
            or store.get(path.name) is not None
        ):
            continue
        record, problem = jobrecord.read_record(path)
        row = None
        if record is not None:
            row, problem = jobrecord.row_from_record(record, path.name)
        if row is None:
            log.warning("job.unrecoverable", path=str(path), problem=problem)
            continue
        found.append((row, path))
    recovered = []
    for row, path in sorted(found, key=lambda item: (item[0]["created_at"], item[0]["id"])):
        if row["state"] == "interrupted":
            row.update(_resume_fields(settings, path, _engine_of(row)))
        else:
            row.update(_finished_fields(row, path))
        job = store.adopt(row)
        recovered.append(job)
        log.info(
            "job.recovered",
            job_id=job.id,
            dataset=job.dataset,
            state=job.state,
            step=job.step,
            path=str(path),
        )
    for job in recovered:
        latest = store.latest_for_dataset(job.dataset_path)
        if job.state == "interrupted" and latest is not None and latest.id == job.id:
            store.refresh_marker(job)
    return recovered


def _engine_of(row: dict) -> str:
    try:
        return str(json.loads(row.get("settings") or "{}").get("engine") or "mflux")
    except (TypeError, ValueError):
        return "mflux"


def open_jobs_store(settings: Settings) -> tuple[JobStore, Path | None, str | None]:
    """The jobs table; a corrupt or unreadable one is moved aside (never deleted) and a new one
    created, to be rebuilt from the work dirs. Returns (store, where the old one went, why)."""
    try:
        return JobStore(settings.jobs_db, jobs_dir=settings.jobs_dir), None, None
    except CorruptDatabase as exc:
        moved = move_aside(settings.jobs_db)
        return JobStore(settings.jobs_db, jobs_dir=settings.jobs_dir), moved, exc.problem


def clean_work_dirs(settings: Settings, store: JobStore) -> list[str]:
    """Remove what a killed daemon left half-written: snapshots being built (.intake-*) and
    lorad's own temp files (outputs, registry, markers, records). Job work dirs are never
    removed here, known or not (recover_work_dirs re-adopts the unknown ones)."""
    removed = []
    if settings.jobs_dir.is_dir():
        for path in settings.jobs_dir.iterdir():
            if path.name.startswith(".intake-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif path.is_dir() and not path.is_symlink():
                removed += remove_stale_temps(path)
    # The registry is written through a symlink, temp file beside its target: look there too.
    registry_dir = Path(os.path.realpath(settings.registry)).parent
    folders = [settings.loras, settings.registry.parent, registry_dir, settings.state]
    if settings.training_data.is_dir():
        folders += [p for p in settings.training_data.iterdir() if p.is_dir() and not p.is_symlink()]
    for folder in folders:
        removed += remove_stale_temps(folder)
    return removed


# macOS refuses an unlimited RLIMIT_NOFILE (its OPEN_MAX is 10240); Linux's nr_open default is 2^20.
_UNLIMITED_FILES = {"darwin": 10240}


def file_limit_target(soft: int, hard: int, platform: str) -> int | None:
    """The soft file limit lorad raises itself to (its hard limit, or the most an unlimited hard
    limit allows), or None when there is nothing to raise (pure)."""
    import resource

    if soft == resource.RLIM_INFINITY:
        return None
    target = _UNLIMITED_FILES.get(platform, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    return target if target > soft else None


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (macOS's default soft limit is 256);
    returns the soft limit in force (the dashboard caps its connections at a quarter of it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = file_limit_target(soft, hard, sys.platform)
    if target is not None:
        for value in dict.fromkeys((target, min(target, 10240))):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
                break
            except (ValueError, OSError):
                continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rescan_wait(interval_s: float, failures: int) -> float:
    """Seconds to the next rescan (pure): the interval; after failures, soon at first and then
    backing off (1, 2, 4 ... s), never longer than the interval."""
    return interval_s if failures == 0 else min(interval_s, float(2 ** min(failures - 1, 16)))


class Daemon:
    def __init__(self, settings: Settings, default_state: Path | None = None):
        self.settings = settings
        self.default_state = default_state  # where the pointer to our settings goes (daemon/effective.py)
        self.shutdown = threading.Event()
        self.signals = 0
        self.log = logs.get_logger()
        self.coordinator: Coordinator | None = (
            None  # scale-out (queue = redis URL): daemon/remote/coordinator.py
        )
        self.rescan_failures = 0  # rescans in a row that could not read training_data
        self.file_limit = 0

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
        if self.coordinator is not None:
            self.coordinator.wake()
        else:
            self.queue.wake.set()

    def run(self) -> int:
        s = self.settings
        logs.configure(
            level=s.log_level,
            log_file=s.log_file,
            max_bytes=s.log_max_bytes,
            backups=s.log_backups,
            secrets=logs.secrets_of(s),
        )
        self.file_limit = raise_file_limit()
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
        from daemon import effective
        from daemon.settings import effective_snapshot

        try:
            data = effective_snapshot(s, os.getpid())
            published = effective.write(s, self.default_state, self.log, data=data)
        except OSError as exc:  # commands then fall back to their own settings; the daemon runs on
            published = []
            self.log.warning("daemon.settings_unwritten", reason=str(exc))
        try:
            return self._run_locked()
        finally:
            effective.remove(published)
            lock.release()

    def _run_locked(self) -> int:
        if self.settings.scale_out:
            return self._run_coordinator()
        s = self.settings
        try:
            store, jobs_moved, jobs_problem = open_jobs_store(s)
            self.pipeline = Pipeline(s, store, self.shutdown)
            try:
                self.queue = Queue(s.queue_db, run_job=self.pipeline.run_job)
            except CorruptDatabase as exc:
                # huey's queue is rebuilt from the jobs table below anyway: set the old one aside.
                moved = move_aside(s.queue_db)
                self.queue = Queue(s.queue_db, run_job=self.pipeline.run_job)
                self.log.warning("queue.db_rebuilt", moved_to=str(moved), reason=exc.problem)
        except (CorruptDatabase, OSError) as exc:
            print(f"lorad: {exc}", file=sys.stderr)
            self.log.error("daemon.corrupt_db", reason=str(exc))
            return 1
        notifier, recovered, removed = self._take_over_state(store, jobs_moved, jobs_problem)
        summary = reconcile(store, self.queue)
        self.log.info(
            "queue.reconciled", removed_dirs=removed, recovered=[j.id for j in recovered], **summary
        )
        threading.Thread(  # cancels given while lorad was down, carried out on the cloud (bounded waits)
            target=cancel_cloud_requests, args=(s, store), name="cloud-cancels", daemon=True
        ).start()

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
        watcher = Watcher(
            s.training_data, loop.schedule, polling=s.observer == "polling", ready_event=loop.ready_event
        )
        watcher.start()
        found = self._rescan(loop)
        from daemon.doctor import announce_weights

        announce_weights(s, self.log)  # missing weights: said now, not after a job fails
        ui = self._start_ui()
        self._say_started(ui)
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            assets=str(s.assets),
            state=str(s.state),
            model=s.model,
            engine=s.engine,
            observer=s.observer,
            ready_found=found,
            file_limit=self.file_limit,
            notify_targets=len(s.notify),  # a count: the URLs hold secrets (daemon/notify.py masks them)
            notify_on=list(s.notify_on),
            ui=ui.url if ui is not None else None,
        )
        started = self._serve_then_stop_intake(loop, watcher, ui)
        # Graceful stop: no new intakes or jobs; the running job checkpoints and is marked interrupted.
        consumer.stop_flag.set()
        self.pipeline.stop_current("shutdown")
        self.queue.wake.set()
        deadline = started + s.stop_timeout_s + 5
        for _name, thread in consumer.worker_threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        still_running = any(t.is_alive() for _n, t in consumer.worker_threads)
        if notifier is not None:
            notifier.stop()  # the interrupted job's message goes out; a few seconds at most
        if not still_running:
            store.close()
        self.log.info(
            "daemon.stopped",
            seconds=round(time.monotonic() - started, 2),
            clean=not still_running,
        )
        logging_flush()
        return 0

    def _serve_then_stop_intake(self, loop: IntakeLoop, watcher: Watcher, ui) -> float:
        """Rescan periodically until a stop signal, then close the doors (dashboard, watcher,
        intake); returns when the stop began (monotonic), for the daemon.stopped line."""
        self._prune()
        with SignalWake() as wake:  # a stop signal wakes this wait whichever thread took it
            while not wake.wait(
                self.shutdown, rescan_wait(self.settings.rescan_interval_s, self.rescan_failures)
            ):
                self._rescan(loop)
                self._prune()
        started = time.monotonic()
        if ui is not None:
            ui.stop()
        watcher.stop()
        loop.stop()
        return started

    def _rescan(self, loop: IntakeLoop) -> int:
        """One rescan of training_data (READY files the watcher missed); an OSError (an NFS or
        SMB hiccup, out of descriptors) is logged and retried after a back-off, never fatal.
        Returns how many READY files it found."""
        try:
            found = loop.rescan(self.settings.training_data)
        except OSError as exc:
            self.rescan_failures += 1
            retry = rescan_wait(self.settings.rescan_interval_s, self.rescan_failures)
            self.log.warning("daemon.rescan_failed", error=f"{type(exc).__name__}: {exc}",
                             path=str(self.settings.training_data), failures=self.rescan_failures,
                             retry_in_s=retry)  # fmt: skip
            return 0
        if self.rescan_failures:
            self.log.info("daemon.rescan_recovered", failures=self.rescan_failures, ready_found=found)
            self.rescan_failures = 0
        return found

    _pruned_at = 0.0

    def _prune(self) -> None:
        """Retention (daemon/retention.py), at start and then at most once an hour; a failure is
        logged and the daemon goes on."""
        from daemon import retention

        if time.monotonic() - self._pruned_at < retention.INTERVAL_S and self._pruned_at:
            return
        self._pruned_at = time.monotonic()
        try:
            store = JobStore(self.settings.jobs_db, check=False, jobs_dir=self.settings.jobs_dir)
            try:
                retention.prune(self.settings, store, log=self.log)
            finally:
                store.close()
        except Exception as exc:
            self.log.warning("retention.failed", error=f"{type(exc).__name__}: {exc}")

    def _take_over_state(self, store: JobStore, jobs_moved: Path | None, jobs_problem: str | None):
        """What both modes do with the state they found: re-adopt work dirs the table lost, clean
        what a killed daemon half-wrote, keep the disk-full reserve; (notifier, recovered, removed)."""
        s = self.settings
        s.training_data.mkdir(parents=True, exist_ok=True)
        s.loras.mkdir(parents=True, exist_ok=True)
        notifier = self._start_notifier(
            store
        )  # before the re-adoption: a crash's interrupted jobs are told too
        recovered = recover_work_dirs(s, store)
        if jobs_moved is not None:
            self.log.warning(
                "jobs.db_rebuilt", moved_to=str(jobs_moved), recovered=len(recovered), reason=jobs_problem
            )
        removed = clean_work_dirs(s, store)
        space.ensure_reserve(s.state)  # room to record a job's end if the state disk fills up
        return notifier, recovered, removed

    def _say_started(self, ui) -> None:
        """One line on the terminal of `lorad run`: where the dashboard is (the log has it too)."""
        s = self.settings
        where = f"dashboard {ui.url}" if ui is not None else "dashboard off"
        print(f"lorad: running (pid {os.getpid()}), model {s.model}, {where}", flush=True)

    def _start_ui(self):
        """The dashboard in a thread (daemon/ui/); None when `ui = false` or it cannot listen
        (one log line: the daemon runs on without it)."""
        if self.settings.ui is None:
            return None
        from daemon.ui.server import UIServer

        server = UIServer(self.settings, self.shutdown, self.log)
        return server if server.start() else None

    def _start_notifier(self, store: JobStore):
        """The job-end notifier (daemon/notify.py), watching every transition; None without targets.
        Imported only when targets are set; apprise itself loads only in its delivery child."""
        if not self.settings.notify:
            return None
        from daemon.notify import make_notifier

        notifier = make_notifier(self.settings, self.log)
        if notifier is not None:
            store.observers.append(notifier.on_transition)
            notifier.start()
        return notifier

    def _start_intake(self, store: JobStore, enqueue) -> tuple[IntakeLoop, Watcher, int]:
        s = self.settings
        intake = Intake(s, store, enqueue)
        loop = IntakeLoop(intake.take, settle_s=s.settle_s)
        loop.start()
        watcher = Watcher(
            s.training_data, loop.schedule, polling=s.observer == "polling", ready_event=loop.ready_event
        )
        watcher.start()
        return loop, watcher, self._rescan(loop)

    def _run_coordinator(self) -> int:
        """`lorad run` with a Redis queue: the same watcher, intake and jobs table; jobs go to
        workers through the coordinator (and to a worker in this process unless local_worker is
        false). The SQLite queue is not used."""
        from daemon.remote.coordinator import Coordinator
        from daemon.remote.redisurl import mask

        s = self.settings
        try:
            store, jobs_moved, jobs_problem = open_jobs_store(s)
        except (CorruptDatabase, OSError) as exc:
            print(f"lorad: {exc}", file=sys.stderr)
            self.log.error("daemon.corrupt_db", reason=str(exc))
            return 1
        notifier, recovered, removed = self._take_over_state(store, jobs_moved, jobs_problem)
        self.log.info(
            "queue.reconciled", removed_dirs=removed, recovered=[j.id for j in recovered], queue=mask(s.queue)
        )
        coordinator = Coordinator(s, store, self.shutdown)
        self.coordinator = coordinator
        coordinator.start()
        worker_stop = threading.Event()
        worker_thread = None
        if s.local_worker:
            worker_thread = threading.Thread(
                target=self._local_worker, args=(worker_stop,), name="lorad-local-worker", daemon=True
            )
            worker_thread.start()
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_wake)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        loop, watcher, found = self._start_intake(store, coordinator.wake)
        from daemon.doctor import announce_weights

        announce_weights(s, self.log)
        ui = self._start_ui()
        self._say_started(ui)
        self.log.info("daemon.started", pid=os.getpid(), assets=str(s.assets), state=str(s.state), model=s.model,
                      engine=s.engine, observer=s.observer, ready_found=found, file_limit=self.file_limit, queue=mask(s.queue),
                      local_worker=s.local_worker, notify_targets=len(s.notify), notify_on=list(s.notify_on),
                      ui=ui.url if ui is not None else None)  # fmt: skip
        started = self._serve_then_stop_intake(loop, watcher, ui)
        worker_stop.set()  # the local worker's job checkpoints; its state reaches Redis first
        clean = True
        if worker_thread is not None:
            worker_thread.join(s.stop_timeout_s + 5)
            clean = not worker_thread.is_alive()
        clean = coordinator.join(15) and clean
        if notifier is not None:
            notifier.stop()
        if clean:
            store.close()
        self.log.info("daemon.stopped", seconds=round(time.monotonic() - started, 2), clean=clean)
        logging_flush()
        return 0

    def _local_worker(self, stop: threading.Event) -> None:
        """The coordinator's own worker: the same code as `lorad worker`, own state dir."""
        from daemon.remote.worker import RemoteWorker
        from daemon.settings import resolve

        s = self.settings
        values = {name: getattr(s, name) for name in ("assets", "model", "engine", "ram_gb", "keep_awake", "stop_timeout_s",
                                                       "lease_ttl_s", "download_models", "log_level")}  # fmt: skip
        worker_settings = resolve(flags={**values, "state_dir": s.state / "worker"})
        worker_settings = _with_engines(worker_settings, s.engines)
        try:
            RemoteWorker(worker_settings, s.queue, shutdown=stop, name=None).run()
        except Exception:
            self.log.exception("worker.crashed")


def _with_engines(settings: Settings, engines: dict) -> Settings:
    from daemon.settings import FIELDS

    values = {name: getattr(settings, name) for name in FIELDS}
    values["engines"] = engines
    return Settings(**values)


def logging_flush() -> None:
    import logging

    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass


def run(settings: Settings, default_state: Path | None = None) -> int:
    return Daemon(settings, default_state).run()
