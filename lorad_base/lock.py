"""Single-instance lock on the state dir: flock on <state>/lorad.lock, which also holds the pid.

flock is released by the kernel when the process dies (kill -9 included), so a stale lock never
blocks a restart; the pid inside is only for messages and for the CLI to wake the daemon.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "lorad.lock"


class AlreadyRunning(Exception):
    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another lorad is already running on this state dir ({who} holds {path})")


class InstanceLock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.path, read_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


def read_pid(path: Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def running_daemon_pid(state_dir: Path) -> int | None:
    """The pid of the daemon holding the lock, or None when no daemon runs."""
    path = Path(state_dir) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
