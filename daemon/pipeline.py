"""Run one job through its phases: preparing -> training -> rendering -> publishing -> done.

Called by the queue's single worker thread with a job id. The jobs table decides: a stale huey
task (job cancelled, already done) is dropped. Training and rendering run in engine child
processes; a stop request (daemon shutdown or user cancel) reaches them through a StopToken.
"""

from __future__ import annotations

import json
import threading
import time
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
from daemon.fsutil import atomic_write_text
from daemon.intake import markers
from daemon.intake.snapshot import CAPTIONS_LIST
from daemon.jobs import FINISHED, RUNNABLE, Job, JobStore, StateChanged
from daemon.logs import get_logger
from daemon.metrics import learning_metrics, read_series, render_difference
from daemon.publish import (
    METRICS_FILE,
    PublishError,
    complete_registry,
    provenance,
    publish,
    published_by,
    spelling_on_disk,
    write_with_metadata,
)
from daemon.settings import Settings, SettingsError
from engines.base import (
    Engine,
    JobInput,
    Machine,
    MemoryPlanError,
    PlanError,
    Progress,
    RenderFailed,
    RenderResult,
    RenderStopped,
    StopToken,
    TrainingPlan,
    TrainStatus,
    machine_now,
)


def cancel_cloud_requests(settings: Settings, store) -> list[str]:
    """At start: a cancel given while lorad was down (the job is `cancelled`, or will be when it
    is next taken) is carried out on the cloud, whose request would otherwise run on and bill.
    Each engine that can (`cancel_remote`) cancels and records the outcome; returns the job ids."""
    from engines.base import CANCEL_OUTCOME_FILE

    done = []
    for job in store.list():
        workdir = settings.jobs_dir / job.id
        wanted = job.state == "cancelled" or bool(getattr(job, "cancel_requested", 0))
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


def stamp_adapter(
    engine: Engine, job: Job, plan: TrainingPlan, adapter: Path, lora_file: Path, image_count: int
) -> None:
    """The trained adapter with lorad's provenance header and the engine's metadata keys."""
    write_with_metadata(
        adapter,
        lora_file,
        provenance(
            job=job,
            plan=plan.to_dict(),
            fingerprint=job.fingerprint,
            image_count=image_count,
            engine_keys=engine.adapter_metadata(plan),
        ),
    )


def write_metrics(workdir: Path, plan: TrainingPlan, rendered: RenderResult) -> Path:
    """metrics.json in the work dir: the loss series (progress.jsonl) and the renders' difference."""
    effect = None
    if Path(rendered.base) != Path(rendered.with_lora):  # a render without its base: no effect to measure
        effect = render_difference(Path(rendered.base), Path(rendered.with_lora))
    metrics = learning_metrics(
        read_series(workdir / "progress.jsonl"), steps=plan.total_steps, lora_effect=effect
    )
    path = workdir / METRICS_FILE
    atomic_write_text(path, json.dumps(metrics, indent=2))
    return path


def publish_job(
    settings: Settings,
    job: Job,
    plan: TrainingPlan,
    lora_file: Path,
    rendered: RenderResult,
    report_files: list[Path],
    store: JobStore | None = None,
) -> dict:
    """The normal publish path (daemon/publish.py) for a job trained here or on a worker. The
    snapshot's captions.jsonl (each image's caption and its source) joins the report, and the
    learning metrics (daemon/metrics.py) go into it as metrics.json; with `store`, older jobs
    whose LoRA just moved to `<name>.v<N>` are told (follow_versions)."""
    captions = settings.jobs_dir / job.id / CAPTIONS_LIST
    if captions.is_file() and all(p.name != CAPTIONS_LIST for p in report_files):
        report_files = [*report_files, captions]
    metrics_file = write_metrics(settings.jobs_dir / job.id, plan, rendered)
    outputs = publish(
        loras=settings.loras,
        registry_path=settings.registry,
        job=job,
        lora_file=lora_file,
        render_with=rendered.with_lora,
        render_compare=rendered.compare,
        report_files=[*report_files, metrics_file],
        plan=plan.to_dict(),
        lock_timeout_s=settings.lock_timeout_s,
    )
    if store is not None:
        follow_versions(settings, store, job.name)
    return outputs


def follow_versions(settings: Settings, store: JobStore, name: str) -> list[str]:
    """Rewrite the outputs (row, job.json, DONE) of every done job whose LoRA now lives under
    `<name>.v<N>` (read from the files' headers, so a crash mid-way is caught by the next
    publish); returns their ids. Best effort: the LoRA files themselves are already right."""
    from daemon import registry
    from daemon.publish import moved_outputs, version_owners

    owners = version_owners(settings.loras, name)
    if not owners:
        return []
    try:
        entries = registry.load(settings.registry).get("loras") or {}
    except registry.RegistryError:
        entries = {}
    keys = {v.get("job_id"): k for k, v in entries.items() if isinstance(v, dict)}
    moved = []
    for job_id, stem in owners.items():
        job = store.get(job_id)
        if job is None or job.state != "done":
            continue
        outputs = moved_outputs(job.outputs, settings.loras, stem, keys.get(job_id))
        if outputs is not None:
            store.move_outputs(job_id, outputs)
            moved.append(job_id)
    return moved


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
            if job is not None and job.state == "training":
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
    def __init__(self, settings: Settings, store: JobStore, shutdown: threading.Event):
        self.settings = settings
        self.store = store
        self.shutdown = shutdown
        self.log = get_logger()
        self.current_stop: StopToken | None = None

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
                self._advance(job_id, "cancelled", RUNNABLE)
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
            if job is not None and job.state not in ("done", "failed", "cancelled"):
                self.store.transition(job_id, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
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
                self.store.transition(job_id, "failed", error=error)
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
            self.store.transition(job_id, "cancelled")
        else:
            if step is not None:
                self.store.transition(job_id, "interrupted", step=step)
            else:
                self.store.transition(job_id, "interrupted")

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
        if not self._advance(job_id, "preparing", RUNNABLE):
            return
        job = self._job(job_id)
        if published_by(self.settings.loras, job):
            self._complete_registry(job)
            return
        workdir = self.settings.jobs_dir / job.id
        if not (workdir / "manifest.json").is_file():
            self.store.transition(
                job_id, "failed", error=f"{markers.SNAPSHOT_MISSING} ({workdir}); drop READY again"
            )
            return
        try:
            engine = make_engine(self.settings, job.settings.get("engine", "mflux"))
        except SettingsError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        if not self._caption(job, workdir, stop):
            return
        spec = job_input(job, workdir)
        machine = machine_now(self.settings.ram_gb)
        plan_path = workdir / "plan.json"
        try:
            if plan_path.is_file() and job.plan:
                plan = TrainingPlan.from_dict(json.loads(plan_path.read_text()))  # resume: same plan
            else:
                plan = engine.plan(job=spec, machine=machine)
        except MemoryPlanError as exc:
            fallback = self._cloud_fallback(job, engine, spec, machine, exc)
            if fallback is None:
                return
            engine, plan = fallback
        except PlanError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        self.store.update(job_id, plan=plan.to_dict(), total_steps=plan.total_steps)
        self.log.info(
            "job.plan",
            tier=plan.tier,
            reason=plan.reason,
            warnings=plan.warnings,
            total_steps=plan.total_steps,
        )
        problem = self._training_space_problem(job, engine, plan, workdir)
        if problem is not None:
            self.store.transition(job_id, "failed", error=problem)
            return
        if stop.requested() or self.shutdown.is_set():
            stop.stop(stop.reason or "shutdown")
            self._stopped(job_id, stop)
            return

        if not self._advance(job_id, "training", "preparing"):
            return
        sink = ProgressSink(
            self.store, job_id, self.settings.marker_refresh_s, series=workdir / "progress.jsonl"
        )
        while True:
            try:
                result = engine.train(
                    plan=plan, workdir=workdir, progress=sink, stop=stop, on_spawn=self._on_spawn
                )
            finally:
                sink.close()
            if result.status is TrainStatus.COMPLETED:
                break
            if result.status is TrainStatus.STOPPED:
                self._stopped(job_id, stop, result.step)
                return
            error = result.error or "training failed"
            if plan.step_downs == 0:
                try:
                    lower = engine.step_down(plan=plan, job=spec, machine=machine, failed=result)
                except PlanError as exc:
                    lower, error = None, f"{error}; {exc}"
                if lower is not None:
                    self.log.warning(
                        "job.stepdown", from_tier=plan.tier, to_tier=lower.tier, reason=result.error
                    )
                    plan = lower
                    self.store.update(job_id, plan=plan.to_dict(), total_steps=plan.total_steps)
                    continue
            if space.looks_like_disk_full(error):
                self._fail_disk_full(job_id, error, workdir)
                return
            self.store.transition(job_id, "failed", error=error)
            return
        if not self._advance(job_id, "rendering", "training"):
            return
        job = self._job(job_id)
        lora_file = workdir / f"{job.name}.safetensors"
        if result.adapter is None:
            self.store.transition(
                job_id, "failed", error=f"the {engine.name} engine finished without an adapter file"
            )
            return
        stamp_adapter(engine, job, plan, result.adapter, lora_file, spec.image_count)
        rendered = renderer_for(self.settings, engine).render(
            plan=plan,
            workdir=workdir,
            lora=lora_file,
            prompt=spec.preview_prompt,
            out_dir=workdir / "render",
            stop=stop,
        )
        if isinstance(rendered, RenderStopped):
            self._stopped(job_id, stop)
            return
        if isinstance(rendered, RenderFailed):
            self.store.transition(job_id, "failed", error=f"test render failed: {rendered.error}")
            return
        if not self._advance(job_id, "publishing", "rendering"):
            return  # cancelled after the render: nothing is published
        try:
            outputs = publish_job(
                self.settings, job, plan, lora_file, rendered, engine.report_files(workdir), self.store
            )
        except PublishError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        self.store.transition(job_id, "done", outputs=outputs, eta_s=0)

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
            self.store.transition(job.id, "failed", error=result)
        return False

    def _cloud_fallback(self, job, engine: Engine, spec: JobInput, machine: Machine, exc: PlanError):
        """`cloud_fallback`: a job no local plan fits (memory) goes to the cloud engine it names;
        the job's settings record the switch, so a restart resumes it there. None: the job failed."""
        cloud_engine = fallback_engine(self.settings)
        if cloud_engine is None or engine.name == cloud_engine:
            self.store.transition(job.id, "failed", error=str(exc))
            return None
        try:
            cloud = make_engine(self.settings, cloud_engine)
            plan = cloud.plan(job=spec, machine=machine)
        except (SettingsError, PlanError) as cloud_exc:
            self.store.transition(
                job.id, "failed", error=f"{exc}; cloud_fallback to {cloud_engine} failed too: {cloud_exc}"
            )
            return None
        self.log.warning(
            "job.cloud_fallback", from_engine=engine.name, to_engine=cloud_engine, reason=str(exc)
        )
        self.store.update(
            job.id, settings={**job.settings, "engine": cloud_engine, "fallback_from": engine.name}
        )
        return cloud, plan

    def _complete_registry(self, job) -> None:
        """The job's LoRA is already published (its header names this job): only its registry
        entry is missing (the lock was held, or lorad stopped mid-publish). Nothing is
        retrained or rendered again, and no `.v<N>` of its own file is made."""
        spelling = spelling_on_disk(self.settings.loras, job.name)
        self.log.info("job.registry_only", lora=str(self.settings.loras / f"{spelling}.safetensors"))
        if not self._advance(job.id, "publishing", ("preparing",)):
            return
        try:
            outputs = complete_registry(
                loras=self.settings.loras,
                registry_path=self.settings.registry,
                job=job,
                lock_timeout_s=self.settings.lock_timeout_s,
            )
        except PublishError as exc:
            self.store.transition(job.id, "failed", error=str(exc))
            return
        self.store.transition(job.id, "done", outputs=outputs, eta_s=0)

    def _training_space_problem(self, job, engine: Engine, plan: TrainingPlan, workdir: Path) -> str | None:
        """Refuse before training when its checkpoints cannot fit (needed vs free, which disk)."""
        needed = space.space_needed("train", engine_bytes=engine.disk_needed(plan=plan, workdir=workdir))
        free = space.free_bytes(workdir)
        problem = space.space_problem("training", workdir, needed, free, f"run: lorad retry {job.id}")
        if problem is not None:
            self.log.warning(
                "space.refused", phase="train", path=str(workdir), needed_bytes=needed, free_bytes=free
            )
        return problem

    def _on_spawn(self, pid: int) -> None:
        self.log.info("job.child", pid=pid)
