"""What a user can do to a job: cancel it, retry it, write READY into its folder.

`lorad cancel|retry|enqueue` (daemon/commands.py) and the dashboard's buttons (daemon/ui/app.py)
both call these; neither surface owns them (tests/unit/test_layers.py: the dashboard importing the CLI
closed an import circle through the daemon). Each returns (exit code, what to say) or raises
UsageError with a message for the user.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemon.settings import Settings
from daemon.states import JobState
from lorad_base.workdir import WorkDir


class UsageError(Exception):
    pass


def _wake_daemon(settings: Settings) -> int | None:
    from daemon.lock import running_daemon_pid

    pid = running_daemon_pid(settings.state)
    if pid:
        import signal

        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
    return pid


def write_ready(folder: Path, options: dict) -> str:
    """Write READY with these options into a dataset folder (the user's own drop, done for them):
    `lorad enqueue` and the dashboard's "re-train with force" both come here. Returns what to say."""
    from daemon.fsutil import atomic_write_text
    from daemon.intake.options import parse_options, render_ready

    text = render_ready(options)
    _, problems = parse_options(text, "READY", allow_force=True)
    if problems:
        raise UsageError("; ".join(p.message for p in problems))
    atomic_write_text(folder / "READY", text)
    return f"READY written to {folder / 'READY'}" + (
        f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
    )


def cancel_job(settings: Settings, store, job) -> tuple[int, str]:
    """(exit code, what to say) of cancelling `job`; `lorad cancel` and the dashboard both call it.

    Decided in one transaction against the job's state at that moment, so a cancel that
    says so is honoured: a running job stops at its next step or phase boundary and publishes
    nothing. A job already publishing is too late to cancel (non-zero exit)."""
    action, job = store.cancel(job.id)
    if action == "finished":
        return 1, f"job {job.id} is already {job.state}; nothing to cancel"
    if action == "too_late":
        return 1, (
            f"too late, job {job.id} ({job.name}) is publishing its LoRA; it will be done in a moment "
            f"(remove the LoRA from {settings.loras} afterwards if you do not want it)"
        )
    if action == "cancel":
        if job.remote.get("request_id"):  # its cloud request may still run (and bill)
            return 0, (
                f"cancelled {job.id} ({job.name}); its request on the cloud runs on until lorad next "
                f"starts, and is cancelled there then"
            )
        return 0, f"cancelled {job.id} ({job.name})"
    from engines.base import CANCEL_OUTCOME_FILE

    workdir = WorkDir.of(settings.jobs_dir, job.id).root
    (workdir / CANCEL_OUTCOME_FILE).unlink(missing_ok=True)  # only this cancel's outcome counts
    pid = _wake_daemon(settings)
    said = f"cancelling {job.id} ({job.name}, {job.state}): it stops at its next step and publishes nothing"
    if not pid:
        cloud = (
            "; its request on the cloud runs on until then, and is cancelled there then"
            if job.remote.get("request_id")
            else ""
        )
        return 0, said + f"; lorad is not running, so it is cancelled when lorad next starts{cloud}"
    if job.remote.get("request_id"):
        said += "; " + _cloud_cancel_outcome(settings, job, workdir)
    return 0, said


def _cloud_cancel_outcome(settings: Settings, job, workdir: Path) -> str:
    """A cloud job: wait (bounded by the engine's cancel_wait_s) for what the cloud did with the
    cancel, and say it: stopped, finished anyway (paid; retry publishes it), or still pending."""
    import time

    from daemon.engine_host import make_engine
    from engines.base import CANCEL_WORDS, read_cancel_outcome

    try:
        wait_s = float(getattr(make_engine(settings, job.settings.get("engine")), "cancel_wait_s", 60.0))
    except Exception:
        wait_s = 60.0
    deadline = time.monotonic() + wait_s + 10  # the daemon's own wait, and its next tick
    while time.monotonic() < deadline:
        outcome = read_cancel_outcome(workdir)
        if outcome:
            return CANCEL_WORDS[outcome].replace("JOB", job.id)
        time.sleep(0.2)
    return CANCEL_WORDS["still_pending"].replace("JOB", job.id)


def retry_lost_message(job_id: str, current: str | None) -> str:
    """What a `lorad retry` that lost its race to another process tells the user (pure)."""
    if current == JobState.QUEUED:
        return f"job {job_id} was already queued again by another retry; nothing to do"
    if current in (JobState.PREPARING, JobState.TRAINING, JobState.RENDERING, JobState.PUBLISHING):
        return f"job {job_id} is already running again ({current}), queued by another retry"
    if current is None:
        return f"job {job_id} changed while this retry ran; run lorad status and try again"
    return f"job {job_id} became {current} while this retry ran; nothing done (lorad status shows it)"


def retry_job(settings: Settings, store, job, resubmit: bool = False) -> tuple[int, str]:
    """(exit code, what to say) of queueing `job` again; `lorad retry` and the dashboard both
    call it. UsageError when the job cannot be retried (its state, or refused at intake, or a
    cloud submission whose outcome is unknown, unless `resubmit`: paying again is explicit)."""
    from daemon.jobs import StateChanged
    from daemon.queue import Queue
    from engines.base import allow_resubmit, submission_uncertain

    if job.state not in (JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED):
        raise UsageError(
            f"job {job.id} is {job.state}; only failed, cancelled or interrupted jobs can be retried"
        )
    if job.settings.get("workdir_pruned"):
        raise UsageError(
            f"job {job.id}'s work dir was pruned (keep_workdirs_days); create READY in "
            f"{job.dataset_path} again to train it (or: lorad enqueue '{job.dataset_path}')"
        )
    if job.settings.get("intake") == "refused":
        raise UsageError(
            f"{job.dataset} was refused at intake ({job.dataset_path}/FAILED.txt says why); "
            f"fix it, then create READY again (or: lorad enqueue '{job.dataset_path}')"
        )
    workdir = WorkDir.of(settings.jobs_dir, job.id).root
    if submission_uncertain(workdir) and not resubmit:
        raise UsageError(
            f"job {job.id}: submission uncertain: its cloud training request may have been accepted and "
            f"billed (check the {job.settings.get('engine') or 'cloud'} dashboard). lorad retry {job.id} --resubmit "
            f"sends a new paid request"
        )
    if resubmit and submission_uncertain(workdir):
        allow_resubmit(workdir)
    try:  # compare-and-set: only the retry that finds the job still in the state read above wins
        job = store.transition(job.id, JobState.QUEUED, expect=job.state, attempt=job.attempt + 1, error=None)
    except StateChanged as exc:
        return 1, retry_lost_message(job.id, exc.current)
    if not settings.scale_out:  # with a Redis queue the coordinator dispatches from the table
        Queue(settings.queue_db).enqueue(job.id, job.priority, job.ready_at)
    pid = _wake_daemon(settings)
    return 0, f"queued {job.id} again (attempt {job.attempt})" + ("" if pid else "; it runs when lorad runs")
