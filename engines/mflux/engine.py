"""MFluxEngine: plan with the memory tiers, train and render with mflux in a child process.

Daemon side only: nothing here imports mlx or mflux. The child is `engines.mflux.worker`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

from daemon.fsutil import atomic_write_text
from daemon.logs import get_logger
from engines.mflux import checkpoints
from engines.base import JobInput, Machine, PlanError, Progress, RenderResult, StopToken, TrainingPlan, TrainResult
from engines.process.child import run_child
from engines.mflux.memory_plan import InsufficientMemory, MemoryPlan, plan_memory
from engines.mflux.config import build_config

TRAIN_DIR = "train"
PLAN_FILE = "plan.json"
CONFIG_FILE = "train.json"


class MFluxEngine:
    name = "mflux"
    worker_module = "engines.mflux.worker"

    def __init__(
        self,
        *,
        state_dir: Path,
        stop_timeout_s: float = 60.0,
        keep_awake: bool = True,
        metal_timeout_workaround: bool = True,
        checkpoint_every: int = 0,
    ):
        self.state_dir = Path(state_dir)
        self.checkpoint_every = checkpoint_every
        self.stop_timeout_s = stop_timeout_s
        self.keep_awake = keep_awake
        self.metal_timeout_workaround = metal_timeout_workaround

    # -- plan --------------------------------------------------------------------------------

    def model_path(self, model: str) -> Path | None:
        if model == "tiny-z-image":
            from engines.mflux.tiny_model import model_dir

            return model_dir(self.state_dir)
        return None

    def _plan_from_memory(self, job: JobInput, memory: MemoryPlan, workdir: Path) -> TrainingPlan:
        config, total = build_config(
            model=job.model,
            memory=memory,
            options=job.options,
            image_count=job.image_count,
            data_dir=job.data_dir,
            output_dir=workdir / TRAIN_DIR,
            model_path=self.model_path(job.model),
            checkpoint_every=self.checkpoint_every,
        )
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            tier=memory.tier,
            quantize=memory.quantize,
            batch_size=memory.batch_size,
            low_ram=memory.low_ram,
            gradient_checkpointing=memory.gradient_checkpointing,
            max_resolution=memory.max_resolution,
            cache_limit_gb=memory.cache_limit_gb,
            reason=memory.reason,
            warnings=list(memory.warnings),
            total_steps=total,
            config=config,
        )

    @staticmethod
    def _memory(job: JobInput, total_gb: float, available_gb: float, start_below: str | None = None) -> MemoryPlan:
        return plan_memory(
            model=job.model,
            total_gb=total_gb,
            available_gb=available_gb,
            image_count=job.image_count,
            max_side=job.max_side,
            resolution=job.options.get("resolution"),
            start_below=start_below,
        )

    def plan(self, job: JobInput, machine: Machine, *, ram_override_gb: float | None = None) -> TrainingPlan:
        total = ram_override_gb if ram_override_gb is not None else machine.total_gb
        available = ram_override_gb if ram_override_gb is not None else machine.available_gb
        try:
            memory = self._memory(job, total, available)
        except InsufficientMemory as exc:
            raise PlanError(str(exc)) from None
        return self._plan_from_memory(job, memory, job.data_dir.parent)

    def step_down(self, plan: TrainingPlan, job: JobInput, machine: Machine, ram_override_gb: float | None = None) -> TrainingPlan | None:
        """The next lower tier after a memory kill, or None when there is none."""
        total = ram_override_gb if ram_override_gb is not None else machine.total_gb
        try:
            memory = self._memory(job, total, total, start_below=plan.tier)
        except InsufficientMemory:
            return None
        lower = self._plan_from_memory(job, memory, job.data_dir.parent)
        lower.step_downs = plan.step_downs + 1
        return lower

    # -- train -------------------------------------------------------------------------------

    def _env(self) -> dict:
        env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_MININTERVAL": "5"}
        if sys.platform == "darwin" and self.metal_timeout_workaround:
            env["AGX_RELAX_CDM_CTXSTORE_TIMEOUT"] = "1"  # mlx issue #3267: Metal watchdog kills long runs
        return env

    def prepare(self, plan: TrainingPlan) -> None:
        """Create what the model needs before the child starts (the miniature model, once)."""
        if plan.model == "tiny-z-image":
            path = self.model_path(plan.model)
            if path is not None and not (path / "tiny.json").is_file():
                import subprocess

                subprocess.run(
                    [sys.executable, "-c", "import sys; from engines.mflux.tiny_model import ensure_model; ensure_model(sys.argv[1])",
                     str(self.state_dir)],
                    check=True,
                    cwd=Path(__file__).resolve().parents[2],
                    capture_output=True,
                )

    def train(
        self,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        workdir = Path(workdir)
        self.prepare(plan)
        atomic_write_text(workdir / PLAN_FILE, json.dumps(plan.to_dict(), indent=2))
        atomic_write_text(workdir / CONFIG_FILE, json.dumps(plan.config, indent=2))
        ckpt_dir = workdir / TRAIN_DIR / "checkpoints"
        resume, corrupt = checkpoints.newest_good(ckpt_dir)
        for path, _why in corrupt:
            path.rename(path.with_name(path.name + ".corrupt"))
        log = get_logger()
        for path, why in corrupt:
            log.warning("train.checkpoint_corrupt", checkpoint=path.name, problem=why)
        if resume is not None:
            log.info("train.resume", step=checkpoints.step_of(resume), checkpoint=resume.name)
        if resume is not None and checkpoints.step_of(resume) >= plan.total_steps:
            # Training had finished (the daemon stopped during render/publish): no child needed.
            adapter = checkpoints.extract_adapter(resume, workdir / "adapter.safetensors")
            return TrainResult("completed", adapter=adapter, checkpoint=resume, artifacts={"resumed_from": str(resume)})
        args = ["-m", self.worker_module, "train", "--job-dir", str(workdir), "--plan", str(workdir / PLAN_FILE)]
        if resume is not None:
            args += ["--resume", str(resume)]
        else:
            # mflux makes a new timestamped folder when output_path exists on a fresh start.
            shutil.rmtree(workdir / TRAIN_DIR, ignore_errors=True)
            args += ["--config", str(workdir / CONFIG_FILE)]

        def on_event(event: dict) -> None:
            if event.get("event") == "step":
                progress(Progress(event["step"], event["total"], event.get("loss"), event.get("eta_s")))
            elif event.get("event") == "checkpoint":
                checkpoints.prune(ckpt_dir, keep=2, protect=resume)

        outcome = run_child(
            args,
            cwd=Path(__file__).resolve().parents[2],
            log_path=workdir / "train.log",
            on_event=on_event,
            stop=stop,
            stop_timeout_s=self.stop_timeout_s,
            env=self._env(),
            keep_awake=self.keep_awake,
            on_spawn=on_spawn,
        )
        artifacts = {"resumed_from": str(resume) if resume else None, "corrupt_skipped": [str(p) for p, _ in corrupt]}
        if outcome.last("done") and outcome.returncode == 0:
            newest, _ = checkpoints.newest_good(ckpt_dir)
            if newest is None:
                return TrainResult("failed", error="training finished but left no valid checkpoint", artifacts=artifacts)
            checkpoints.prune(ckpt_dir, keep=2)
            adapter = checkpoints.extract_adapter(newest, workdir / "adapter.safetensors")
            return TrainResult("completed", adapter=adapter, checkpoint=newest, artifacts=artifacts)
        if outcome.last("stopped") and outcome.returncode == 0:
            newest, _ = checkpoints.newest_good(ckpt_dir)
            return TrainResult("stopped", checkpoint=newest, artifacts=artifacts)
        if outcome.stop_reason is not None:
            return TrainResult("stopped", error=f"child ended with {outcome.returncode} after stop", artifacts=artifacts)
        error = outcome.last("error")
        message = error["message"] if error else f"training process exited with code {outcome.returncode}"
        if outcome.killed_by_sigkill:
            message = "training process was killed (SIGKILL), most likely by memory pressure"
        tail = outcome.stderr_tail.strip().splitlines()[-3:]
        if tail and not error:
            message += ": " + " | ".join(tail)
        return TrainResult("failed", error=message, memory_pressure=outcome.memory_pressure, artifacts=artifacts)

    # -- render ------------------------------------------------------------------------------

    def render(
        self, plan: TrainingPlan, workdir: Path, lora: Path, prompt: str, out_dir: Path, stop: StopToken, seed: int = 42
    ) -> RenderResult | str:
        """Render with and without the LoRA; returns the result, or an error message."""
        self.prepare(plan)
        args = [
            "-m", self.worker_module, "render", "--job-dir", str(workdir), "--plan", str(workdir / PLAN_FILE),
            "--lora", str(lora), "--prompt", prompt, "--seed", str(seed), "--out-dir", str(out_dir),
        ]
        outcome = run_child(
            args,
            cwd=Path(__file__).resolve().parents[2],
            log_path=workdir / "render.log",
            on_event=lambda _e: None,
            stop=stop,
            stop_timeout_s=self.stop_timeout_s,
            env=self._env(),
            keep_awake=self.keep_awake,
        )
        done = outcome.last("done")
        if done and outcome.returncode == 0:
            return RenderResult(with_lora=Path(done["lora"]), base=Path(done["base"]), compare=Path(done["compare"]))
        if outcome.stop_reason is not None or outcome.last("stopped"):
            return "stopped"
        error = outcome.last("error")
        return error["message"] if error else f"render process exited with code {outcome.returncode}"
