"""What a cloud trainer receives: the snapshot's images and captions in one zip, and the
arguments its endpoint takes (pure, from its schema's roles)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from engines.cloud.schema import Schema, build_arguments
from lorad_base.fsutil import temp_beside

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def request_arguments(schema: Schema, archive_url: str, config: dict) -> dict:
    """The JSON a trainer endpoint takes (pure): its own field names, from its schema's roles."""
    return build_arguments(
        schema,
        archive_url,
        {
            "steps": int(config["steps"]),
            "trigger": config.get("trigger"),
            "learning_rate": float(config["learning_rate"]) if config.get("learning_rate") else None,
        },
    )


def _is_caption(path: Path) -> bool:
    """A caption is `<image stem>.txt` beside its image; nothing else travels (preview*.txt, notes)."""
    return path.suffix == ".txt" and any(
        path.with_suffix(s).is_file() or path.with_suffix(s.upper()).is_file() for s in IMAGE_SUFFIXES
    )


def zip_snapshot(data_dir: Path, dest: Path) -> int:
    """Images and their captions from the snapshot, flat, into a zip (atomically); file count."""
    files = sorted(
        p
        for p in Path(data_dir).iterdir()
        if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or _is_caption(p))
    )
    fd, tmp = temp_beside(dest)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
            for path in files:
                archive.write(path, arcname=path.name)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(files)
