"""Disk space: refuse early when a job cannot fit, and always be able to record that a job failed.

- `space_needed` (pure) estimates the bytes intake (the snapshot) and training (the engine's own
  estimate of its checkpoints and adapter, plus a margin) will write into the state dir; intake and the pipeline compare it
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


def space_needed(phase: str, *, dataset_bytes: int = 0, engine_bytes: int = 0) -> int:
    """Bytes the phase will add to the state disk (pure).

    intake: the snapshot (dataset_bytes, already sized for conversions) plus a margin.
    train: what the engine says its training will still write (`Engine.disk_needed`: checkpoints,
    adapter; a resumed job's existing checkpoints already deducted) plus a margin for the LoRA
    copy, logs, plots, renders and database pages."""
    if phase == "intake":
        return int(dataset_bytes) + INTAKE_MARGIN
    if phase == "train":
        return max(0, int(engine_bytes)) + TRAIN_MARGIN
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
    current: BaseException | None = exc
    while current is not None and seen < 10:
        exc = current
        if isinstance(exc, sqlite3.OperationalError) and (
            getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL
        ):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


DISK_FULL_TEXTS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def looks_like_disk_full(text: str | None) -> bool:
    """A child's error message (we only get its text) that says the disk was full (pure)."""
    return text is not None and any(t in text for t in DISK_FULL_TEXTS)


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
