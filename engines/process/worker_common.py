"""The child side of the progress protocol, shared by every engine worker.

- `Reporter` writes JSON lines to the pipe the daemon passed (`--progress-fd`).
- `StopFlag` turns SIGTERM/SIGINT into a flag the training loop checks at each step, and sets it
  too when the daemon disappears (parent pid changes or the pipe breaks): the trainer never
  outlives the daemon, so a restarted daemon never finds two trainings running.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from lorad_base.fsutil import pid_alive


class Reporter:
    def __init__(self, fd: int | None):
        self.fd = fd
        self.broken = False
        self.started = time.monotonic()
        self.first_step_at: float | None = None
        self.first_step: int | None = None

    def emit(self, event: str, **fields) -> None:
        if self.fd is None or self.broken:
            return
        line = json.dumps({"event": event, **fields}, default=str) + "\n"
        try:
            os.write(self.fd, line.encode())
        except (BrokenPipeError, OSError):
            self.broken = True

    def step(self, step: int, total: int, loss: float | None) -> None:
        now = time.monotonic()
        if self.first_step_at is None:
            self.first_step_at, self.first_step = now, step
        eta = None
        done = step - (self.first_step or 0)
        if done > 0:
            eta = (now - self.first_step_at) / done * max(0, total - step)
        self.emit("step", step=step, total=total, loss=loss, eta_s=eta)


class EarlyStop(BaseException):
    """Stop before the first training step: nothing to checkpoint, so leave at once."""


class StopFlag:
    """Before the first step a stop raises EarlyStop in the main thread (model loading and
    encoding can take a minute, and there is nothing to save yet); after it, the training loop
    sees the flag at the next step boundary and checkpoints."""

    def __init__(self, reporter: Reporter, poll_s: float = 0.5):
        self.reason: str | None = None
        self.training_started = False
        self._event = threading.Event()
        self.reporter = reporter
        self.parent = int(os.environ.get("LORAD_PARENT_PID", os.getppid()))
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        threading.Thread(target=self._watch_parent, args=(poll_s,), daemon=True, name="parent-watch").start()

    def _on_signal(self, signum, _frame) -> None:
        self.set(self.reason or signal.Signals(signum).name)
        if not self.training_started:
            raise EarlyStop(self.reason)

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def _watch_parent(self, poll_s: float) -> None:
        while not self._event.wait(poll_s):
            if self.reporter.broken or not pid_alive(self.parent) or os.getppid() != self.parent:
                self.set("parent gone")
                os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread
                return


def is_memory_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(
        key in text
        for key in ("malloc", "out of memory", "unable to allocate", "insufficient memory", "allocation")
    )


def worker_main(prog: str, train, render, argv: list[str] | None = None) -> int:
    """Shared entry point of the engine workers: arguments, stop flag, error classification."""
    import argparse
    import traceback

    from engines.process.child import EXIT_MEMORY

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("mode", choices=["train", "render"])
    parser.add_argument("--job-dir", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--config")
    parser.add_argument("--resume")
    parser.add_argument("--lora")
    parser.add_argument("--prompt")
    parser.add_argument("--seed", default="42")
    parser.add_argument("--out-dir")
    parser.add_argument("--progress-fd", type=int)
    args = parser.parse_args(argv)
    reporter = Reporter(args.progress_fd)
    stop = StopFlag(reporter)
    try:
        return (train if args.mode == "train" else render)(args, reporter, stop)
    except EarlyStop:
        reporter.emit("stopped", reason=stop.reason, early=True)
        return 0
    except BaseException as exc:  # report, then exit with a code the daemon classifies
        memory = is_memory_error(exc)
        reporter.emit("error", kind="memory" if memory else "error", message=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return EXIT_MEMORY if memory else 1
