"""MFluxEngine: plan with the memory tiers, train and render with mflux in a child process.

Daemon side only: nothing here imports mlx or mflux. The child is `engines.mflux.worker`, run by
the shared child-process base (engines/process/engine.py `ChildEngine`: spawn, progress, stop,
resume, render); the device (backend, name, memory) comes from the `engines.mflux.probe` child,
once per process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from engines.base import (
    Check,
    CheckStatus,
    EngineContext,
    Failure,
    IntakeLimits,
    JobInput,
    Machine,
    MemoryPlanError,
    Option,
    PlanError,
    TrainingPlan,
    TrainResult,
)
from engines.mflux.config import build_config
from engines.mflux.device import Device, PlanMemory, planning_memory, probe_device, run_probe
from engines.mflux.memory_plan import (
    PROFILES,
    InsufficientMemory,
    MemoryPlan,
    plan_memory,
    plan_render_memory,
)
from engines.mflux.weights import weights_check
from engines.process.engine import KEEP_AWAKE, ROOT, TRAIN_DIR, ChildEngine
from lorad_base.childenv import HF_TOKENS, child_env
from lorad_base.workdir import WorkDir

# MLX's CUDA backend has no quantized-matmul kernel for some shapes (mflux issue 563).
UNSUPPORTED_KERNEL = "No implementation for problem shape"


def classify_failure(message: str, *, memory_pressure: bool) -> Failure:
    """Which failures a lower plan can fix (pure)."""
    if memory_pressure:
        return Failure.MEMORY
    if UNSUPPORTED_KERNEL.lower() in message.lower():
        return Failure.UNSUPPORTED
    return Failure.OTHER


def summary_lines(memory: MemoryPlan, device: Device, limit: PlanMemory) -> list[str]:
    """What `lorad plan` and `lorad doctor` print about an mflux plan (pure)."""
    return [
        f"backend      {device.backend} ({device.name})",
        f"memory       {limit.line()}",
        f"tier         {memory.tier}",
        f"quantize     {memory.quantize or 'none (bf16)'}" + (" bit" if memory.quantize else ""),
        f"batch size   {memory.batch_size}",
        f"grad ckpt    {'on' if memory.gradient_checkpointing else 'off'} (gradient checkpointing)",
        f"low_ram      {'on' if memory.low_ram else 'off'}",
        f"resolution   {memory.max_resolution} px",
        f"cache limit  {f'{memory.cache_limit_gb:g} GB' if memory.cache_limit_gb else 'MLX default'}",
    ]


class MFluxEngine(ChildEngine):
    name: ClassVar[str] = "mflux"
    worker_module: ClassVar[str] = "engines.mflux.worker"
    keep_secrets: ClassVar[tuple[str, ...]] = HF_TOKENS  # the child may fetch gated weights
    models: ClassVar[tuple[str, ...]] = tuple(PROFILES)
    options: ClassVar[tuple[Option, ...]] = (
        Option(
            "metal_timeout_workaround",
            bool,
            True,
            "macOS: AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1 against the Metal watchdog killing long runs (mlx #3267)",
        ),
        Option(
            "checkpoint_every",
            int,
            0,
            "training checkpoint interval in steps; 0 = automatic (about 10 a run)",
            0,
        ),
        KEEP_AWAKE,
    )

    def __init__(self, context: EngineContext):
        super().__init__(context)
        self.metal_timeout_workaround = self.values.flag("metal_timeout_workaround")
        self.checkpoint_every = self.values.integer("checkpoint_every")
        self.device: Device | None = None  # probed on first use; a test may set it

    # -- plan --------------------------------------------------------------------------------

    def _device(self) -> Device:
        if self.device is None:
            self.device = probe_device()
        return self.device

    def model_path(self, model: str) -> Path | None:
        if model == "tiny-z-image":
            from engines.mflux.tiny_model import model_dir

            return model_dir(self.state_dir)
        return None

    def _plan_from_memory(self, job: JobInput, memory: MemoryPlan, limit: PlanMemory) -> TrainingPlan:
        device = self._device()
        config, total = build_config(
            model=job.model,
            memory=memory,
            options=job.options,
            image_count=job.image_count,
            data_dir=job.data_dir,
            output_dir=job.data_dir.parent / TRAIN_DIR,
            model_path=self.model_path(job.model),
            checkpoint_every=self.checkpoint_every,
        )
        warnings = list(memory.warnings)
        if device.error:
            warnings.append(f"could not probe the MLX device ({device.error}); planned from the system RAM")
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            backend=device.backend,
            tier=memory.tier,
            reason=memory.reason,
            total_steps=total,
            summary=summary_lines(memory, device, limit),
            warnings=warnings,
            config=config,
        )

    def _memory(self, job: JobInput, limit: PlanMemory, **kwargs: Any) -> MemoryPlan:
        return plan_memory(
            model=job.model,
            total_gb=limit.total_gb,
            available_gb=limit.available_gb,
            image_count=job.image_count,
            max_side=job.max_side,
            resolution=job.options.get("resolution"),
            backend=self._device().backend,
            **kwargs,
        )

    def plan(self, *, job: JobInput, machine: Machine) -> TrainingPlan:
        if job.model in PROFILES and PROFILES[job.model].render_only:
            raise PlanError(
                f"mflux cannot train {job.model} (its trainer has Z-Image and FLUX.2 adapters, no FLUX.1); "
                f'train it on a cloud (engine = "replicate" or "fal"): this machine renders its test image'
            )
        return self._plan_with(job, machine, lambda limit: self._memory(job, limit))

    def render_plan(self, job: JobInput, machine: Machine) -> TrainingPlan:
        """The plan a test render needs (model, quantization for what is free now), also for a model
        mflux only renders: a cloud-trained LoRA's test render, sized for inference
        (memory_plan `plan_render_memory`), not for the training this machine did not do."""
        return self._plan_with(
            job,
            machine,
            lambda limit: plan_render_memory(
                model=job.model, total_gb=limit.total_gb, available_gb=limit.available_gb
            ),
        )

    def _plan_with(
        self, job: JobInput, machine: Machine, choose: Callable[[PlanMemory], MemoryPlan]
    ) -> TrainingPlan:
        """A plan from the memory `choose` picks for this device's limit (training or render)."""
        limit = planning_memory(self._device(), machine)
        try:
            memory = choose(limit)
        except InsufficientMemory as exc:
            raise MemoryPlanError(str(exc)) from None
        return self._plan_from_memory(job, memory, limit)

    def step_down(
        self, *, plan: TrainingPlan, job: JobInput, machine: Machine, failed: TrainResult
    ) -> TrainingPlan | None:
        """After a memory kill: the next lower tier. After a missing quantized kernel (MLX-CUDA):
        the best unquantized tier that fits the device (its memory is free again: the child died)."""
        limit = planning_memory(self._device(), machine)
        whole = PlanMemory(limit.total_gb, limit.total_gb, limit.label)
        try:
            if failed.failure is Failure.MEMORY:
                memory = self._memory(job, whole, start_below=plan.tier)
                why = "ran out of memory"
            elif failed.failure is Failure.UNSUPPORTED and plan.config.get("quantize"):
                memory = self._memory(job, whole, quantized=False)
                why = f"quantized training is not supported by this MLX backend for this model ({UNSUPPORTED_KERNEL}, mflux issue 563)"
            else:
                return None
        except InsufficientMemory as exc:
            raise PlanError(f"no lower plan after {plan.tier}: {exc}") from None
        lower = self._plan_from_memory(job, memory, whole)
        lower.step_downs = plan.step_downs + 1
        lower.reason = f"{memory.reason}; stepped down from {plan.tier}: {why}"
        lower.warnings.append(f"stepped down from {plan.tier}: {why}")
        return lower

    # -- what the daemon publishes and checks ---------------------------------------------------

    def report_files(self, workdir: Path) -> list[Path]:
        """mflux's loss plot, its last preview image and the samples/ folder (every preview)."""
        train_dir = Path(workdir) / TRAIN_DIR
        out = []
        samples = WorkDir(Path(workdir)).samples
        if samples.is_dir() and any(samples.glob("*.png")):
            out.append(samples)
        loss = train_dir / "loss" / "loss.html"
        if loss.is_file():
            out.append(loss)
        previews = sorted((train_dir / "preview").glob("*.png")) if (train_dir / "preview").is_dir() else []
        if previews:
            out.append(previews[-1])
        return out

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        targets = plan.config.get("lora_layers", {}).get("targets") or [{}]
        rank = targets[0].get("rank", "")
        alpha = targets[0].get("alpha", rank)
        return {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}

    def intake_limits(self) -> IntakeLimits:
        # mflux pads and truncates prompts at 512 tokens; it reads images named preview* as edit
        # training's previews (intake refuses them, though the snapshot renames every image).
        return IntakeLimits(max_caption_tokens=512, reserved_image_prefixes=("preview",))

    def doctor_checks(self, *, model: str, machine: Machine) -> list[Check]:
        """Backend/device/plan memory, mlx, mflux (imported in a child), the model's weights."""
        ml = run_probe(doctor_model="z-image" if model == "tiny-z-image" else model)
        device = Device.from_json(ml)
        checks: list[Check] = []
        if device.error:
            checks.append(Check("mlx", CheckStatus.FAIL, device.error))
        else:
            checks.append(Check("mlx", CheckStatus.OK, f"{device.mlx} on {device.backend}"))
            checks.append(self._backend_check(model, device, machine))
        if "mflux_error" in ml:
            checks.append(Check("mflux", CheckStatus.FAIL, ml["mflux_error"]))
        else:
            checks.append(Check("mflux", CheckStatus.OK, str(ml.get("mflux"))))
        checks.append(self.model_check(model))
        return checks

    def _backend_check(self, model: str, device: Device, machine: Machine) -> Check:
        """The backend, its device and the memory the plan uses, with the tier it gives."""
        detail = f"{device.backend}: {device.name}"
        try:
            limit = planning_memory(device, machine)
            memory = plan_memory(
                model=model,
                total_gb=limit.total_gb,
                available_gb=limit.available_gb,
                image_count=20,
                max_side=1024,
                backend=device.backend,
            )
        except (PlanError, InsufficientMemory) as exc:
            return Check("backend", CheckStatus.FAIL, f"{detail}; {exc}")
        detail += f"; plans from {limit.line()} -> {memory.tier}"
        if device.backend == "cpu":
            return Check(
                "backend",
                CheckStatus.WARN,
                detail + " (not Apple Silicon and no CUDA GPU: mlx runs on the CPU, training is slow)",
            )
        return Check("backend", CheckStatus.OK, detail)

    def model_check(self, model: str) -> Check:
        """Fast (file look-ups only): are the model's weights here, and if not, what to do."""
        return weights_check(model)

    # -- the child ---------------------------------------------------------------------------

    def classify(self, message: str, *, memory_pressure: bool) -> Failure:
        return classify_failure(message, memory_pressure=memory_pressure)

    def _env(self) -> dict[str, str]:
        env = {
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TQDM_MININTERVAL": "5",
        }
        if not self.download_models:  # mflux would otherwise fetch what is missing behind lorad's back
            env["HF_HUB_OFFLINE"] = "1"
        if sys.platform == "darwin" and self.metal_timeout_workaround:
            env["AGX_RELAX_CDM_CTXSTORE_TIMEOUT"] = "1"  # mlx issue #3267: Metal watchdog kills long runs
        return env

    def prepare(self, plan: TrainingPlan) -> str | None:
        """Create what the model needs before the child starts (the miniature model, once);
        a problem that stops the job (the model's weights are missing) is returned as text."""
        if plan.model == "tiny-z-image":
            path = self.model_path(plan.model)
            if path is not None and not (path / "tiny.json").is_file():
                import subprocess

                subprocess.run(
                    [sys.executable, "-m", "engines.mflux.tiny_model", str(self.state_dir)],
                    check=True,
                    cwd=ROOT,
                    capture_output=True,
                    env=child_env(os.environ),
                )
            return None
        check = self.model_check(plan.model)  # the same words as `lorad run` and `doctor`
        if check.status is CheckStatus.OK or (self.download_models and check.status is CheckStatus.WARN):
            return None  # download_models = true: the child fetches what is missing
        return check.detail
