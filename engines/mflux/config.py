"""mflux's training JSON from the memory plan and the dataset's overrides (pure).

Defaults for a character LoRA on Z-Image-Turbo, and where they come from:
- rank 16 / alpha 16 on attention (to_q, to_k, to_v, to_out.0) and feed-forward (w1, w2, w3) of
  all 30 layers: mflux's `_example/train.json` targets exactly these modules at rank 16;
  alpha = rank keeps scale 1.0 (ai-toolkit's Z-Image preset uses linear 16 / alpha 16).
- AdamW at 1e-4: mflux's example and ai-toolkit's Z-Image preset.
- steps 9, timestep_low 4, timestep_high 9, guidance 0: mflux's example for z-image-turbo
  (the turbo model samples in 9 steps; training the later timesteps keeps identity).
- length: ~100 steps per image clamped to 1000-3000 (ai-toolkit's preset trains 3000 steps;
  mflux-lora presets use 1500-2000 for 15-20 images).
- seed 42: fixed, so an interrupted job resumes to the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path

from engines.mflux.memory_plan import MemoryPlan, profile_for

DEFAULT_RANK = 16
DEFAULT_LR = 1e-4
# The miniature model has random weights: a larger rate makes its LoRA visibly change the render.
TINY_LR = 1e-2
# mflux's "batch" loss (the smooth line of its loss.html): every `plot_frequency` steps, an extra forward
# over up to 10 training samples (mflux #671: "each point costs real time"). The per-step loss, which
# lorad's verdicts and chart use, is recorded free at every step. At 20 points, a 1000-step run of 20
# images spent an estimated 5-7 % of its time on them (10 forwards a point, ~3 forwards a step), and a
# run under 20 steps paid one every step; at 5, about 1.5 %. Measured on the miniature model: the 40-step
# learning test (8 images) took 41.5 user CPU-s at 20 points and 27.0 at none.
BATCH_LOSS_POINTS = 5
SEED = 42
TARGET_MODULES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
# Per mflux model: (transformer layers, inference steps, timestep_low, timestep_high)
MODEL_SHAPES = {
    "z-image-turbo": (30, 9, 4, 9),
    "z-image": (30, 50, 0, 50),
    "dev": (57, 25, 0, 25),  # FLUX.1 [dev]: 19 double + 38 single blocks; ~25 steps to render
}
TINY_SHAPE = (2, 4, 0, 4)


def steps_per_epoch(image_count: int, batch_size: int) -> int:
    return max(1, math.ceil(image_count / batch_size))


def default_total_steps(model: str, image_count: int) -> int:
    if model == "tiny-z-image":
        return 4
    return min(3000, max(1000, 100 * image_count))


def training_length(model: str, options: dict, image_count: int, batch_size: int) -> tuple[int, int]:
    """(num_epochs, total_steps) from `epochs` or `steps` or the default."""
    per_epoch = steps_per_epoch(image_count, batch_size)
    if "epochs" in options:
        epochs = int(options["epochs"])
    else:
        wanted = int(options.get("steps") or default_total_steps(model, image_count))
        epochs = max(1, math.ceil(wanted / per_epoch))
    return epochs, epochs * per_epoch


def sample_interval(options: dict, total: int) -> int:
    """Steps between samples: the `sample_every` option, else about four samples a run (pure)."""
    every = options.get("sample_every")
    if isinstance(every, int) and not isinstance(every, bool) and every > 0:
        return every
    return max(1, math.ceil(total / 4))


def build_config(
    *,
    model: str,
    memory: MemoryPlan,
    options: dict,
    image_count: int,
    data_dir: Path,
    output_dir: Path,
    model_path: Path | None = None,
    checkpoint_every: int = 0,
) -> tuple[dict, int]:
    """The mflux training config (absolute paths) and the total number of training steps."""
    profile = profile_for(model)
    layers, steps, t_low, t_high = (
        TINY_SHAPE
        if model == "tiny-z-image"
        else MODEL_SHAPES.get(profile.mflux_model, MODEL_SHAPES["z-image-turbo"])
    )
    rank = int(options.get("rank", DEFAULT_RANK))
    alpha = float(options.get("alpha", rank))
    epochs, total = training_length(model, options, image_count, memory.batch_size)
    save_every = max(1, min(50, total // 10)) if model != "tiny-z-image" else 5
    if checkpoint_every > 0:
        save_every = checkpoint_every
    targets = [
        {
            "module_path": f"layers.{{block}}.{module}",
            "blocks": {"start": 0, "end": layers},
            "rank": rank,
            "alpha": alpha,
        }
        for module in TARGET_MODULES
    ]
    preview = 64 if model == "tiny-z-image" else 512
    config = {
        "model": profile.mflux_model,
        "model_path": str(model_path) if model_path else None,
        "data": str(data_dir),
        "seed": SEED,
        "steps": steps,
        "guidance": 0.0,
        "quantize": memory.quantize,
        "max_resolution": memory.max_resolution,
        "low_ram": memory.low_ram,
        "gradient_checkpointing": memory.gradient_checkpointing,
        "cache_limit_gb": memory.cache_limit_gb,
        "training_loop": {
            "num_epochs": epochs,
            "batch_size": memory.batch_size,
            "timestep_low": t_low,
            "timestep_high": t_high,
        },
        "optimizer": {
            "name": "AdamW",
            "learning_rate": float(
                options.get("learning_rate", TINY_LR if model == "tiny-z-image" else DEFAULT_LR)
            ),
        },
        "checkpoint": {"save_frequency": save_every, "output_path": str(output_dir)},
        "monitoring": {
            "preview_width": preview,
            "preview_height": preview,
            "plot_frequency": max(1, math.ceil(total / BATCH_LOSS_POINTS)),
            # Samples (mflux's previews of data/preview*.txt): at the start (mflux always makes
            # one), then every sample_every steps; by default about four times a run.
            "generate_image_frequency": sample_interval(options, total),
        },
        "lora_layers": {"targets": targets},
    }
    return config, total
