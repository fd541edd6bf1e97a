"""Watch assets/training_data for READY files and feed dataset folders to intake, one at a time.

A recursive watchdog observer (or PollingObserver for SMB/NFS) reacts to created and moved-in
events (Finder and editors save by rename; `touch` creates). Events are debounced per dataset
folder: a burst is one intake. The `IntakeLoop` thread runs intakes serially, so the watcher,
the start-up rescan and the periodic rescan can never race each other into two jobs.
"""

from __future__ import annotations

import heapq
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from daemon.intake.contract import READY
from daemon.logs import get_logger

# A folder appearing is usually a copy starting: look a little later. A READY event is the
# user's signal and goes first (so, in a burst, READY order decides, not folder creation order).
FOLDER_EVENT_DELAY_S = 1.0
# A READY still open for writing is not read before it is closed (its options may be half written),
# or this long at most (logged): inotify (Linux) reports the close. FSEvents and polling do not,
# so there READY is read once its size and mtime hold still across settle_s (Intake.take).
READY_OPEN_MAX_S = 120.0
# A READY just created waits this long for the "opened" event that tells an open file (being
# written) from a renamed or linked one (complete): both arrive together from one open().
READY_CREATED_GRACE_S = 0.3


def reports_close_events(polling: bool) -> bool:
    """Whether the observer reports a writer closing a file (inotify: IN_CLOSE_WRITE)."""
    return not polling and sys.platform.startswith("linux")


def ready_write_state(state: str | None, event_type: str) -> str | None:
    """READY's write state after an event (pure): None (not being written), "created" (appeared:
    by an open, or by a rename/link that needs no close), "writing" (opened after it was created,
    or written to) until the writer closes it."""
    if event_type in ("closed", "moved", "deleted"):
        return None
    if event_type == "created":
        return "created"
    if event_type == "opened":
        return "writing" if state == "created" else state
    if event_type == "modified":
        return "writing"
    return state


def dataset_for_event(root: Path, path: str) -> tuple[Path, float | None] | None:
    """(dataset folder, delay) for an event that can make a READY appear, else None (pure)."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) == 1:
        return root / parts[0], FOLDER_EVENT_DELAY_S  # a folder (or a link) moved/copied in
    if len(parts) == 2 and parts[1] == READY:
        return root / parts[0], None
    return None


def _ready_mtime(folder: Path) -> int | None:
    try:
        return (folder / READY).lstat().st_mtime_ns
    except OSError:
        return None


class IntakeLoop:
    """Serial intake worker with per-folder debounce and retry scheduling."""

    def __init__(
        self,
        take: Callable[[Path], object],
        *,
        debounce_s: float = 0.02,
        settle_s: float = 0.05,
        ready_open_max_s: float = READY_OPEN_MAX_S,
    ):
        self.take = take
        self.debounce_s = debounce_s
        self.retry_s = max(0.25, settle_s * 4)
        self.ready_open_max_s = ready_open_max_s
        # folder -> (write state of its READY, monotonic time it was first seen open for writing)
        self._ready_writes: dict[Path, tuple[str, float]] = {}
        self._due: dict[Path, float] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._counter = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.log = get_logger()
        self.thread = threading.Thread(target=self._run, name="intake", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.thread.join(timeout=10)

    def schedule(self, folder: Path, delay: float | None = None) -> None:
        due = time.monotonic() + (self.debounce_s if delay is None else delay)
        with self._cond:
            if folder in self._due and self._due[folder] <= due:
                return  # already pending sooner: this event joins that intake
            self._due[folder] = due
            self._counter += 1
            heapq.heappush(self._heap, (due, self._counter, folder))
            self._cond.notify()

    def ready_event(self, folder: Path, event_type: str) -> None:
        """Follow READY's writer (watcher thread): see ready_write_state."""
        with self._cond:
            old = self._ready_writes.get(folder)
            state = ready_write_state(old[0] if old else None, event_type)
            if state is None:
                self._ready_writes.pop(folder, None)
            elif old is None or old[0] != state:
                since = old[1] if old and old[0] == "writing" else time.monotonic()
                self._ready_writes[folder] = (state, since)

    def _writer_wait(self, folder: Path) -> float:
        """Seconds still to wait for READY's writer to close it; 0 = read it now."""
        with self._cond:
            state, since = self._ready_writes.pop(folder, (None, 0.0))
            if state == "created":
                left = since + READY_CREATED_GRACE_S - time.monotonic()
                if left > 0:
                    self._ready_writes[folder] = (state, since)
                    return left
                return 0.0  # not seen open: "created" by a rename or link is complete
            if state != "writing":
                return 0.0
            left = since + self.ready_open_max_s - time.monotonic()
            if left > 0:
                self._ready_writes[folder] = (state, since)
                return left
        self.log.warning("intake.ready_open_timeout", dataset=folder.name, waited_s=self.ready_open_max_s)
        return 0.0

    def _is_being_written(self, folder: Path) -> bool:
        entry = self._ready_writes.get(folder)
        return entry is not None and entry[0] == "writing"

    def rescan(self, root: Path) -> int:
        """Schedule every folder that holds a READY, oldest READY first (FIFO across restarts).
        A folder whose READY cannot be read is skipped this time; an error listing `root` itself
        is raised to the caller (the daemon logs it and retries later)."""
        found = []
        try:
            for child in root.iterdir():
                try:
                    st = (child / READY).lstat()
                except OSError:  # none there, not a folder, or unreadable right now
                    continue
                found.append((st.st_mtime_ns, child))
        except FileNotFoundError:
            return 0
        for _mtime, folder in sorted(found):
            self.schedule(folder, delay=0)
        return len(found)

    def _next(self) -> Path | None:
        with self._cond:
            while not self._stopped:
                if self._heap:
                    due, _, folder = self._heap[0]
                    if self._due.get(folder) != due:
                        heapq.heappop(self._heap)  # superseded entry
                        continue
                    wait = due - time.monotonic()
                    if wait <= 0:
                        chosen = self._oldest_ready(folder)
                        del self._due[chosen]
                        return chosen
                    self._cond.wait(wait)
                else:
                    self._cond.wait()
            return None

    def _oldest_ready(self, due_folder: Path) -> Path:
        """FIFO by READY time: a pending folder whose READY is older goes before the due one
        (a folder's own earlier event can make it due first in a burst)."""
        best, best_mtime = due_folder, _ready_mtime(due_folder)
        if best_mtime is None:
            return due_folder
        for folder in self._due:
            if self._is_being_written(folder):
                continue
            mtime = _ready_mtime(folder)
            if mtime is not None and mtime < best_mtime:
                best, best_mtime = folder, mtime
        return best

    def _run(self) -> None:
        waiting_logged: set[Path] = set()
        while (folder := self._next()) is not None:
            wait = self._writer_wait(folder)
            if wait > 0:
                if folder not in waiting_logged and self._is_being_written(folder):
                    waiting_logged.add(folder)
                    self.log.info("intake.ready_open", dataset=folder.name, max_wait_s=round(wait, 1))
                self.schedule(folder, delay=wait)  # its close event schedules it sooner
                continue
            waiting_logged.discard(folder)
            try:
                outcome = self.take(folder)
            except Exception:
                self.log.exception("intake.error", dataset=folder.name)
                continue
            status = getattr(outcome, "status", None)
            self.log.debug("intake.outcome", dataset=folder.name, status=status)
            if status == "unstable":
                self.schedule(folder, delay=self.retry_s)
            elif status == "changed":
                self.schedule(folder, delay=1.0)


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        root: Path,
        schedule: Callable[..., None],
        ready_event: Callable[[Path, str], None] | None = None,
    ):
        self.root = root
        self.schedule = schedule
        self.ready_event = ready_event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self.ready_event is not None:
            self._follow_ready_writer(event)
        if event.event_type not in ("created", "moved", "modified", "closed"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        found = dataset_for_event(self.root, str(path))
        if found is not None:
            folder, delay = found
            self.schedule(folder, delay)

    def _follow_ready_writer(self, event: FileSystemEvent) -> None:
        """Tell the intake loop when READY is opened, written and closed (before it is scheduled)."""
        if event.is_directory or event.is_synthetic:
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        found = dataset_for_event(self.root, str(path))
        if found is None or found[1] is not None:
            return  # not a READY
        if event.event_type == "created" and not _is_regular(str(path)):
            return  # a FIFO, symlink or device named READY is refused by intake, never waited for
        if self.ready_event is not None:
            self.ready_event(found[0], event.event_type)


class Watcher:
    def __init__(
        self,
        root: Path,
        schedule: Callable[..., None],
        *,
        polling: bool = False,
        ready_event: Callable[[Path, str], None] | None = None,
    ):
        self.root = root
        self.observer = PollingObserver(timeout=2) if polling else Observer()
        if not reports_close_events(polling):
            ready_event = None  # no close events: READY's settle rule alone decides
        self.observer.schedule(_Handler(root, schedule, ready_event), str(root), recursive=True)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)
