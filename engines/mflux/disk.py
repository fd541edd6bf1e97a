"""How many bytes an mflux training run writes into its work dir (pure), for the daemon's
free-space check before training (`Engine.disk_needed`)."""

from __future__ import annotations

# LoRA parameters per unit of rank: the sum of (in + out) over the linears the engine targets
# (engines/mflux/config.py TARGET_MODULES: attention q/k/v/out and feed-forward w1/w2/w3).
_Z_IMAGE = 30 * (4 * (3840 + 3840) + 3 * (3840 + 10240))  # 30 layers, dim 3840, feed-forward 10240
_TINY = 2 * (4 * (192 + 192) + 3 * (192 + 512))  # engines/mflux/tiny_model.py: 2 layers, dim 192, ff 512
PARAMS_PER_RANK = {"z-image-turbo": _Z_IMAGE, "z-image": _Z_IMAGE, "tiny-z-image": _TINY}
CHECKPOINTS_KEPT = 2  # checkpoints.prune keeps two while a third is being written


def lora_bytes(params_per_rank: int, rank: int) -> int:
    """fp32 adapter size."""
    return 4 * params_per_rank * max(1, int(rank))


def training_bytes(params_per_rank: int, rank: int, written: int = 0) -> int:
    """(kept + 1) checkpoints of adapter + AdamW's two moments, the extracted adapter and the LoRA
    file; minus what this job's checkpoints already hold (`written`), so a resumed job is not
    asked for space it already uses."""
    adapter = lora_bytes(params_per_rank, rank)
    return max(0, (CHECKPOINTS_KEPT + 1) * 3 * adapter + 2 * adapter - int(written))


def params_per_rank(model: str) -> int:
    """An unknown model is sized like Z-Image (the largest lorad knows)."""
    return PARAMS_PER_RANK.get(model, _Z_IMAGE)
