"""ScriptedEngine: a stand-in trainer for queue/daemon tests that must run many jobs fast.

It is a real child process speaking the same progress protocol, writing checkpoint zips in
mflux's layout and honouring SIGTERM/parent death exactly like the mflux worker, so everything
on the daemon side (child runner, checkpoints, resume, publish) runs for real. Only the
training math is replaced by a sleep per step. Select it with `engine = "scripted"`.
It plans without probing a device: two tiers ("scripted", then "scripted-low" after a memory kill).

Test hook (daemon side): with `SCRIPTED_ENGINE_HOLD_DIR=<dir>`, the engine pauses at a phase
boundary while `<dir>/<phase>.hold` exists, after writing the job id to `<dir>/<phase>.reached`.
Phases: `plan` (job preparing), `trained` (training finished, job still `training`), `rendered`
(render finished, job still `rendering`). Tests use it to act at an exact point (cancel, re-drop)
and then say go by deleting the hold file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from engines.base import (
    KEEP_AWAKE,
    Check,
    CheckStatus,
    EngineContext,
    Failure,
    IntakeLimits,
    JobInput,
    Machine,
    Option,
    PlanError,
    Progress,
    RenderOutcome,
    RenderResult,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
)
from engines.mflux.memory_plan import PROFILES
from engines.process.engine import TRAIN_DIR, ChildEngine

TIERS = ("scripted", "scripted-low")
HOLD_ENV = "SCRIPTED_ENGINE_HOLD_DIR"
HOLD_LIMIT_S = 300.0  # a forgotten hold file never wedges a test run for good


def hold(phase: str, job_id: str) -> None:
    """Pause while `<hold dir>/<phase>.hold` exists (test hook; a no-op without the env)."""
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    gate = Path(folder) / f"{phase}.hold"
    if not gate.exists():
        return
    (Path(folder) / f"{phase}.reached").write_text(job_id)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class ScriptedEngine(ChildEngine):
    """The shared child-process base (engines/process/engine.py) with a plan of its own."""

    name: ClassVar[str] = "scripted"
    models: ClassVar[tuple[str, ...]] = tuple(PROFILES)  # it "trains" whatever mflux knows
    worker_module: ClassVar[str] = "engines.scripted.worker"
    options: ClassVar[tuple[Option, ...]] = (
        Option("step_s", float, 0.05, "seconds per fake training step", 0),
        # Memory a job "needs" (GB); more than the machine has (or `ram_gb`) makes plan refuse it:
        # how the scale-out tests stand in for a worker too small for a job.
        Option("needs_gb", float, 0.0, "memory a scripted job needs (GB); 0 = none", 0),
        KEEP_AWAKE,
    )

    def __init__(self, context: EngineContext):
        super().__init__(context)
        self.step_s = self.values.number("step_s")
        self.needs_gb = self.values.number("needs_gb")

    def _plan(self, job: JobInput, tier: str) -> TrainingPlan:
        total = int(job.options.get("steps") or job.options.get("epochs", 0) * job.image_count or 6)
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            backend="cpu",
            tier=tier,
            reason=f"{tier}: the scripted engine sleeps {self.step_s} s a step",
            total_steps=total,
            summary=["backend      cpu (scripted: no training math)", f"tier         {tier}"],
            config={
                "step_s": self.step_s,
                "total": total,
                "save_frequency": 2,
                "rank": int(job.options.get("rank", 16)),
                "alpha": float(job.options.get("alpha", job.options.get("rank", 16))),
                "data": str(job.data_dir),
                "output_path": str(job.data_dir.parent / TRAIN_DIR),
                "model": job.model,
                "steps": 4,
            },
        )

    def plan(self, *, job: JobInput, machine: Machine) -> TrainingPlan:
        hold("plan", job.job_id)
        has = machine.memory_override_gb if machine.memory_override_gb is not None else machine.total_gb
        if self.needs_gb and has < self.needs_gb:
            raise PlanError(
                f"needs {self.needs_gb:g} GB, this machine has {has:.0f} GB",
                needs_gb=self.needs_gb,
                has_gb=has,
            )
        return self._plan(job, TIERS[0])

    def train(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        result = super().train(plan=plan, workdir=workdir, progress=progress, stop=stop, on_spawn=on_spawn)
        if result.status is TrainStatus.COMPLETED:
            hold("trained", Path(workdir).name)
        return result

    def render(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        lora: Path,
        prompt: str,
        out_dir: Path,
        stop: StopToken,
        seed: int = 42,
    ) -> RenderOutcome:
        rendered = super().render(
            plan=plan, workdir=workdir, lora=lora, prompt=prompt, out_dir=out_dir, stop=stop, seed=seed
        )
        if isinstance(rendered, RenderResult):
            hold("rendered", Path(workdir).name)
        return rendered

    def step_down(
        self, *, plan: TrainingPlan, job: JobInput, machine: Machine, failed: TrainResult
    ) -> TrainingPlan | None:
        """One lower tier after a memory kill (the config is unchanged: it has no memory knobs)."""
        if failed.failure is not Failure.MEMORY:
            return None
        if plan.tier == TIERS[-1]:
            raise PlanError(f"no lower plan after {plan.tier}")
        lower = self._plan(job, TIERS[-1])
        lower.config = dict(plan.config)
        lower.step_downs = plan.step_downs + 1
        return lower

    def params_per_rank(self, plan: TrainingPlan) -> int:
        return 64 + 64  # engines/scripted/worker.py's two 64-wide matrices

    def model_check(self, model: str) -> Check:
        return Check("model", CheckStatus.OK, f"{model}: the scripted engine needs no weights")

    def report_files(self, workdir: Path) -> list[Path]:
        loss = Path(workdir) / TRAIN_DIR / "loss" / "loss.html"
        return [loss] if loss.is_file() else []

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        return {
            "ss_network_dim": str(plan.config.get("rank", "")),
            "ss_network_alpha": str(plan.config.get("alpha", "")),
        }

    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(max_caption_tokens=None)

    def doctor_checks(self, *, model: str, machine: Machine) -> list[Check]:
        return [
            Check("engine", CheckStatus.WARN, "scripted: a stand-in trainer for tests; it trains nothing")
        ]
