"""One job runner for every mode (issue 21): plan -> disk check -> train (one step-down) -> render.

The local pipeline (huey on SQLite) and the Redis worker both drive `JobRunner`; what differs is
where the news goes, so each passes its own `RunEvents`: the pipeline writes the jobs table
(transitions, ProgressSink), the worker sends fenced events to its coordinator. The rules that
must not drift between the two live here once: the cloud fallback of a job no local plan fits,
the refusal of a job whose checkpoints cannot fit on the disk, the single step-down, and the
order render-after-train. Publishing is daemon/publisher.py's.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon import space
from daemon.engine_host import fallback_engine, make_engine, renderer_for
from daemon.logs import get_logger
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
    TrainResult,
    TrainStatus,
)
from lorad_base.workdir import WorkDir


class FailKind(enum.Enum):
    """Why a run failed, so each mode can word or route it (the error text says the rest)."""

    PLAN = "plan"  # no plan fits (after the cloud fallback, where on)
    SPACE = "space"  # the checkpoints will not fit on the disk: refused before training
    TRAIN = "train"  # training failed (after the one step-down)
    DISK_FULL = "disk_full"  # training failed because the disk filled
    NO_ADAPTER = "no_adapter"  # training "completed" without an adapter file
    RENDER = "render"  # the test render failed: `error` is the renderer's own words


@dataclass
class RunResult:
    """A trained and rendered job, ready for its publisher (local) or its coordinator (worker)."""

    plan: TrainingPlan
    adapter: Path  # the engine's raw adapter
    lora: Path  # the file the render used (stamped locally; the raw adapter on a worker)
    rendered: RenderResult
    step: int | None
    report_files: list[Path] = field(default_factory=list)


class RunEvents(Protocol):
    """Where a run's news goes. A method returning bool answers "go on?": False means the job
    stopped at that boundary (cancelled, moved by someone else, fenced) and the runner returns."""

    def planned(self, plan: TrainingPlan, engine: Engine, fallback_from: str | None) -> None:
        """The plan to train and its engine; `fallback_from`: the engine it left for the cloud."""

    def training(self) -> bool:
        """Training is about to start (the preparing -> training boundary)."""
        ...

    def progress(self, p: Progress) -> None: ...

    def checkpoint(self) -> None:
        """Called with every progress report: a newer saved state may be on disk."""

    def plan_changed(self, plan: TrainingPlan) -> None:
        """The one step-down: training goes on with this lower plan."""

    def training_over(self) -> None:
        """No more training in this run (before stopped/failed/rendering)."""

    def rendering(self, step: int | None) -> bool:
        """Training completed; the test render is next (the training -> rendering boundary)."""
        ...

    def adapter(self, plan: TrainingPlan, adapter: Path) -> Path:
        """The file to render and deliver for this adapter (the local pipeline stamps it)."""
        ...

    def done(self, result: RunResult) -> None: ...

    def stopped(self, step: int | None, reason: str | None) -> None: ...

    def failed(self, error: str, kind: FailKind, step: int | None = None) -> None: ...


def cloud_fallback_target(
    cloud_engine: str | None, engine: str, fallback_from: str | None = None
) -> str | None:
    """The engine a job no plan fits moves to (pure): None when `cloud_fallback` is off, when the
    job already runs there, or when it already fell back once (a refused cloud job waits)."""
    if cloud_engine is None or engine == cloud_engine or fallback_from:
        return None
    return cloud_engine


def training_space_problem(engine: Engine, plan: TrainingPlan, workdir: Path, job_id: str) -> str | None:
    """Refuse before training when its checkpoints cannot fit (needed vs free, which disk)."""
    needed = space.space_needed("train", engine_bytes=engine.disk_needed(plan=plan, workdir=workdir))
    free = space.free_bytes(workdir)
    problem = space.space_problem("training", workdir, needed, free, f"run: lorad retry {job_id}")
    if problem is not None:
        get_logger().warning(
            "space.refused", phase="train", path=str(workdir), needed_bytes=needed, free_bytes=free
        )
    return problem


class JobRunner:
    """Runs one job's plan, train and render on this machine and reports through `events`."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        spec: JobInput,
        workdir: WorkDir,
        machine: Machine,
        stop: StopToken,
        events: RunEvents,
        *,
        log: Any = None,
        engines: Callable[[Settings, str], Engine] = make_engine,
    ):
        self.settings, self.engine, self.spec, self.workdir = settings, engine, spec, workdir
        self.machine, self.stop, self.events = machine, stop, events
        self.log = log if log is not None else get_logger()
        self.engines = engines

    def run(self, plan: TrainingPlan | None = None) -> RunResult | None:
        """The whole run; `plan`: one already made (a resumed job's, or the worker's offer plan)."""
        fallback_from = None
        if plan is None:
            planned = self.plan()
            if planned is None:
                return None
            plan, fallback_from = planned
        self.events.planned(plan, self.engine, fallback_from)
        self.log.info("job.plan", tier=plan.tier, reason=plan.reason, warnings=plan.warnings,
                      total_steps=plan.total_steps)  # fmt: skip
        problem = training_space_problem(self.engine, plan, self.workdir.root, self.spec.job_id)
        if problem is not None:
            self.events.failed(problem, FailKind.SPACE)
            return None
        if not self.events.training():
            return None
        try:
            result, plan = self.train(plan)
        finally:
            self.events.training_over()
        if result.status is TrainStatus.STOPPED:
            self.events.stopped(result.step, self.stop.reason)
            return None
        if result.status is TrainStatus.FAILED:
            error = result.error or "training failed"
            kind = FailKind.DISK_FULL if space.looks_like_disk_full(error) else FailKind.TRAIN
            self.events.failed(error, kind, result.step)
            return None
        return self.render(plan, result)

    def plan(self) -> tuple[TrainingPlan, str | None] | None:
        """This machine's plan, or the cloud's (`cloud_fallback`) when no local plan fits its
        memory; None: the job failed (told through events)."""
        try:
            return self.engine.plan(job=self.spec, machine=self.machine), None
        except MemoryPlanError as exc:
            return self._cloud_fallback(exc)
        except PlanError as exc:
            self.events.failed(str(exc), FailKind.PLAN)
            return None

    def _cloud_fallback(self, exc: PlanError) -> tuple[TrainingPlan, str | None] | None:
        target = cloud_fallback_target(fallback_engine(self.settings), self.engine.name)
        if target is None:
            self.events.failed(str(exc), FailKind.PLAN)
            return None
        try:
            cloud = self.engines(self.settings, target)
            plan = cloud.plan(job=self.spec, machine=self.machine)
        except (SettingsError, PlanError) as cloud_exc:
            self.events.failed(f"{exc}; cloud_fallback to {target} failed too: {cloud_exc}", FailKind.PLAN)
            return None
        self.log.warning(
            "job.cloud_fallback", from_engine=self.engine.name, to_engine=target, reason=str(exc)
        )
        left, self.engine = self.engine.name, cloud
        return plan, left

    def train(self, plan: TrainingPlan) -> tuple[TrainResult, TrainingPlan]:
        """Train; a failure a lower plan may fix is retried once on `engine.step_down`'s plan."""
        while True:
            result = self.engine.train(
                plan=plan, workdir=self.workdir.root, progress=self._progress, stop=self.stop,
                on_spawn=self._on_spawn,
            )  # fmt: skip
            if result.status is not TrainStatus.FAILED or plan.step_downs:
                return result, plan
            try:
                lower = self.engine.step_down(plan=plan, job=self.spec, machine=self.machine, failed=result)
            except PlanError as exc:
                result.error, lower = f"{result.error or 'training failed'}; {exc}", None
            if lower is None:
                return result, plan
            self.log.warning("job.stepdown", from_tier=plan.tier, to_tier=lower.tier, reason=result.error)
            plan = lower
            self.events.plan_changed(plan)

    def render(self, plan: TrainingPlan, result: TrainResult) -> RunResult | None:
        """The test prompt with and without the LoRA, through the daemon's render seam."""
        if not self.events.rendering(result.step):
            return None
        if result.adapter is None:
            error = f"the {self.engine.name} engine finished without an adapter file"
            self.events.failed(error, FailKind.NO_ADAPTER)
            return None
        lora = self.events.adapter(plan, result.adapter)
        rendered = renderer_for(self.settings, self.engine).render(
            plan=plan, workdir=self.workdir.root, lora=lora, prompt=self.spec.preview_prompt,
            out_dir=self.workdir.render, stop=self.stop,
        )  # fmt: skip
        if isinstance(rendered, RenderStopped):
            self.events.stopped(None, self.stop.reason)
            return None
        if isinstance(rendered, RenderFailed):
            self.events.failed(rendered.error, FailKind.RENDER)
            return None
        done = RunResult(plan, result.adapter, lora, rendered, result.step,
                         self.engine.report_files(self.workdir.root))  # fmt: skip
        self.events.done(done)
        return done

    def _progress(self, p: Progress) -> None:
        self.events.checkpoint()
        self.events.progress(p)

    def _on_spawn(self, pid: int) -> None:
        self.log.info("job.child", pid=pid)
