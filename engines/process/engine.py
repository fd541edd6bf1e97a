"""ChildEngine: the half of an engine that trains and renders in a child process (daemon side).

Shared by the mflux engine and the scripted stand-in, so both run the same plumbing: spawn the
engine's worker (`python -m <worker_module> train|render ...`, engines/process/child.py: own
session, progress pipe, SIGTERM then SIGKILL on stop, output to the job's log), resume from the
newest checkpoint zip that verifies (mflux's layout, engines/mflux/checkpoints.py, which both
workers write), export the adapter, and classify how the child ended. An engine built on it
adds its plan, its environment and its checks; nothing here imports an ML library.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from engines.base import (
    KEEP_AWAKE,
    Engine,
    EngineContext,
    Failure,
    Progress,
    RenderFailed,
    RenderOutcome,
    RenderResult,
    RenderStopped,
    SavedState,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
)
from engines.mflux import checkpoints, disk
from engines.mflux.lora_export import export_adapter
from engines.process.child import ChildOutcome, run_child
from lorad_base.fsutil import atomic_write_text
from lorad_base.logs import get_logger
from lorad_base.workdir import WorkDir

TRAIN_DIR = "train"  # the worker's output folder under the work dir (checkpoints, loss, previews)
CONFIG_FILE = "train.json"
ROOT = Path(__file__).resolve().parents[2]


def checkpoint_dir(workdir: Path) -> Path:
    return Path(workdir) / TRAIN_DIR / "checkpoints"


def newest_saved(workdir: Path) -> SavedState | None:
    """The newest checkpoint zip that verifies, with its step, from one listing (a zip still being
    written is not a saved state yet)."""
    for path in checkpoints.list_checkpoints(checkpoint_dir(workdir)):
        if checkpoints.verify_cached(path) is None:
            return SavedState(step=checkpoints.step_of(path), files=(path,))
    return None


class ChildEngine(Engine):
    """An engine whose worker module trains and renders in a child, saving mflux-layout checkpoints."""

    worker_module: ClassVar[str]
    keep_secrets: ClassVar[tuple[str, ...]] = ()  # secrets the child keeps (HF tokens for weights)
    options: ClassVar[tuple] = (KEEP_AWAKE,)

    def __init__(self, context: EngineContext):
        super().__init__(context)
        self.keep_awake = self.values.flag("keep_awake") if "keep_awake" in self.values else True

    # -- hooks -------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        """Extra environment of the child."""
        return {}

    def prepare(self, plan: TrainingPlan) -> str | None:
        """What must exist before the child starts; a problem that stops the job, as text."""
        return None

    def classify(self, message: str, *, memory_pressure: bool) -> Failure:
        """Which failures a lower plan can fix."""
        return Failure.MEMORY if memory_pressure else Failure.OTHER

    def params_per_rank(self, plan: TrainingPlan) -> int:
        """LoRA parameters per unit of rank of the plan's model (disk_needed)."""
        return disk.params_per_rank(plan.model)

    # -- the child ---------------------------------------------------------------------------

    def run_worker(
        self,
        args: list[str],
        *,
        log_path: Path,
        on_event: Callable[[dict], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> ChildOutcome:
        """`python -m <worker_module> <args>` in a child, followed to its end."""
        return run_child(
            ["-m", self.worker_module, *args],
            cwd=ROOT,
            log_path=log_path,
            on_event=on_event,
            stop=stop,
            stop_timeout_s=self.stop_timeout_s,
            env=self._env(),
            keep_secrets=self.keep_secrets,
            keep_awake=self.keep_awake,
            on_spawn=on_spawn,
        )

    # -- saved state and disk ----------------------------------------------------------------

    def saved_state(self, workdir: Path) -> SavedState | None:
        """The newest checkpoint zip that verifies: copied to the same place under another
        machine's work dir (with the snapshot), training resumes there."""
        return newest_saved(workdir)

    def disk_needed(self, *, plan: TrainingPlan, workdir: Path) -> int:
        written = sum(p.stat().st_size for p in checkpoints.list_checkpoints(checkpoint_dir(workdir)))
        return disk.training_bytes(self.params_per_rank(plan), _rank(plan), written)

    # -- train -------------------------------------------------------------------------------

    def train(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        wd = WorkDir(Path(workdir))
        problem = self.prepare(plan)
        if problem:
            return TrainResult(TrainStatus.FAILED, error=problem, failure=Failure.OTHER)
        atomic_write_text(wd.plan, json.dumps(plan.to_dict(), indent=2))
        atomic_write_text(wd.root / CONFIG_FILE, json.dumps(plan.config, indent=2))
        ckpt_dir = checkpoint_dir(wd.root)
        resume, corrupt = resume_point(ckpt_dir, plan)
        if resume is not None and checkpoints.step_of(resume) >= plan.total_steps:
            # Training had finished (the daemon stopped during render/publish): no child needed.
            adapter = export_adapter(resume, wd.adapter, plan.config)
            return TrainResult(
                TrainStatus.COMPLETED,
                adapter=adapter,
                step=checkpoints.step_of(resume),
                artifacts={"resumed_from": str(resume)},
            )
        args = ["train", "--job-dir", str(wd.root), "--plan", str(wd.plan)]
        if resume is not None:
            args += ["--resume", str(resume)]
        else:
            # mflux makes a new timestamped folder when output_path exists on a fresh start.
            shutil.rmtree(wd.root / TRAIN_DIR, ignore_errors=True)
            shutil.rmtree(wd.samples, ignore_errors=True)
            args += ["--config", str(wd.root / CONFIG_FILE)]

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "step":
                progress(Progress(event["step"], event["total"], event.get("loss"), event.get("eta_s")))
            elif event.get("event") == "checkpoint":
                checkpoints.prune(ckpt_dir, keep=2, protect=resume)

        outcome = self.run_worker(
            args, log_path=wd.train_log, on_event=on_event, stop=stop, on_spawn=on_spawn
        )
        artifacts = {
            "resumed_from": str(resume) if resume else None,
            "corrupt_skipped": [str(p) for p, _ in corrupt],
        }
        return self._train_result(outcome, wd, plan, artifacts)

    def _train_result(
        self, outcome: ChildOutcome, wd: WorkDir, plan: TrainingPlan, artifacts: dict[str, Any]
    ) -> TrainResult:
        """How the training child ended, as the daemon reads it."""
        ckpt_dir = checkpoint_dir(wd.root)
        if outcome.last("done") and outcome.returncode == 0:
            newest, _ = checkpoints.newest_good(ckpt_dir)
            if newest is None:
                return TrainResult(
                    TrainStatus.FAILED,
                    error="training finished but left no valid checkpoint",
                    failure=Failure.OTHER,
                    artifacts=artifacts,
                )
            checkpoints.prune(ckpt_dir, keep=2)
            adapter = export_adapter(newest, wd.adapter, plan.config)
            return TrainResult(
                TrainStatus.COMPLETED, adapter=adapter, step=checkpoints.step_of(newest), artifacts=artifacts
            )
        if outcome.last("stopped") and outcome.returncode == 0:
            newest, _ = checkpoints.newest_good(ckpt_dir)
            step = checkpoints.step_of(newest) if newest is not None else None
            return TrainResult(TrainStatus.STOPPED, step=step, artifacts=artifacts)
        if outcome.stop_reason is not None:
            return TrainResult(
                TrainStatus.STOPPED,
                error=f"child ended with {outcome.returncode} after stop",
                artifacts=artifacts,
            )
        error = outcome.last("error")
        message = error["message"] if error else f"training process exited with code {outcome.returncode}"
        if outcome.killed_by_sigkill:
            message = "training process was killed (SIGKILL), most likely by memory pressure"
        tail = outcome.stderr_tail.strip().splitlines()[-3:]
        if tail and not error:
            message += ": " + " | ".join(tail)
        failure = self.classify(message, memory_pressure=outcome.memory_pressure)
        return TrainResult(TrainStatus.FAILED, error=message, failure=failure, artifacts=artifacts)

    # -- render ------------------------------------------------------------------------------

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
        """Render with and without the LoRA (same seed), then the comparison (a `Renderer`)."""
        problem = self.prepare(plan)
        if problem:
            return RenderFailed(problem)
        wd = WorkDir(Path(workdir))
        args = ["render", "--job-dir", str(wd.root), "--plan", str(wd.plan), "--lora", str(lora)]
        args += ["--prompt", prompt, "--seed", str(seed), "--out-dir", str(out_dir)]
        outcome = self.run_worker(args, log_path=wd.render_log, on_event=lambda _e: None, stop=stop)
        done = outcome.last("done")
        if done and outcome.returncode == 0:
            return RenderResult(
                with_lora=Path(done["lora"]), base=Path(done["base"]), compare=Path(done["compare"])
            )
        if outcome.stop_reason is not None or outcome.last("stopped"):
            return RenderStopped(outcome.stop_reason)
        error = outcome.last("error")
        return RenderFailed(
            error["message"] if error else f"render process exited with code {outcome.returncode}"
        )


def resume_point(ckpt_dir: Path, plan: TrainingPlan) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies and whose config stays inside the job's folders
    (relocated here when it came from another machine); corrupt or refused ones are renamed
    aside (kept for a look, never resumed)."""
    log = get_logger()
    skipped: list[tuple[Path, str]] = []
    while True:
        resume, corrupt = checkpoints.newest_good(ckpt_dir)
        skipped += corrupt
        for path, why in corrupt:
            path.rename(path.with_name(path.name + ".corrupt"))
            log.warning("train.checkpoint_corrupt", checkpoint=path.name, problem=why)
        if resume is None:
            return None, skipped
        try:
            if checkpoints.relocate(resume, plan.config):  # written on another machine (scale-out)
                log.info("train.checkpoint_relocated", checkpoint=resume.name, data=plan.config.get("data"))
        except checkpoints.CheckpointRefused as exc:
            resume.rename(resume.with_name(resume.name + ".refused"))
            log.warning("train.checkpoint_refused", checkpoint=resume.name, problem=str(exc))
            skipped.append((resume, str(exc)))
            continue
        log.info("train.resume", step=checkpoints.step_of(resume), checkpoint=resume.name)
        return resume, skipped


def _rank(plan: TrainingPlan) -> int:
    targets = plan.config.get("lora_layers", {}).get("targets") or [{}]
    return int(targets[0].get("rank") or plan.config.get("rank") or 16)
