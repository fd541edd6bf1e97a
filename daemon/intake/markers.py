"""The user's view in Finder and `ls`: one state marker at a time in the dataset folder.

`marker_plan` is the pure state machine (job state -> the marker to write and the ones to
remove); `write_marker` does the I/O atomically and never touches READY (the user's) or
anything else in the folder. A dataset folder that is gone is not recreated.
"""

from __future__ import annotations

import stat
from pathlib import Path

from daemon.fsutil import atomic_write_text

STATE_MARKERS = ("QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED")

MARKER_FOR_STATE = {
    "queued": "QUEUED",
    "interrupted": "QUEUED",  # it resumes when the daemon runs again
    "preparing": "TRAINING",
    "training": "TRAINING",
    "rendering": "TRAINING",
    "publishing": "TRAINING",
    "done": "DONE",
    "failed": "FAILED.txt",
    "cancelled": "CANCELLED",
}


def marker_plan(state: str) -> tuple[str, tuple[str, ...]]:
    """(marker to write, markers to remove) for a job state."""
    name = MARKER_FOR_STATE[state]
    return name, tuple(m for m in STATE_MARKERS if m != name)


def _is_real_dir(folder: Path) -> bool:
    try:
        return stat.S_ISDIR(folder.lstat().st_mode)
    except OSError:
        return False


def write_marker(folder: Path, state: str, text: str) -> bool:
    """Write the marker for `state`; False when the folder is gone (or no longer a real folder)."""
    folder = Path(folder)
    if not _is_real_dir(folder):
        return False
    name, stale = marker_plan(state)
    try:
        atomic_write_text(folder / name, text if text.endswith("\n") else text + "\n")
    except FileNotFoundError:
        return False  # the folder vanished between the check and the write
    for other in stale:
        path = folder / other
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
        except OSError:
            pass
    return True


def failed_text(reasons: list[str], job_id: str | None) -> str:
    lines = ["lorad could not train this dataset:", ""]
    lines += [f"- {r}" for r in reasons]
    lines += ["", "To retry: fix the files above, then create READY in this folder again"]
    if job_id:
        lines.append(f"(or run: lorad retry {job_id})")
    return "\n".join(lines)
