"""Run an engine's worker as a child process and follow its JSON-lines progress pipe.

Shared by every engine that trains in a child: spawn (own session, so a terminal's Ctrl-C or
launchd's process-group kill reaches only the daemon, which then stops the child properly),
read progress, forward a stop request as SIGTERM (the worker checkpoints, then exits), and
classify how it ended. On macOS the child runs under `caffeinate -i -w <pid>`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engines.base import StopToken
from lorad_base.childenv import child_env

EXIT_MEMORY = 75  # the worker's code for an allocation failure


@dataclass
class ChildOutcome:
    returncode: int
    events: list[dict] = field(default_factory=list)
    stop_reason: str | None = None
    stderr_tail: str = ""

    def last(self, name: str) -> dict | None:
        for event in reversed(self.events):
            if event.get("event") == name:
                return event
        return None

    @property
    def killed_by_sigkill(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def memory_pressure(self) -> bool:
        if self.stop_reason is not None:
            return False
        error = self.last("error")
        return (
            self.killed_by_sigkill
            or self.returncode == EXIT_MEMORY
            or bool(error and error.get("kind") == "memory")
        )


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def with_bytecode_cache(env: dict) -> dict:
    """`env` for a Python child that imports the ML stack, minus PYTHONDONTWRITEBYTECODE: the
    first child writes the .pyc files of mflux/mlx/transformers (next to their sources, where
    Python looks for them) and later children load them, instead of each one compiling ~1000
    modules from source (about 11 s against 4 s here; bench/RESULTS.md)."""
    return {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_child(
    args: list[str],
    *,
    cwd: Path,
    log_path: Path,
    on_event: Callable[[dict], None],
    stop: StopToken,
    stop_timeout_s: float = 60.0,
    env: dict | None = None,
    keep_awake: bool = True,
    on_spawn: Callable[[int], None] | None = None,
    keep_secrets: tuple[str, ...] = (),
) -> ChildOutcome:
    """Run `python <args>` in cwd; progress events arrive on fd passed as --progress-fd. The
    child's environment is the daemon's without secrets (daemon/childenv.py; `keep_secrets`
    names the ones it needs) plus `env`."""
    read_fd, write_fd = os.pipe()
    extra = {**(env or {}), "PYTHONUNBUFFERED": "1", "LORAD_PARENT_PID": str(os.getpid())}
    environment = with_bytecode_cache(child_env(os.environ, extra=extra, keep=keep_secrets))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *args, "--progress-fd", str(write_fd)],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    if on_spawn:
        on_spawn(proc.pid)
    caffeinate: subprocess.Popen[bytes] | None = None
    if keep_awake and sys.platform == "darwin":
        try:
            caffeinate = subprocess.Popen(
                ["caffeinate", "-i", "-w", str(proc.pid)], start_new_session=True, env=child_env(os.environ)
            )
        except OSError:
            caffeinate = None
    outcome = ChildOutcome(returncode=0)
    buffer = b""
    term_sent_at: float | None = None
    try:
        while True:
            if term_sent_at is None and stop.requested():
                outcome.stop_reason = stop.reason
                _signal(proc, signal.SIGTERM)
                term_sent_at = time.monotonic()
            if (
                term_sent_at is not None
                and time.monotonic() - term_sent_at > stop_timeout_s
                and proc.poll() is None
            ):
                _signal(proc, signal.SIGKILL)
            ready, _, _ = select.select([read_fd], [], [], 0.2)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break  # the child closed its end: it exited
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    outcome.events.append(event)
                    on_event(event)
            elif proc.poll() is not None:
                break
        proc.wait()
    finally:
        os.close(read_fd)
        if proc.poll() is None:  # the parent is being torn down: never leave a trainer behind
            _signal(proc, signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        if caffeinate is not None and caffeinate.poll() is None:
            caffeinate.terminate()
    outcome.returncode = proc.returncode
    outcome.stderr_tail = _tail(log_path)
    return outcome


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
