"""Wake the main thread for a signal, whichever thread the kernel handed it to.

A kill(2) may be delivered to any thread of the process. CPython runs the Python handler only in
the main thread, once that thread runs bytecode again, and a lock wait there (`Event.wait`) is not
interrupted by a signal another thread took: the daemon's main thread, parked in its 180 s rescan
wait, once ignored a SIGTERM for a minute in CI. `signal.set_wakeup_fd` makes the C-level handler
write a byte to a socket; the main thread waits in `poll` on that socket, so every signal wakes
it at once, with no polling (an idle daemon stays at ~0 CPU).
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time

FALLBACK_SLICE_S = 0.5  # only off the main thread, where set_wakeup_fd is not allowed


class SignalWake:
    """`wait(event, timeout)` for the main thread: returns as soon as a signal handler has set
    `event`, or at the timeout. Use as a context manager (restores the previous wakeup fd)."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._poll: select.poll | None = None  # None: off the main thread, waits in slices
        try:
            self._previous = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: set_wakeup_fd refuses it
            self._read.close()
            self._write.close()
            return
        # poll, not select: the daemon raises its file limit, and select refuses fds over 1023.
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)

    def __enter__(self) -> SignalWake:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """True when `event` is set (a handler set it), False at the timeout."""
        deadline = time.monotonic() + timeout
        # The loop's backward jump lets CPython run a pending handler before `is_set` is read again.
        while not event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._poll is None:
                event.wait(min(FALLBACK_SLICE_S, remaining))
            elif self._poll.poll(remaining * 1000):
                self._drain()
        return True

    def _drain(self) -> None:
        try:
            while self._read.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        if self._poll is None:
            return
        signal.set_wakeup_fd(self._previous)
        self._poll = None
        self._read.close()
        self._write.close()
