"""Retention: the job list and the work dirs do not grow without end (`keep_jobs`,
`keep_workdirs_days`, `lorad prune [--dry-run]`, and the daemon once an hour).

What is decided (pure, `decide`): finished jobs beyond the newest `keep_jobs` are pruned (their
rows stay, hidden, with the fingerprints that make an unchanged re-drop "unchanged"; their work
dirs go); a finished job older than `keep_workdirs_days` keeps only what the dashboard shows
(renders, loss series, plan, record). Never touched: a queued, running or interrupted job, anything
outside the state dir's jobs folder (so nothing in assets/loras), and a cloud request record of a
job that is not done (the request may still be running, and paid for).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.jobs import FINISHED
from daemon.states import JobState
from lorad_base.workdir import WorkDir

# What a trimmed work dir keeps: what the dashboard shows, and the record a rebuild reads.
_LAYOUT = WorkDir(Path())
DASHBOARD_KEEPS = frozenset(
    p.name for p in (_LAYOUT.record, _LAYOUT.progress, _LAYOUT.render, _LAYOUT.plan, _LAYOUT.manifest)
)
# A cloud engine's request record (engines/fal: fal/request.json): kept while it may still run.
CLOUD_RECORDS = (Path("fal") / "request.json",)
DAY_S = 86400.0
# The daemon prunes at start and then at most this often.
INTERVAL_S = 3600.0


@dataclass
class Action:
    job_id: str
    kind: str  # "drop": beyond keep_jobs (row hidden, work dir removed) | "trim": old work dir
    reason: str
    paths: list[Path] = field(default_factory=list)
    bytes: int = 0


def finished_at(job) -> float:
    return float(job.finished_at or job.updated_at or 0.0)


def decide(jobs: list, *, now: float, keep_jobs: int, keep_days: float) -> list[tuple[str, str, str]]:
    """(job id, "drop" | "trim", reason) for each job retention acts on (pure)."""
    finished = [j for j in jobs if j.state in FINISHED and not j.settings.get("pruned")]
    finished.sort(key=finished_at, reverse=True)
    decided = []
    for job in finished[keep_jobs:]:
        decided.append((job.id, "drop", f"beyond the newest {keep_jobs} finished jobs (keep_jobs)"))
    for job in finished[:keep_jobs]:
        age_days = (now - finished_at(job)) / DAY_S
        if age_days > keep_days and not job.settings.get("workdir_pruned"):
            decided.append(
                (job.id, "trim", f"{job.state} {age_days:.0f} days ago (keep_workdirs_days = {keep_days:g})")
            )
    return decided


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def removals(workdir: Path, kind: str, state: str) -> list[Path]:
    """The entries of a work dir to remove (a trimmed dir keeps what the dashboard shows; a
    cloud request record of a job not done is always kept, with the record that names it)."""
    keep_records = state != JobState.DONE and any((workdir / r).is_file() for r in CLOUD_RECORDS)
    keep = set(DASHBOARD_KEEPS) if kind == "trim" else ({_LAYOUT.record.name} if keep_records else set())
    if kind == "drop" and not keep_records:
        return [workdir] if workdir.is_dir() else []
    found = []
    try:
        entries = sorted(workdir.iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name in keep:
            continue
        records = [r for r in CLOUD_RECORDS if r.parts[0] == entry.name]
        if records and keep_records:  # inside the cloud folder: all but the records
            found += [p for p in sorted(entry.iterdir()) if all(p != workdir / r for r in records)]
            continue
        found.append(entry)
    return found


def _inside(path: Path, folder: Path) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real != root and real.startswith(root + os.sep)


def plan_actions(settings, store, now: float | None = None) -> list[Action]:
    """What a prune would do now, with the paths and bytes it would free."""
    now = time.time() if now is None else now
    jobs = {j.id: j for j in store.list(include_pruned=True)}
    actions = []
    for job_id, kind, reason in decide(
        list(jobs.values()), now=now, keep_jobs=settings.keep_jobs, keep_days=settings.keep_workdirs_days
    ):
        workdir = WorkDir.of(settings.jobs_dir, job_id).root
        paths = [p for p in removals(workdir, kind, jobs[job_id].state) if _inside(p, settings.jobs_dir)]
        if workdir.is_symlink():
            paths = []  # not lorad's own folder: left alone
        actions.append(Action(job_id, kind, reason, paths, sum(_size(p) for p in paths)))
    return actions


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def apply(settings, store, actions: list[Action], log=None) -> int:
    """Remove what the actions list and record it on the rows; returns the bytes freed."""
    freed = 0
    for action in actions:
        job = store.get(action.job_id)
        if job is None or job.state not in FINISHED:
            continue  # retried since the plan was made: not ours to touch any more
        flags = {"workdir_pruned": True, **({"pruned": True} if action.kind == "drop" else {})}
        if not store.mark_pruned(job.id, job.state, {**job.settings, **flags}):
            continue  # retried this very moment: its work dir is needed again
        for path in action.paths:
            _remove(path)
        freed += action.bytes
        if action.kind == "trim":
            store.write_record(store.get(job.id))  # the trimmed dir's record says so too
        if log is not None:
            log.info("job.pruned", job_id=job.id, kind=action.kind, reason=action.reason, bytes=action.bytes)
    return freed


def prune(settings, store, *, log=None, now: float | None = None) -> tuple[list[Action], int]:
    actions = plan_actions(settings, store, now)
    return actions, apply(settings, store, actions, log)
