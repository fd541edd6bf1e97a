"""Watch assets/training_data for READY files and feed dataset folders to intake, one at a time.

A recursive watchdog observer (or PollingObserver for SMB/NFS) reacts to created and moved-in
events (Finder and editors save by rename; `touch` creates). Events are debounced per dataset
folder: a burst is one intake. The `IntakeLoop` thread runs intakes serially, so the watcher,
the start-up rescan and the periodic rescan can never race each other into two jobs.
"""

from __future__ import annotations

import heapq
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

    def __init__(self, take: Callable[[Path], object], *, debounce_s: float = 0.02, settle_s: float = 0.05):
        self.take = take
        self.debounce_s = debounce_s
        self.retry_s = max(0.25, settle_s * 4)
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

    def rescan(self, root: Path) -> int:
        """Schedule every folder that holds a READY, oldest READY first (FIFO across restarts)."""
        found = []
        try:
            for child in root.iterdir():
                try:
                    st = (child / READY).lstat()
                except (FileNotFoundError, NotADirectoryError, PermissionError):
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
            mtime = _ready_mtime(folder)
            if mtime is not None and mtime < best_mtime:
                best, best_mtime = folder, mtime
        return best

    def _run(self) -> None:
        while (folder := self._next()) is not None:
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


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, schedule: Callable[..., None]):
        self.root = root
        self.schedule = schedule

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("created", "moved", "modified", "closed"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        found = dataset_for_event(self.root, str(path))
        if found is not None:
            folder, delay = found
            self.schedule(folder, delay)


class Watcher:
    def __init__(self, root: Path, schedule: Callable[..., None], *, polling: bool = False):
        self.root = root
        self.observer = PollingObserver(timeout=2) if polling else Observer()
        self.observer.schedule(_Handler(root, schedule), str(root), recursive=True)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)
