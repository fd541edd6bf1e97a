"""ScriptedEngine: a stand-in trainer for queue/daemon tests that must run many jobs fast.

It is a real child process speaking the same progress protocol, writing checkpoint zips in
mflux's layout and honouring SIGTERM/parent death exactly like the mflux worker, so everything
on the daemon side (child runner, checkpoints, resume, publish) runs for real. Only the
training math is replaced by a sleep per step. Select it with `engine = "scripted"`.
"""

from __future__ import annotations

from engines.base import JobInput, Machine, PlanError, TrainingPlan
from engines.mflux.memory_plan import InsufficientMemory
from engines.mflux.engine import MFluxEngine


class ScriptedEngine(MFluxEngine):
    name = "scripted"
    worker_module = "engines.scripted.worker"
    step_s = 0.05

    def plan(self, job: JobInput, machine: Machine, *, ram_override_gb: float | None = None) -> TrainingPlan:
        try:
            memory = self._memory(job, ram_override_gb or machine.total_gb, ram_override_gb or machine.available_gb)
        except InsufficientMemory as exc:
            raise PlanError(str(exc)) from None
        total = int(job.options.get("steps") or job.options.get("epochs", 0) * job.image_count or 6)
        workdir = job.data_dir.parent
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            tier=memory.tier,
            quantize=memory.quantize,
            batch_size=1,
            low_ram=memory.low_ram,
            gradient_checkpointing=memory.gradient_checkpointing,
            max_resolution=memory.max_resolution,
            cache_limit_gb=memory.cache_limit_gb,
            reason=memory.reason,
            total_steps=total,
            config={
                "step_s": self.step_s,
                "total": total,
                "save_frequency": 2,
                "rank": int(job.options.get("rank", 16)),
                "data": str(job.data_dir),
                "output_path": str(workdir / "train"),
                "model": job.model,
                "steps": 4,
            },
        )

    def step_down(self, plan: TrainingPlan, job: JobInput, machine: Machine, ram_override_gb: float | None = None) -> TrainingPlan | None:
        """Same tier logic as mflux; the scripted config is kept (it has no memory knobs)."""
        total = ram_override_gb or machine.total_gb
        try:
            memory = self._memory(job, total, total, start_below=plan.tier)
        except InsufficientMemory:
            return None
        lower = TrainingPlan.from_dict(plan.to_dict())
        lower.tier, lower.quantize, lower.low_ram = memory.tier, memory.quantize, memory.low_ram
        lower.gradient_checkpointing, lower.reason = memory.gradient_checkpointing, memory.reason
        lower.step_downs = plan.step_downs + 1
        return lower

    def prepare(self, plan: TrainingPlan) -> None:
        return None
