"""The user's view in Finder and `ls`: one state marker at a time in the dataset folder.

`marker_plan` is the pure state machine (job state -> the marker to write and the ones to
remove); `write_marker` does the I/O atomically and never touches READY (the user's) or
anything else in the folder. A dataset folder that is gone is not recreated.
"""

from __future__ import annotations

import stat
from pathlib import Path

from daemon.fsutil import atomic_write_text
from daemon.states import JobState

STATE_MARKERS = ("QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED")

MARKER_FOR_STATE: dict[str, str] = {
    JobState.QUEUED: "QUEUED",
    JobState.INTERRUPTED: "QUEUED",  # it resumes when the daemon runs again
    JobState.PREPARING: "TRAINING",
    JobState.TRAINING: "TRAINING",
    JobState.RENDERING: "TRAINING",
    JobState.PUBLISHING: "TRAINING",
    JobState.DONE: "DONE",
    JobState.FAILED: "FAILED.txt",
    JobState.CANCELLED: "CANCELLED",
}


def marker_plan(state: str) -> tuple[str, tuple[str, ...]]:
    """(marker to write, markers to remove) for a job state."""
    name = MARKER_FOR_STATE[state]
    return name, tuple(m for m in STATE_MARKERS if m != name)


def is_real_dir(folder: Path) -> bool:
    """A folder itself, not a link to one (markers are never written through a link)."""
    try:
        return stat.S_ISDIR(folder.lstat().st_mode)
    except OSError:
        return False


def write_marker(folder: Path, state: str, text: str) -> bool:
    """Write the marker for `state`; False when the folder is gone (or no longer a real folder)."""
    folder = Path(folder)
    if not is_real_dir(folder):
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


# The pipeline's error when a job's work dir lost its snapshot: only a new READY can help.
SNAPSHOT_MISSING = "the job's snapshot is missing"
# What a new READY does, said wherever FAILED.txt tells the user to create one.
_REDROP_DOES = (
    "That takes a new copy of the dataset and trains it from scratch; a LoRA already published "
    "under this name is kept as <name>.v<N>."
)


def failure_kind(error: str, *, refused_at_intake: bool) -> str:
    """What fixes a failure (pure): `dataset` (refused at intake: fix the files, new READY),
    `redrop` (lorad's copy of the dataset is gone: new READY) or `retry` (everything else:
    `lorad retry` goes on from where the job stopped)."""
    if refused_at_intake:
        return "dataset"
    if SNAPSHOT_MISSING in (error or ""):
        return "redrop"
    return "retry"


def failed_footer(kind: str, job_id: str | None) -> list[str]:
    """FAILED.txt's last lines for a failure kind (pure): the one action that fixes it, and what
    that action does. A `retry` footer never says to create READY (that would retrain from
    scratch and keep the LoRA this job already published as a .v<N>)."""
    if kind == "retry" and job_id:
        return [
            f"To retry: run `lorad retry {job_id}` once the cause above is resolved.",
            "It queues this job again with the copy of the dataset lorad already took: training "
            "resumes from its last checkpoint, and a LoRA that is already published only gets "
            "its registry entry written (nothing is trained or rendered again).",
        ]
    if kind == "redrop":
        return [
            "To retry: create READY in this folder again (`lorad retry` cannot help: lorad's copy "
            "of the dataset is gone).",
            _REDROP_DOES,
        ]
    return ["To retry: fix the files above, then create READY in this folder again.", _REDROP_DOES]


def failed_text(reasons: list[str], job_id: str | None, kind: str | None = None) -> str:
    """FAILED.txt: the reasons, then the footer for the failure kind (default: `retry` when
    there is a job to retry, else `dataset`)."""
    lines = ["lorad could not train this dataset:", ""]
    lines += [f"- {r}" for r in reasons]
    lines += ["", *failed_footer(kind or ("retry" if job_id else "dataset"), job_id)]
    return "\n".join(lines)


def unchanged_text(job_id: str, name: str, finished: str, lora: Path | None, loras_dir: Path) -> str:
    """DONE for a re-dropped dataset that was not retrained (pure): which job trained it and
    where its LoRA is *now* (a later LoRA of the same name moves it to `<name>.v<N>`)."""
    lines = [
        f"job {job_id} ({name}) unchanged, already trained by job {job_id} (finished at {finished})",
        "Not trained again: add force = true to READY to retrain it.",
        "",
    ]
    if lora is None:
        lines.append(f"its LoRA is no longer in {loras_dir} (moved or deleted)")
        return "\n".join(lines) + "\n"
    stem = lora.name[: -len(".safetensors")]
    lines.append(f"lora: {lora}")
    for label, suffix in (("render", ".png"), ("compare", ".compare.png")):
        if (lora.parent / f"{stem}{suffix}").is_file():
            lines.append(f"{label}: {lora.parent / (stem + suffix)}")
    return "\n".join(lines) + "\n"


def _first_line(path: Path, limit: int = 256) -> str:
    """The start of a marker file, read only when it is a small regular file (never a FIFO)."""
    import os

    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            return ""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            return os.read(fd, limit).decode("utf-8", "replace").split("\n", 1)[0]
        finally:
            os.close(fd)
    except OSError:
        return ""


def names_job(line: str, job_id: str) -> bool:
    """Does a marker's first line belong to this job? (pure; marker texts start "job <id> ")."""
    return line == f"job {job_id}" or line.startswith(f"job {job_id} ")


def folders_marked_with(root: Path, job_id: str) -> list[Path]:
    """Dataset folders under root whose state marker names this job: where a folder renamed
    while its job ran went (its marker moved with it)."""
    found = []
    try:
        entries = sorted(Path(root).iterdir())
    except OSError:
        return []
    for folder in entries:
        if not is_real_dir(folder):
            continue
        if any(names_job(_first_line(folder / m), job_id) for m in STATE_MARKERS):
            found.append(folder)
    return found
