"""Run one job through its phases: preparing -> training -> rendering -> publishing -> done.

Called by the queue's single worker thread (or `Queue.run_pending` in the caller's thread) with a
job id. The jobs table decides: a stale huey task (job cancelled, already done) is dropped. The run
itself is JobRunner's (daemon/runner.py, shared with the Redis worker); `LocalEvents` turns its news
into transitions of the jobs table. Training and rendering run in engine child processes; a stop
request (daemon shutdown or user cancel) reaches them through a StopToken.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon import space
from daemon.engine_host import (  # noqa: F401 (callers import them here)
    CLOUD_ENGINE,
    check_engine_settings,
    fallback_engine,
    job_input,
    make_engine,
    renderer_for,
)
from daemon.intake import markers
from daemon.jobs import FINISHED, RUNNABLE, Job, JobStore, StateChanged
from daemon.logs import get_logger
from daemon.publish import PublishError
from daemon.publisher import (  # noqa: F401 (re-exported: callers and tests import them here)
    Publisher,
    follow_versions,
    publish_job,
    stamp_adapter,
    write_metrics,
)
from daemon.runner import FailKind, JobRunner, RunResult
from daemon.settings import Settings, SettingsError
from daemon.states import JobState
from engines.base import (
    Engine,
    Progress,
    StopToken,
    TrainingPlan,
    machine_now,
)
from lorad_base.workdir import WorkDir


def cancel_cloud_requests(settings: Settings, store) -> list[str]:
    """At start: a cancel given while lorad was down (the job is `cancelled`, or will be when it
    is next taken) is carried out on the cloud, whose request would otherwise run on and bill.
    Each engine that can (`cancel_remote`) cancels and records the outcome; returns the job ids."""
    from engines.base import CANCEL_OUTCOME_FILE

    done = []
    for job in store.list():
        workdir = WorkDir.of(settings.jobs_dir, job.id).root
        wanted = job.state == JobState.CANCELLED or bool(getattr(job, "cancel_requested", 0))
        if not wanted or (workdir / CANCEL_OUTCOME_FILE).exists() or not job.remote.get("request_id"):
            continue
        try:
            engine = make_engine(settings, job.settings.get("engine", "mflux"))
            cancel_remote = getattr(engine, "cancel_remote", None)
            if cancel_remote is not None and cancel_remote(workdir):
                done.append(job.id)
        except Exception as exc:  # told; the next start tries again
            get_logger().warning("job.cloud_cancel_failed", job_id=job.id, error=str(exc))
    return done


class ProgressSink:
    """Throttled progress: the db at most once a second, the marker every marker_refresh_s,
    a job.progress log line every 30 s (and at the end).

    Throttling keeps a trailing edge: progress held back (steps that came quickly, then a long
    step or a preview) is written by a timer when its slot comes, so the TRAINING marker is never
    more than marker_refresh_s behind the table. `close()` (training over) cancels that timer
    before the job's next state writes its own marker."""

    def __init__(self, store: JobStore, job_id: str, marker_refresh_s: float, series: Path | None = None):
        self.store, self.job_id = store, job_id
        self.series = series  # progress.jsonl: the (step, loss) points the dashboard's loss curve draws
        self.marker_refresh_s = marker_refresh_s
        self._last_db = self._last_marker = self._last_log = float("-inf")
        self.log = get_logger()
        self._lock = threading.Lock()
        self._pending: Progress | None = None  # newest progress not yet in the db
        self._marker_stale = False  # the db is ahead of the marker
        self._timer: threading.Timer | None = None
        self._closed = False
        self._remote: dict | None = None
        self._last_point: int | None = None

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final = p.step >= p.total
        if p.remote is not None and p.remote != self._remote:
            # A remote request's identity is stored at once, never throttled: it is what
            # `lorad status` shows of a paid request (the engine's workdir copy is what re-attaches).
            self._remote = dict(p.remote)
            self.store.update(self.job_id, remote=self._remote, note=p.note)
            self.log.info(
                "job.remote",
                **{
                    k: v
                    for k, v in self._remote.items()
                    if k in ("engine", "endpoint", "request_id", "state")
                },
            )
        with self._lock:
            self._closed = False
            self._pending = p
            self._append_point(p)
            self._flush(now, final)
        if final or now - self._last_log >= 30.0:
            self._last_log = now
            self.log.info("job.progress", step=p.step, total=p.total, loss=p.loss, eta_s=p.eta_s)

    def close(self) -> None:
        """Stop the trailing timer; call before the job leaves the training phase."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _flush(self, now: float, final: bool = False) -> None:
        """Write what is due (caller holds the lock), and arm the timer for what is not."""
        job = None
        if self._pending is not None and (final or now - self._last_db >= 1.0):
            p, self._pending = self._pending, None
            self._last_db = now
            fields: dict[str, object] = dict(step=p.step, total_steps=p.total, loss=p.loss)
            if p.note is not None:
                fields["note"] = p.note
            if (
                p.eta_s is not None or p.step <= 1
            ):  # a resumed run's first step has no rate yet: keep the last ETA
                fields["eta_s"] = p.eta_s
            job = self.store.update(self.job_id, **fields)
            self._marker_stale = True
        if self._marker_stale and (final or now - self._last_marker >= self.marker_refresh_s):
            job = job or self.store.get(self.job_id)
            if job is not None and job.state == JobState.TRAINING:
                self.store.refresh_marker(job)
            self._last_marker = now
            self._marker_stale = False
        if self._pending is None and not self._marker_stale:
            return
        due = self._last_marker + self.marker_refresh_s
        if self._pending is not None:
            due = min(due, self._last_db + 1.0)
        if self._timer is None and not self._closed:
            self._timer = threading.Timer(max(0.0, due - now), self._on_timer)
            self._timer.daemon = True
            self._timer.start()

    def _append_point(self, p: Progress) -> None:
        """One line per training step (the learning metrics' loss series, daemon/metrics.py):
        a short append, and a torn last line is skipped by the reader. Best effort: the series
        is a view, never a reason to stop training."""
        if self.series is None or p.loss is None or p.step == self._last_point:
            return
        self._last_point = p.step
        try:
            with self.series.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": p.step, "loss": p.loss, "t": round(time.time(), 2)}) + "\n")
        except OSError:
            pass

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed:
                return
            try:
                self._flush(time.monotonic())
            except Exception:  # the next step retries; the timer thread must not die with a traceback
                self.log.exception("job.progress_flush_failed", job_id=self.job_id)


class Pipeline:
    """The local dispatcher's job: huey hands it a job id, the jobs table decides whether it runs;
    the run itself is JobRunner's (daemon/runner.py), its news goes to the table (LocalEvents)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        shutdown: threading.Event,
        *,
        engines: Callable[[Settings, str], Engine] = make_engine,
    ):
        self.settings = settings
        self.store = store
        self.shutdown = shutdown
        self.log = get_logger()
        self.current_stop: StopToken | None = None
        self.engines = engines  # settings, name -> engine (a test passes its in-process fake)
        self.publisher = Publisher(settings, store)

    def stop_current(self, reason: str) -> None:
        token = self.current_stop
        if token is not None:
            token.stop(reason)

    def _cancel_requested(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return bool(job and job.cancel_requested)

    def run_job(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state not in RUNNABLE:
            self.log.info("queue.stale", job_id=job_id, state=job.state if job else None)
            return
        if self.shutdown.is_set():
            return  # stays queued/interrupted in the table; the next start re-enqueues it
        structlog.contextvars.bind_contextvars(job_id=job.id, dataset=job.dataset)
        stop = StopToken(check_cancel=lambda: self._cancel_requested(job_id))
        self.current_stop = stop
        try:
            if job.cancel_requested:
                self._advance(job_id, JobState.CANCELLED, RUNNABLE)
                return
            space.ensure_reserve(self.settings.state)  # room for the final write if the disk fills
            self._run(job_id, stop)
        except Exception as exc:
            if space.is_disk_full(exc):
                filename = getattr(exc, "filename", None)
                self._fail_disk_full(
                    job_id, f"{type(exc).__name__}: {exc}", Path(filename).parent if filename else None
                )
                return
            self.log.exception("job.crashed")
            job = self.store.get(job_id)
            if job is not None and job.state not in FINISHED:
                self.store.transition(
                    job_id, JobState.FAILED, error=f"internal error: {type(exc).__name__}: {exc}"
                )
        finally:
            self.current_stop = None
            structlog.contextvars.unbind_contextvars("job_id", "dataset")

    def _fail_disk_full(self, job_id: str, detail: str, where: Path | None = None) -> None:
        """A full disk must end the job visibly (failed, retryable), never leave it looking alive.
        One job.disk_full line with the free bytes; the reserve file is deleted to make room for
        that line and the failed row. If even that write fails (something else took the space),
        it is retried with bounded backoff until it lands or the daemon stops (the next start
        then marks the job interrupted)."""
        where = Path(where or self.settings.state)
        free = space.free_bytes(where)
        released = space.release_reserve(self.settings.state)
        self.log.error(
            "job.disk_full", path=str(where), free_bytes=free, released_bytes=released, error=detail
        )
        error = (
            f"the disk holding {where} is full ({space.human(free)} free): {detail}. "
            f"Free some space there, then run: lorad retry {job_id}"
        )
        delay = 1.0
        while True:
            try:
                job = self.store.get(job_id)
                if job is None or job.state in FINISHED:
                    return
                self.store.transition(job_id, JobState.FAILED, error=error)
                return
            except Exception as again:
                if not space.is_disk_full(again):
                    raise
                self.log.warning("job.disk_full_retry", retry_in_s=delay, free_bytes=space.free_bytes(where))
            if self.shutdown.wait(delay):
                return
            delay = min(60.0, delay * 2)

    def _stopped(self, job_id: str, stop: StopToken, step: int | None = None) -> None:
        if stop.reason == "cancel":
            self.store.transition(job_id, JobState.CANCELLED)
        elif step is not None:
            self.store.transition(job_id, JobState.INTERRUPTED, step=step)
        else:
            self.store.transition(job_id, JobState.INTERRUPTED)

    def _advance(self, job_id: str, new: str, expect) -> bool:
        """Move to the next phase as a compare-and-set. False when the job does not go on: it was
        cancelled at this boundary (the same transaction saw the request) or, before it started,
        moved by someone else (a `lorad cancel` of the queued job won)."""
        try:
            job = self.store.transition(job_id, new, expect=expect)
        except StateChanged as exc:
            self.log.info("queue.stale", job_id=job_id, state=exc.current)
            return False
        return job.state == new

    def _job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(f"job {job_id} is not in the jobs table")
        return job

    def _run(self, job_id: str, stop: StopToken) -> None:
        if not self._advance(job_id, JobState.PREPARING, RUNNABLE):
            return
        job = self._job(job_id)
        if self.publisher.already_published(job):
            self._complete_registry(job)
            return
        workdir = WorkDir.of(self.settings.jobs_dir, job.id)
        if not workdir.manifest.is_file():
            self.store.transition(
                job_id,
                JobState.FAILED,
                error=f"{markers.SNAPSHOT_MISSING} ({workdir.root}); drop READY again",
            )
            return
        try:
            engine = self.engines(self.settings, job.settings.get("engine", "mflux"))
        except SettingsError as exc:
            self.store.transition(job_id, JobState.FAILED, error=str(exc))
            return
        if not self._caption(job, workdir.root, stop):
            return
        spec = job_input(job, workdir.root)
        events = LocalEvents(self, job, workdir, stop, spec.image_count)
        machine = machine_now(self.settings.ram_gb)
        runner = JobRunner(
            self.settings, engine, spec, workdir, machine, stop, events, log=self.log, engines=self.engines
        )
        runner.run(saved_plan(job, workdir))

    def _caption(self, job: Job, workdir: Path, stop: StopToken) -> bool:
        """missing_captions = "vlm": caption the snapshot's uncaptioned images (a child process,
        ended before training plans its memory). False: the job stopped or failed here."""
        from daemon.captions import caption_missing

        result = caption_missing(self.settings, self.store, job, workdir, stop, on_spawn=self._on_spawn)
        if result == "ok":
            return True
        if result == "stopped":
            self._stopped(job.id, stop)
        else:
            self.store.transition(job.id, JobState.FAILED, error=result)
        return False

    def _complete_registry(self, job: Job) -> None:
        """The job's LoRA is already published (its header names this job): only its registry
        entry is missing. Nothing is retrained or rendered again (Publisher.registry_only)."""
        self.publisher.log_registry_only(job)
        if not self._advance(job.id, JobState.PUBLISHING, (JobState.PREPARING,)):
            return
        try:
            outputs = self.publisher.registry_only(job)
        except PublishError as exc:
            self.store.transition(job.id, JobState.FAILED, error=str(exc))
            return
        self.store.transition(job.id, JobState.DONE, outputs=outputs, eta_s=0)

    def _on_spawn(self, pid: int) -> None:
        self.log.info("job.child", pid=pid)


def saved_plan(job: Job, workdir: WorkDir) -> TrainingPlan | None:
    """A resumed job keeps the plan it started with (its plan.json); None: plan afresh."""
    if workdir.plan.is_file() and job.plan:
        return TrainingPlan.from_dict(json.loads(workdir.plan.read_text()))
    return None


class LocalEvents:
    """The local pipeline's RunEvents: every boundary a compare-and-set on the jobs table,
    progress through ProgressSink, the result through the Publisher."""

    def __init__(self, pipeline: Pipeline, job: Job, workdir: WorkDir, stop: StopToken, image_count: int):
        self.pipeline, self.store = pipeline, pipeline.store
        self.job, self.job_id, self.workdir, self.stop = job, job.id, workdir, stop
        self.image_count = image_count
        self.engine: Engine | None = None
        self.sink: ProgressSink | None = None

    def planned(self, plan: TrainingPlan, engine: Engine, fallback_from: str | None) -> None:
        self.engine = engine
        if fallback_from is not None:  # the job's settings record the switch: a restart resumes there
            settings = {**self.job.settings, "engine": engine.name, "fallback_from": fallback_from}
            self.job = self.store.update(self.job_id, settings=settings)
        self.store.update(self.job_id, plan=plan.to_dict(), total_steps=plan.total_steps)

    def training(self) -> bool:
        if self.stop.requested() or self.pipeline.shutdown.is_set():
            self.stop.stop(self.stop.reason or "shutdown")
            self.pipeline._stopped(self.job_id, self.stop)
            return False
        if not self.pipeline._advance(self.job_id, JobState.TRAINING, JobState.PREPARING):
            return False
        self.sink = ProgressSink(
            self.store, self.job_id, self.pipeline.settings.marker_refresh_s, series=self.workdir.progress
        )
        return True

    def progress(self, p: Progress) -> None:
        if self.sink is not None:
            self.sink(p)

    def checkpoint(self) -> None:
        """Local checkpoints stay where the engine wrote them."""

    def plan_changed(self, plan: TrainingPlan) -> None:
        self.store.update(self.job_id, plan=plan.to_dict(), total_steps=plan.total_steps)

    def training_over(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def rendering(self, step: int | None) -> bool:
        return self.pipeline._advance(self.job_id, JobState.RENDERING, JobState.TRAINING)

    def adapter(self, plan: TrainingPlan, adapter: Path) -> Path:
        self.job = self.pipeline._job(self.job_id)
        assert self.engine is not None  # planned() came first
        return self.pipeline.publisher.stamp(self.engine, self.job, plan, adapter, self.image_count)

    def done(self, result: RunResult) -> None:
        if not self.pipeline._advance(self.job_id, JobState.PUBLISHING, JobState.RENDERING):
            return  # cancelled after the render: nothing is published
        try:
            outputs = self.pipeline.publisher.publish(
                self.job, result.plan, result.lora, result.rendered, result.report_files
            )
        except PublishError as exc:
            self.store.transition(self.job_id, JobState.FAILED, error=str(exc))
            return
        self.store.transition(self.job_id, JobState.DONE, outputs=outputs, eta_s=0)

    def stopped(self, step: int | None, reason: str | None) -> None:
        self.pipeline._stopped(self.job_id, self.stop, step)

    def failed(self, error: str, kind: FailKind, step: int | None = None) -> None:
        if kind is FailKind.DISK_FULL:
            self.pipeline._fail_disk_full(self.job_id, error, self.workdir.root)
            return
        if kind is FailKind.RENDER:
            error = f"test render failed: {error}"
        self.store.transition(self.job_id, JobState.FAILED, error=error)
