"""Memory plan: quantization, batch size and memory savers from the memory that limits training (pure).

On Metal (unified memory) and the CPU backend, tiers are chosen by total RAM, then stepped down
while the tier's estimated need for the model exceeds the RAM available now. On CUDA the memory
is the GPU's, and the plan prefers bf16 whenever it fits: the first tier of `CUDA_ORDER` whose
need fits the free GPU memory, whatever the total (the totals are Mac rules of thumb for memory
shared with the OS). MLX's CUDA backend lacks quantized-matmul kernels for some shapes (mflux
issue 563, "No implementation for problem shape"), so a quantized tier is a last resort there,
and `quantized=False` asks for the best unquantized tier after such a failure.
Below the last tier the job fails with "needs at least N GB free, have M".

Sources for the numbers:
- mflux's own `TrainingSpec.gradient_checkpointing` comment: checkpointing trades ~30 % step
  time for a peak of "weights + two blocks" and "is what makes edit training fit on 32-36 GB".
- mflux issue #311: Z-Image-Turbo generation at 4-bit uses ~9-10 GB, with a VAE-decode spike of
  1.5-2x at the end that `--low-ram` removes (hence low_ram on the small tiers).
- mflux PR #83 (DreamBooth): a 32 GB machine "can barely" train a 12B Flux at 512 px with q4,
  which is why 16 GB is the floor and runs at 512 px with every saver on.
- PortOS issue #1321 (mflux on an M5 Max 128 GB): flux2-klein-9b in bf16 did not finish a step
  in 14 min while klein-4b ran at ~3.5 s/step; the 9B model therefore never plans bf16.
- Z-Image-Turbo is a 6B transformer plus a 4B Qwen3 text encoder (its model card); bf16 weights
  alone are ~20 GB, q8 ~11 GB, q4 ~6 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    min_total_gb: float
    quantize: int | None
    gradient_checkpointing: bool
    low_ram: bool
    max_resolution: int
    cache_limit_gb: float | None
    need_gb: float  # estimated peak for z-image-turbo at this tier (scaled per model)
    warning: str | None = None  # {resolution}: the plan's final resolution


TIERS: tuple[Tier, ...] = (
    Tier("bf16", 96, None, False, False, 1024, None, 64),
    Tier("q8", 64, 8, False, False, 1024, 24, 40),
    Tier("q8-checkpointed", 32, 8, True, False, 1024, 8, 22),
    Tier("q4-lowram", 24, 4, True, True, 768, 4, 16),
    Tier(
        "q4-minimal",
        16,
        4,
        True,
        True,
        512,
        2,
        11,
        "the floor tier: training runs at {resolution} px with every memory saver on; close other apps",
    ),
)


@dataclass(frozen=True)
class ModelProfile:
    mflux_model: str
    scale: float  # need relative to z-image-turbo
    allow_bf16: bool = True
    min_resolution: int | None = None
    fixed_resolution: int | None = None  # the miniature model trains at a tiny size
    render_only: bool = False  # mflux renders it with a LoRA but has no trainer for it


PROFILES: dict[str, ModelProfile] = {
    "z-image-turbo": ModelProfile("z-image-turbo", 1.0),
    "z-image": ModelProfile("z-image", 1.0),
    "flux2-klein-4b": ModelProfile("flux2-klein-4b", 0.75),
    "flux2-klein-base-4b": ModelProfile("flux2-klein-base-4b", 0.75),
    "flux2-klein-9b": ModelProfile("flux2-klein-9b", 1.5, allow_bf16=False),
    "flux2-klein-base-9b": ModelProfile("flux2-klein-base-9b", 1.5, allow_bf16=False),
    "tiny-z-image": ModelProfile("z-image", 0.002, fixed_resolution=64),
    # FLUX.1 [dev] (12B, twice Z-Image's transformer): the cloud trainers' model (Replicate's
    # ostris/flux-dev-lora-trainer, fal's flux-lora-fast-training). mflux renders it with a LoRA
    # (mflux.models.flux Flux1, ModelConfig "dev") but its training runner has no FLUX.1 adapter.
    "flux-dev": ModelProfile("dev", 2.0, render_only=True),
}


# CUDA only (an estimate, not yet measured): bf16 weights (~20 GB) with the peak of two
# checkpointed blocks, for GPUs of 40-80 GB that would otherwise need the quantized kernels.
BF16_CHECKPOINTED = Tier("bf16-checkpointed", 48, None, True, False, 1024, None, 36)
# The tiers CUDA tries, best first: unquantized while it fits, quantized only below that
# (q8 without checkpointing needs more than bf16-checkpointed, so CUDA never picks it).
CUDA_ORDER = ("bf16", "bf16-checkpointed", "q8-checkpointed", "q4-lowram", "q4-minimal")


class InsufficientMemory(Exception):
    pass


@dataclass(frozen=True)
class MemoryPlan:
    tier: str
    quantize: int | None
    batch_size: int
    low_ram: bool
    gradient_checkpointing: bool
    max_resolution: int
    cache_limit_gb: float | None
    reason: str
    warnings: tuple[str, ...] = ()


def profile_for(model: str) -> ModelProfile:
    if model not in PROFILES:
        raise InsufficientMemory(f"unknown model {model!r}; known: {', '.join(sorted(PROFILES))}")
    return PROFILES[model]


def tiers_for(backend: str) -> tuple[Tier, ...]:
    """The tiers a backend tries, best first."""
    if backend == "cuda":
        by_name = {t.name: t for t in (*TIERS, BF16_CHECKPOINTED)}
        return tuple(by_name[name] for name in CUDA_ORDER)
    return TIERS


def _tier_index_for_total(tiers: tuple[Tier, ...], total_gb: float) -> int | None:
    for index, tier in enumerate(tiers):
        if total_gb >= tier.min_total_gb:
            return index
    return None


def plan_memory(
    *,
    model: str,
    total_gb: float,
    available_gb: float,
    image_count: int,
    max_side: int,
    resolution: int | None = None,
    start_below: str | None = None,
    backend: str = "metal",
    quantized: bool = True,
) -> MemoryPlan:
    """Pick the tier for this machine and dataset; `start_below` forces the tier under a failed one,
    `quantized=False` allows only unquantized tiers (after a missing quantized kernel)."""
    profile = profile_for(model)
    tiers = tiers_for(backend)
    floor_need = tiers[-1].need_gb * profile.scale
    memory_name = "GPU memory" if backend == "cuda" else "RAM"
    if backend == "cuda":
        index: int | None = 0  # by need alone: bf16 whenever it fits
    else:
        index = _tier_index_for_total(tiers, total_gb)
    if index is None:
        raise InsufficientMemory(
            f"{model} needs a machine with at least {tiers[-1].min_total_gb:.0f} GB of {memory_name}; this one has {total_gb:.0f} GB"
        )
    if start_below is not None:
        names = [t.name for t in tiers]
        if start_below in names:
            index = max(index, names.index(start_below) + 1)
    notes: list[str] = []
    chosen: Tier | None = None
    for tier in tiers[index:]:
        if (tier.quantize is None and not profile.allow_bf16) or (
            tier.quantize is not None and not quantized
        ):
            continue
        if tier.need_gb * profile.scale <= available_gb:
            chosen = tier
            break
        notes.append(f"{tier.name} needs ~{tier.need_gb * profile.scale:.0f} GB free")
    if chosen is None:
        if not quantized:
            need = min((t.need_gb for t in tiers if t.quantize is None), default=floor_need) * profile.scale
            raise InsufficientMemory(
                f"{model} without quantization needs at least {math.ceil(need)} GB free, have {available_gb:.0f} "
                f"(of {total_gb:.0f} GB {memory_name})"
            )
        raise InsufficientMemory(
            f"{model} needs at least {math.ceil(floor_need)} GB free, have {available_gb:.0f} "
            f"(of {total_gb:.0f} GB total); close other apps and retry"
        )
    tier = chosen
    max_resolution = tier.max_resolution
    warnings: list[str] = []
    if profile.fixed_resolution is not None:  # the miniature model: the resolution option does not apply
        max_resolution = profile.fixed_resolution
    elif resolution is not None:
        if resolution > max_resolution:
            warnings.append(
                f"resolution {resolution} lowered to {max_resolution} px to fit {total_gb:.0f} GB"
            )
        else:
            max_resolution = resolution
    if tier.warning:
        warnings.insert(0, tier.warning.format(resolution=max_resolution))
    batch = (
        2
        if tier.quantize is None
        and not tier.gradient_checkpointing
        and image_count <= 20
        and max_side <= 1024
        else 1
    )
    reason = (
        f"{tier.name}: {total_gb:.0f} GB total, {available_gb:.0f} GB free, {image_count} images (max side {max_side}) -> "
        f"quantize={tier.quantize or 'bf16'}, batch={batch}, checkpointing={'on' if tier.gradient_checkpointing else 'off'}, "
        f"low_ram={'on' if tier.low_ram else 'off'}, max {max_resolution}px"
    )
    if notes:
        reason += " (stepped down: " + "; ".join(notes) + ")"
    if start_below:
        reason += f" (after {start_below} ran out of memory)"
    return MemoryPlan(
        tier=tier.name,
        quantize=tier.quantize,
        batch_size=batch,
        low_ram=tier.low_ram,
        gradient_checkpointing=tier.gradient_checkpointing,
        max_resolution=max_resolution,
        cache_limit_gb=tier.cache_limit_gb,
        reason=reason,
        warnings=tuple(warnings),
    )
