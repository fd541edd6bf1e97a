"""Atomic file writes: temp file in the same folder + fsync + rename + fsync of the folder.

A reader (the user in Finder, a crashed-and-restarted daemon) sees the old file or the new
one, never half of one.
"""

from __future__ import annotations

import os
import re
import stat
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
            if mode is not None:  # before any byte is written: a secret is never readable by others
                os.fchmod(fh.fileno(), mode)
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


# What lstat/fstat say a path is, for messages: opening a FIFO blocks until a writer appears, a
# device can stream forever, a socket cannot be opened at all.
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symlink"),
)


def file_kind(mode: int) -> str:
    """'a regular file', 'a FIFO (named pipe)', 'a socket', ... for an st_mode (pure)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a special file"


class NotARegularFile(OSError):
    """A path that lorad must not open: a FIFO, socket, device or folder (possibly behind a symlink)."""

    def __init__(self, path: Path | str, kind: str):
        super().__init__(f"it is {kind}, not a file")
        self.strerror = f"it is {kind}, not a file"
        self.filename = str(path)
        self.path = Path(path)
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename} is {self.kind}, not a file"


def open_regular(path: Path | str):
    """Open a regular file for reading, never anything else: lstat first (a symlink is resolved and
    its target checked the same way), open with O_NOFOLLOW | O_NONBLOCK (a FIFO swapped in after
    the lstat cannot block), then fstat the descriptor. Raises NotARegularFile, or the OSError of
    the open (FileNotFoundError for a broken symlink)."""
    path = os.fspath(path)
    target = path
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(path, f"a symlink to {file_kind(st.st_mode)}")
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(path, file_kind(st.st_mode))
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    fd = os.open(target, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(path, file_kind(st.st_mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: Path | str, limit: int) -> tuple[bytes, int]:
    """(the first limit + 1 bytes, the file's size) of a regular file: a caller compares the size
    with its limit before trusting the bytes, and never holds more than limit + 1 in memory."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        return fh.read(limit + 1), size
