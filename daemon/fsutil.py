"""Atomic file writes: temp file in the same folder + fsync + rename + fsync of the folder.

A reader (the user in Finder, a crashed-and-restarted daemon) sees the old file or the new
one, never half of one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Our temp names: .<target name>.<pid>.<8 hex>.tmp (see temp_beside / temp_dir_beside).
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_beside(path: Path) -> tuple[int, str]:
    """Create a unique hidden temp file next to `path` (same filesystem, so rename is atomic).
    os-level rather than `tempfile`, which costs the CLI noticeable start-up time."""
    path = Path(path)
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp
        except FileExistsError:
            continue


def temp_dir_beside(path: Path) -> Path:
    """A unique hidden temp folder next to `path`, named like temp_beside's files."""
    path = Path(path)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def pid_alive(pid: int) -> bool:
    """True while `pid` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete lorad temp files/folders in `folder` left by a process that died mid-write.
    Only names of our own pattern, and only when the writing pid is gone."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                import shutil  # here: `lorad status` imports this module and shutil is not free

                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)
