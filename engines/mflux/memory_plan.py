"""Memory plan: quantization, batch size and memory savers from the memory that limits training (pure).

On Metal (unified memory) and the CPU backend, tiers are chosen by total RAM, then stepped down
while the tier's estimated need for the model exceeds the RAM available now. On CUDA the memory
is the GPU's, and the plan prefers bf16 whenever it fits: the first tier of `CUDA_ORDER` whose
need fits the free GPU memory, whatever the total (the totals are Mac rules of thumb for memory
shared with the OS). MLX's CUDA backend lacks quantized-matmul kernels for some shapes (mflux
issue 563, "No implementation for problem shape"), so a quantized tier is a last resort there,
and `quantized=False` asks for the best unquantized tier after such a failure.
Below the last tier the job fails with "needs at least N GB free, have M".

Where the budgets come from (issue 23): `bench/p12_memory.py` measured mflux's real training step for
z-image-turbo at full width (dim 3840, the real block) with 1-3 of the 30 blocks on MLX's CPU backend and
extrapolated linearly in depth and tokens to 30 blocks (bench/results/p12_memory.json, bench/RESULTS.md).
A measured tier's budget is its measured peak x BUDGET_MARGIN; every other tier's is derived from
PEAK_MODEL, fitted to the measured tiers (exact weights per quantization, activations per token), times
the same margin. The reason line says which. The margin covers what the CPU measurement cannot see:
Metal's and CUDA's kernels and allocators (fused attention, buffer cache above `cache_limit_gb`), the
one-off load transient, the preview render, and the 10 % held-out fit error.
Kept from the earlier estimates (not measured here): the tiers' RAM thresholds (`min_total_gb`: Mac rules
of thumb for memory shared with the OS), flux2-klein's scale relative to Z-Image, and
- mflux issue #311: a VAE-decode spike of 1.5-2x at the end of a render that `--low-ram` removes;
- PortOS issue #1321: flux2-klein-9b in bf16 did not finish a step in 14 min on an M5 Max 128 GB, so the
  9B model never plans bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Budget = peak x margin (see the module docstring for what it covers); peak/budget = 0.8.
BUDGET_MARGIN = 1.25
REAL_BLOCKS = 30
CAPTION_TOKENS = 64

# z-image-turbo's training peak per measured tier, 30 blocks, at the tier's resolution and batch 1
# (bench/results/p12_memory.json "peak_gb"; tests/unit/test_memory_calibration.py keeps the two equal).
MEASURED_PEAK_GB: dict[str, float] = {"q4-minimal": 8.38, "q8-checkpointed": 19.8}


def tokens(resolution: int, caption_tokens: int = CAPTION_TOKENS) -> int:
    """Z-Image's sequence: (resolution/16)^2 image patches plus the caption, each padded to 32."""
    image = (resolution // 16) ** 2
    return image + (-image) % 32 + caption_tokens + (-caption_tokens) % 32


@dataclass(frozen=True)
class PeakModel:
    """peak_gb = resident(quantization) + batch x (tokens x per_token + tokens^2 x attention), fitted to
    the measured tiers (bench/p12_memory.py, its "planner_model").

    resident: the weights at that quantization (exact bytes of mflux's quantized modules), LoRA, its
    gradient, AdamW state and the turbo training adapter, at 30 blocks. per_token with checkpointing:
    every block keeps its input and one block's working set is live. Without checkpointing every block
    keeps its working set: derived as that one-block working set per token (per_token_block_gb) once
    more per block. attention: the T^2 scores of one block's attention backward (measured on MLX's CPU
    backend, which does not fuse it; an upper bound for Metal's fused kernel)."""

    resident_q4_gb: float
    resident_q8_gb: float
    resident_bf16_gb: float
    per_token_checkpointed_gb: float
    per_token_block_gb: float
    attention_gb_per_token2: float

    def peak_gb(self, quantize: int | None, checkpointing: bool, resolution: int, batch: int) -> float:
        resident = {4: self.resident_q4_gb, 8: self.resident_q8_gb}.get(quantize or 0, self.resident_bf16_gb)
        per_token = self.per_token_checkpointed_gb
        if not checkpointing:
            per_token += self.per_token_block_gb * REAL_BLOCKS
        t = tokens(resolution)
        return resident + batch * (t * per_token + t * t * self.attention_gb_per_token2)


# Fitted by bench/p12_memory.py from the measurements (the JSON's "planner_model").
PEAK_MODEL = PeakModel(7.02, 12.11, 21.66, 0.001032, 0.0008016, 1.96006e-07)


@dataclass(frozen=True)
class Tier:
    name: str
    min_total_gb: float
    quantize: int | None
    gradient_checkpointing: bool
    low_ram: bool
    max_resolution: int
    cache_limit_gb: float | None
    need_gb: float  # budget for z-image-turbo at this tier, batch 1 (scaled per model): peak x BUDGET_MARGIN
    warning: str | None = None  # {resolution}: the plan's final resolution
    source: str = "derived"  # "measured" (bench/p12_memory.py) or "derived" (PEAK_MODEL)
    batch2_need_gb: float | None = None  # the budget at batch 2, on the tiers that may batch (derived)


def planned_batch(quantize: int | None, checkpointing: bool) -> int:
    """The batch a tier trains at for a small dataset: 2 only on unquantized, uncheckpointed tiers."""
    return 2 if quantize is None and not checkpointing else 1


def tier_budget(
    name: str, quantize: int | None, checkpointing: bool, resolution: int, batch: int = 1
) -> tuple[float, str]:
    """(budget GB, "measured" | "derived") for z-image-turbo at a tier's settings."""
    if name in MEASURED_PEAK_GB and batch == 1:
        return round(MEASURED_PEAK_GB[name] * BUDGET_MARGIN, 1), "measured"
    return round(PEAK_MODEL.peak_gb(quantize, checkpointing, resolution, batch) * BUDGET_MARGIN, 1), "derived"


def _tier(
    name: str,
    min_total_gb: float,
    quantize: int | None,
    checkpointing: bool,
    low_ram: bool,
    resolution: int,
    cache_limit_gb: float | None,
    warning: str | None = None,
) -> Tier:
    need, source = tier_budget(name, quantize, checkpointing, resolution)
    batch2 = None
    if planned_batch(quantize, checkpointing) == 2:
        batch2 = tier_budget(name, quantize, checkpointing, resolution, batch=2)[0]
    return Tier(
        name,
        min_total_gb,
        quantize,
        checkpointing,
        low_ram,
        resolution,
        cache_limit_gb,
        need,
        warning,
        source,
        batch2,
    )


TIERS: tuple[Tier, ...] = (
    _tier("bf16", 96, None, False, False, 1024, None),
    _tier("q8", 64, 8, False, False, 1024, 24),
    _tier("q8-checkpointed", 32, 8, True, False, 1024, 8),
    _tier("q4-lowram", 24, 4, True, True, 768, 4),
    _tier(
        "q4-minimal",
        16,
        4,
        True,
        True,
        512,
        2,
        "the floor tier: training runs at {resolution} px with every memory saver on",
    ),
)


# Below this much to spare over the tier's estimated peak, other apps can tip training over.
TIGHT_HEADROOM_GB = 3.0


def headroom_words(available_gb: float, total_gb: float, need_gb: float) -> str:
    """The memory advice worded by the actual headroom (pure): "close other apps" only when
    what is free now leaves little over the plan's estimated peak."""
    spare = available_gb - need_gb
    if spare < TIGHT_HEADROOM_GB:
        return (
            f"only ~{max(spare, 0):.0f} GB to spare ({available_gb:.0f} of {total_gb:.0f} GB free now, "
            f"~{need_gb:.0f} GB needed): close other apps before it runs"
        )
    return f"{available_gb:.0f} of {total_gb:.0f} GB free now, ~{spare:.0f} GB to spare over the ~{need_gb:.0f} GB it needs"


def tier_budget_gb(name: str) -> float:
    """A tier's planned budget for z-image-turbo (the bench's `planned_gb`)."""
    return next(t.need_gb for t in (*TIERS, BF16_CHECKPOINTED) if t.name == name)


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


# CUDA only (derived from PEAK_MODEL): bf16 weights with gradient checkpointing, for GPUs of
# 40-80 GB that would otherwise need the quantized kernels.
BF16_CHECKPOINTED = _tier("bf16-checkpointed", 48, None, True, False, 1024, None)
# The tiers CUDA tries, best first: unquantized while it fits, quantized only below that
# (q8 without checkpointing needs more than bf16-checkpointed, so CUDA never picks it).
CUDA_ORDER = ("bf16", "bf16-checkpointed", "q8-checkpointed", "q4-lowram", "q4-minimal")


# A test render is forward passes only: it needs less than a checkpointed training step at the same
# quantization and resolution (no gradients, no optimizer state, no block inputs kept for backward). So
# the checkpointed tiers' training budgets at 1024 px (bf16, q8) bound a 1024 px render from above; the
# q4 tiers' budgets are for training at 768/512 px and are the best estimate here for a q4 render. A
# render is planned by that need alone, best quality first, against what is free now: the tiers' RAM
# thresholds (`min_total_gb`) are rules of thumb for hours of training beside the OS.
RENDER_ORDER = ("bf16-checkpointed", "q8-checkpointed", "q4-lowram", "q4-minimal")


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
        return _tiers_named(CUDA_ORDER)
    return TIERS


def _tiers_named(names: tuple[str, ...]) -> tuple[Tier, ...]:
    by_name = {t.name: t for t in (*TIERS, BF16_CHECKPOINTED)}
    return tuple(by_name[name] for name in names)


def plan_render_memory(*, model: str, total_gb: float, available_gb: float) -> MemoryPlan:
    """The quantization for a test render (a cloud-trained LoRA's): the best tier in `RENDER_ORDER`
    whose budget fits what is free now (pure). Raises InsufficientMemory when none does."""
    profile = profile_for(model)
    notes: list[str] = []
    for tier in _tiers_named(RENDER_ORDER):
        need = tier.need_gb * profile.scale
        if tier.quantize is None and not profile.allow_bf16:
            continue
        if need <= available_gb:
            reason = (
                f"render: {total_gb:.0f} GB total, {available_gb:.0f} GB free -> quantize={tier.quantize or 'bf16'} "
                f"(the {tier.name} training budget sizes it: ~{need:.1f} GB)"
            )
            if notes:
                reason += " (stepped down: " + "; ".join(notes) + ")"
            return MemoryPlan(
                tier=f"render-q{tier.quantize}" if tier.quantize else "render-bf16", quantize=tier.quantize, batch_size=1,
                low_ram=tier.low_ram, gradient_checkpointing=False,
                max_resolution=profile.fixed_resolution or 1024, cache_limit_gb=tier.cache_limit_gb,
                reason=reason,
            )  # fmt: skip
        notes.append(f"{tier.name} needs ~{need:.0f} GB free")
    floor = _tiers_named(RENDER_ORDER)[-1].need_gb * profile.scale
    raise InsufficientMemory(
        f"rendering {model} needs at least {math.ceil(floor)} GB free, have {available_gb:.0f} "
        f"(of {total_gb:.0f} GB total); close other apps and retry"
    )


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
        need = tier.need_gb * profile.scale
        warnings.insert(
            0,
            tier.warning.format(resolution=max_resolution)
            + "; "
            + headroom_words(available_gb, total_gb, need),
        )
    need = tier.need_gb * profile.scale
    batch = 1
    if tier.batch2_need_gb is not None and image_count <= 20 and max_side <= 1024:
        if tier.batch2_need_gb * profile.scale <= available_gb:  # two images a step only where they fit
            batch, need = 2, tier.batch2_need_gb * profile.scale
    reason = (
        f"{tier.name}: {total_gb:.0f} GB total, {available_gb:.0f} GB free, {image_count} images (max side {max_side}) -> "
        f"quantize={tier.quantize or 'bf16'}, batch={batch}, checkpointing={'on' if tier.gradient_checkpointing else 'off'}, "
        f"low_ram={'on' if tier.low_ram else 'off'}, max {max_resolution}px, "
        f"budget ~{need:.1f} GB ({tier.source if batch == 1 else 'derived'})"
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
