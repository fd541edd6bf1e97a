"""Disk space: refuse early when a job cannot fit, and always be able to record that a job failed.

- `space_needed` (pure) estimates the bytes intake (the snapshot) and training (checkpoints,
  adapter, LoRA file, renders) will write into the state dir; intake and the pipeline compare it
  with the free space and fail the job with both numbers before starting.
- A full state disk can still strike mid-job (another program fills it). The final state write
  must then succeed, or the job looks alive forever: lorad keeps a small reserve file in the state
  dir and deletes it to make room for that write, then recreates it when space allows.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

MiB = 1 << 20
RESERVE_FILE = "space.reserve"
RESERVE_BYTES = 2 * MiB  # a failed transition, a job.json and a few log lines need far less
INTAKE_MARGIN = 4 * MiB  # manifest, job.json, database pages
TRAIN_MARGIN = 16 * MiB  # logs, plan, loss plot, test renders, database pages

# LoRA parameters per unit of rank: the sum of (in + out) over the linears the engine targets
# (engines/mflux_config.py TARGET_MODULES: attention q/k/v/out and feed-forward w1/w2/w3).
_Z_IMAGE = 30 * (4 * (3840 + 3840) + 3 * (3840 + 10240))  # 30 layers, dim 3840, feed-forward 10240
_TINY = 2 * (4 * (192 + 192) + 3 * (192 + 512))  # engines/tiny_model.py: 2 layers, dim 192, ff 512
PARAMS_PER_RANK = {"z-image-turbo": _Z_IMAGE, "z-image": _Z_IMAGE, "tiny-z-image": _TINY}
SCRIPTED_PARAMS_PER_RANK = 64 + 64  # engines/scripted_worker.py's two 64-wide matrices
CHECKPOINTS_KEPT = 2  # engines/checkpoints.prune keeps two; a third is being written


def lora_bytes(engine: str, model: str, rank: int) -> int:
    """fp32 adapter size; an unknown model is sized like Z-Image (the largest lorad knows)."""
    per_rank = SCRIPTED_PARAMS_PER_RANK if engine == "scripted" else PARAMS_PER_RANK.get(model, _Z_IMAGE)
    return 4 * per_rank * max(1, int(rank))


def space_needed(
    phase: str,
    *,
    dataset_bytes: int = 0,
    engine: str = "mflux",
    model: str = "z-image-turbo",
    rank: int = 16,
    written: int = 0,
) -> int:
    """Bytes the phase will add to the state disk (pure).

    intake: the snapshot (dataset_bytes, already sized for conversions) plus a margin.
    train: (kept + 1) checkpoints of adapter + AdamW's two moments, the extracted adapter and
    the LoRA file, plus a margin; minus what this job's checkpoints already hold (`written`),
    so a resumed job is not asked for space it already uses."""
    if phase == "intake":
        return int(dataset_bytes) + INTAKE_MARGIN
    if phase == "train":
        adapter = lora_bytes(engine, model, rank)
        total = (CHECKPOINTS_KEPT + 1) * 3 * adapter + 2 * adapter + TRAIN_MARGIN
        return max(TRAIN_MARGIN, total - int(written))
    raise ValueError(f"unknown phase {phase!r}")


def snapshot_bytes(images, captions: dict) -> int:
    """What a snapshot of these images (validate.ImageInfo) takes: copies keep their size, a
    converted image becomes an RGB PNG (at most ~3 bytes a pixel) (pure)."""
    total = sum(len(text.encode("utf-8")) + 1 for text in captions.values())
    for image in images:
        total += image.width * image.height * 3 + 4096 if image.convert else image.size_bytes
    return total


def human(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GB"
    if n >= MiB:
        return f"{n / MiB:.1f} MB"
    return f"{n / 1024:.0f} KB"


def space_problem(what: str, where: Path, needed: int, free: int, then: str) -> str | None:
    """The refusal text when `free` < `needed` (pure); None when it fits."""
    if free >= needed:
        return None
    return (
        f"not enough free space for {what}: {human(needed)} needed, {human(free)} free on the disk holding "
        f"{where}. Free some space there, then {then}"
    )


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the disk holding `path` (its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL or an OSError ENOSPC/EDQUOT, anywhere in the exception's chain."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, sqlite3.OperationalError) and (
            getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL
        ):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


DISK_FULL_TEXTS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def looks_like_disk_full(text: str | None) -> bool:
    """A child's error message (we only get its text) that says the disk was full (pure)."""
    return bool(text) and any(t in text for t in DISK_FULL_TEXTS)


def ensure_reserve(state: Path, size: int = RESERVE_BYTES) -> bool:
    """Create the reserve file when it is missing and the disk has room to spare (never let the
    reserve itself fill a nearly full disk). True when a reserve is in place."""
    path = Path(state) / RESERVE_FILE
    try:
        if path.stat().st_size >= size:
            return True
    except FileNotFoundError:
        pass
    except OSError:
        return False
    if free_bytes(state) < 4 * size:
        return False
    from daemon.fsutil import atomic_write_bytes

    try:
        atomic_write_bytes(path, b"\0" * size)  # real zeros: a sparse file would free nothing
    except OSError:
        return False
    return True


def release_reserve(state: Path) -> int:
    """Delete the reserve file; the bytes it freed (0 when there was none)."""
    path = Path(state) / RESERVE_FILE
    try:
        size = path.stat().st_size
        os.unlink(path)
    except OSError:
        return 0
    return size
