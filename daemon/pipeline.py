"""Run one job through its phases: preparing -> training -> rendering -> publishing -> done.

Called by the queue's single worker thread with a job id. The jobs table decides: a stale huey
task (job cancelled, already done) is dropped. Training and rendering run in engine child
processes; a stop request (daemon shutdown or user cancel) reaches them through a StopToken.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import structlog

from daemon.jobs import RUNNABLE, JobStore
from daemon.logs import get_logger
from daemon.publish import PublishError, provenance, publish, write_with_metadata
from daemon.settings import Settings, SettingsError
from engines.base import (
    Engine,
    EngineContext,
    EngineSettingsError,
    JobInput,
    Machine,
    PlanError,
    Progress,
    RenderFailed,
    RenderStopped,
    StopToken,
    TrainingPlan,
    TrainStatus,
    coerce_options,
    engine_class,
    get_engine,
)


def machine_now(memory_override_gb: float | None = None) -> Machine:
    import platform

    mem = psutil.virtual_memory()
    gb = 1024**3
    return Machine(
        total_gb=mem.total / gb,
        available_gb=mem.available / gb,
        platform=sys.platform,
        apple_silicon=sys.platform == "darwin" and platform.machine() == "arm64",
        memory_override_gb=memory_override_gb,
    )


def make_engine(settings: Settings, name: str | None = None) -> Engine:
    """The engine `name` (default: the `engine` setting) with its `[engines.<name>]` section;
    SettingsError when the name is unknown or the section is bad."""
    name = name or settings.engine
    context = EngineContext(settings.state, settings.stop_timeout_s, settings.keep_awake, settings.engines.get(name, {}))
    try:
        return get_engine(name, context)
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def check_engine_settings(settings: Settings) -> None:
    """At start: the chosen engine and every `[engines.<name>]` section must be known and valid."""
    try:
        engine_class(settings.engine)
        for name, raw in settings.engines.items():
            coerce_options(name, engine_class(name).options, raw)
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def job_input(job, workdir: Path) -> JobInput:
    manifest = json.loads((workdir / "manifest.json").read_text(encoding="utf-8"))
    images = manifest["images"]
    return JobInput(
        job_id=job.id,
        name=job.name,
        trigger=job.trigger_word,
        model=job.settings.get("model", "z-image-turbo"),
        image_count=len(images),
        max_side=max((max(i["width"], i["height"]) for i in images), default=0),
        options=manifest.get("options", {}),
        data_dir=workdir / "data",
        preview_prompt=manifest.get("preview_prompt") or f"{job.trigger_word}, portrait photo",
    )


class ProgressSink:
    """Throttled progress: the db at most once a second, the marker every marker_refresh_s,
    a job.progress log line every 30 s (and at the end)."""

    def __init__(self, store: JobStore, job_id: str, marker_refresh_s: float):
        self.store, self.job_id = store, job_id
        self.marker_refresh_s = marker_refresh_s
        self._last_db = self._last_marker = self._last_log = 0.0
        self.log = get_logger()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        final = p.step >= p.total
        if final or now - self._last_db >= 1.0:
            self._last_db = now
            job = self.store.update(self.job_id, step=p.step, total_steps=p.total, loss=p.loss, eta_s=p.eta_s)
            if final or now - self._last_marker >= self.marker_refresh_s:
                self._last_marker = now
                self.store.refresh_marker(job)
        if final or now - self._last_log >= 30.0:
            self._last_log = now
            self.log.info("job.progress", step=p.step, total=p.total, loss=p.loss, eta_s=p.eta_s)


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
                self.store.transition(job_id, "cancelled")
                return
            self._run(job_id, stop)
        except Exception as exc:
            self.log.exception("job.crashed")
            job = self.store.get(job_id)
            if job is not None and job.state not in ("done", "failed", "cancelled"):
                self.store.transition(job_id, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.current_stop = None
            structlog.contextvars.unbind_contextvars("job_id", "dataset")

    def _stopped(self, job_id: str, stop: StopToken, step: int | None = None) -> None:
        if stop.reason == "cancel":
            self.store.transition(job_id, "cancelled")
        else:
            fields = {"step": step} if step is not None else {}
            self.store.transition(job_id, "interrupted", **fields)

    def _run(self, job_id: str, stop: StopToken) -> None:
        job = self.store.transition(job_id, "preparing")
        workdir = self.settings.jobs_dir / job.id
        if not (workdir / "manifest.json").is_file():
            self.store.transition(job_id, "failed", error=f"the job's snapshot is missing ({workdir}); drop READY again")
            return
        try:
            engine = make_engine(self.settings, job.settings.get("engine", "mflux"))
        except SettingsError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        spec = job_input(job, workdir)
        machine = machine_now(self.settings.ram_gb)
        plan_path = workdir / "plan.json"
        try:
            if plan_path.is_file() and job.plan:
                plan = TrainingPlan.from_dict(json.loads(plan_path.read_text()))  # resume: same plan
            else:
                plan = engine.plan(spec, machine)
        except PlanError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        self.store.update(job_id, plan=plan.to_dict(), total_steps=plan.total_steps)
        self.log.info("job.plan", tier=plan.tier, reason=plan.reason, warnings=plan.warnings, total_steps=plan.total_steps)
        if stop.requested() or self.shutdown.is_set():
            stop.stop(stop.reason or "shutdown")
            self._stopped(job_id, stop)
            return

        self.store.transition(job_id, "training")
        sink = ProgressSink(self.store, job_id, self.settings.marker_refresh_s)
        while True:
            result = engine.train(plan, workdir, sink, stop, on_spawn=self._on_spawn)
            if result.status is TrainStatus.COMPLETED:
                break
            if result.status is TrainStatus.STOPPED:
                self._stopped(job_id, stop, result.step)
                return
            error = result.error or "training failed"
            if plan.step_downs == 0:
                try:
                    lower = engine.step_down(plan, spec, machine, result)
                except PlanError as exc:
                    lower, error = None, f"{error}; {exc}"
                if lower is not None:
                    self.log.warning("job.stepdown", from_tier=plan.tier, to_tier=lower.tier, reason=result.error)
                    plan = lower
                    self.store.update(job_id, plan=plan.to_dict(), total_steps=plan.total_steps)
                    continue
            self.store.transition(job_id, "failed", error=error)
            return
        job = self.store.transition(job_id, "rendering")
        lora_file = workdir / f"{job.name}.safetensors"
        if result.adapter is None:
            self.store.transition(job_id, "failed", error=f"the {engine.name} engine finished without an adapter file")
            return
        write_with_metadata(
            result.adapter,
            lora_file,
            provenance(job=job, plan=plan.to_dict(), fingerprint=job.fingerprint, image_count=spec.image_count,
                       engine_keys=engine.adapter_metadata(plan)),
        )
        rendered = engine.render(plan, workdir, lora_file, spec.preview_prompt, workdir / "render", stop)
        if isinstance(rendered, RenderStopped):
            self._stopped(job_id, stop)
            return
        if isinstance(rendered, RenderFailed):
            self.store.transition(job_id, "failed", error=f"test render failed: {rendered.error}")
            return
        self.store.transition(job_id, "publishing")
        try:
            outputs = publish(
                loras=self.settings.loras,
                registry_path=self.settings.registry,
                job=job,
                lora_file=lora_file,
                render_with=rendered.with_lora,
                render_compare=rendered.compare,
                report_files=engine.report_files(workdir),
                plan=plan.to_dict(),
            )
        except PublishError as exc:
            self.store.transition(job_id, "failed", error=str(exc))
            return
        self.store.transition(job_id, "done", outputs=outputs, eta_s=0)

    def _on_spawn(self, pid: int) -> None:
        self.log.info("job.child", pid=pid)
