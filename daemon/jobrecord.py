"""`<state>/jobs/<id>/job.json`: the job's row, kept beside its snapshot and checkpoints.

The jobs table is the source of truth while it exists; this small versioned record lets lorad
rebuild a row when the table is lost (deleted, truncated, corrupt), so a work dir is never
mistaken for garbage. It is written at intake (inside the staging dir, before the rename) and
again when the job finishes or is queued again. Pure to/from-dict functions plus one atomic write.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.states import FINISHED, JobState
from lorad_base.workdir import WorkDir

RECORD_FILE = WorkDir(Path()).record.name
VERSION = 1

# Row columns the record keeps (the table's names), and the ones a usable record must hold.
_KEPT = (
    "id",
    "dataset",
    "dataset_path",
    "name",
    "trigger_word",
    "fingerprint",
    "ready_token",
    "settings",
    "state",
    "attempt",
    "priority",
    "ready_at",
    "created_at",
    "finished_at",
    "error",
    "outputs",
    "step",
    "total_steps",
    "loss",
)
_REQUIRED = ("id", "dataset_path", "name", "state", "created_at", "ready_at")


def record_of(job) -> dict:
    """The record for a job row (a `Job`): JSON columns as objects, `trigger` for trigger_word."""
    record = {"version": VERSION}
    for key in _KEPT:
        value = getattr(job, key)
        record["trigger" if key == "trigger_word" else key] = value
    return record


def new_record(
    *,
    job_id: str,
    dataset_path: Path,
    name: str,
    trigger: str,
    fingerprint: str,
    ready_token: str | None,
    settings: dict,
    priority: int,
    ready_at: float,
    created_at: float,
) -> dict:
    """The record intake writes into the staging dir, before the row exists."""
    return {
        "version": VERSION,
        "id": job_id,
        "dataset": Path(dataset_path).name,
        "dataset_path": str(dataset_path),
        "name": name,
        "trigger": trigger,
        "fingerprint": fingerprint,
        "ready_token": ready_token,
        "settings": settings,
        "state": JobState.QUEUED,
        "attempt": 1,
        "priority": priority,
        "ready_at": ready_at,
        "created_at": created_at,
        "finished_at": None,
        "error": None,
        "outputs": {},
    }


def row_from_record(record: object, job_id: str) -> tuple[dict | None, str | None]:
    """(columns for a rebuilt row, None) or (None, why the record is unusable) (pure).

    A finished job keeps its state (never retrained); anything else becomes `interrupted`, which
    resumes from the newest good checkpoint."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    version = record.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        return None, f"record version {version!r} is not one this lorad reads (1..{VERSION})"
    if record.get("id") != job_id:
        return None, f"the record belongs to job {record.get('id')!r}, not to its folder {job_id!r}"
    missing = [key for key in _REQUIRED if record.get(key) in (None, "")]
    if missing:
        return None, f"fields missing: {', '.join(missing)}"
    state = record["state"] if record["state"] in FINISHED else JobState.INTERRUPTED
    row = {
        "id": job_id,
        "dataset": record.get("dataset") or Path(record["dataset_path"]).name,
        "dataset_path": str(record["dataset_path"]),
        "name": str(record["name"]),
        "trigger_word": str(record.get("trigger") or ""),
        "fingerprint": str(record.get("fingerprint") or ""),
        "ready_token": record.get("ready_token"),
        "settings": json.dumps(record.get("settings") or {}, default=str),
        "state": state,
        "attempt": int(record.get("attempt") or 1),
        "priority": int(record.get("priority") or 0),
        "ready_at": float(record["ready_at"]),
        "created_at": float(record["created_at"]),
        "finished_at": record.get("finished_at") if state in FINISHED else None,
        "error": record.get("error") if state == JobState.FAILED else None,
        "outputs": json.dumps(record.get("outputs") or {}, default=str),
        **_progress(record, finished=state in FINISHED),
    }
    return row, None


def _number(value: object, kind: type) -> int | float | None:
    """A record's progress value as `kind`, or None when absent or not a plain number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def _progress(record: dict, *, finished: bool) -> dict:
    """step / total_steps / loss for a rebuilt row (pure). A finished job keeps the progress it
    ended at (status and the dashboard show it); an unfinished one keeps only its total: its
    step is the checkpoint it resumes from, which the caller reads from the work dir."""
    fields: dict = {}
    total = _number(record.get("total_steps"), int)
    if total is not None:
        fields["total_steps"] = total
    if finished:
        for key, kind in (("step", int), ("loss", float)):
            value = _number(record.get(key), kind)
            if value is not None:
                fields[key] = value
    return fields


def read_record(workdir: Path) -> tuple[dict | None, str | None]:
    """(record, None) or (None, what is wrong): never raises for a missing or broken file."""
    path = WorkDir(Path(workdir)).record
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"no {RECORD_FILE}"
    except (OSError, ValueError) as exc:
        return None, f"{RECORD_FILE} unreadable: {exc}"


def write_record(workdir: Path, record: dict) -> bool:
    """Atomically replace the record; False (nothing written) when the work dir does not exist
    (a job refused at intake has none). OSError (disk full) is the caller's to log."""
    from daemon.fsutil import atomic_write_text

    workdir = Path(workdir)
    if not workdir.is_dir():
        return False
    atomic_write_text(WorkDir(workdir).record, json.dumps(record, indent=2, ensure_ascii=False, default=str))
    return True
