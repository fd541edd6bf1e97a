"""`lorad status`: the jobs table as a table (or JSON). Pure over a list of jobs."""

from __future__ import annotations

from daemon.jobs import FINISHED
from daemon.states import JobState


def bar(step: int | None, total: int | None, width: int = 12) -> str:
    if not total:
        return " " * (width + 2)
    done = int(width * min(step or 0, total) / total)
    return "[" + "#" * done + "." * (width - done) + "]"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def eta_now(job, now: float) -> float | None:
    """Seconds left for a training job: the engine's last estimate, aged by the time since it came
    (during a long step the estimate would otherwise stand still). None when unknown."""
    if job.state != JobState.TRAINING or job.eta_s is None:
        return None
    return max(0.0, job.eta_s - max(0.0, now - job.updated_at))


MORE_ERRORS = "lorad status --json or FAILED.txt"


def error_lines(error: str, indent: str, width: int = 100) -> list[str]:
    """The first error in whole words (at most three lines), and how many more there are."""
    import textwrap

    reasons = [line for line in error.splitlines() if line.strip()] or [error]
    lines = textwrap.wrap(reasons[0], width=width, max_lines=3, placeholder=" …", break_long_words=False)
    lines = [f"{indent}{'error: ' if i == 0 else '       '}{text}" for i, text in enumerate(lines)]
    if len(reasons) > 1:
        lines.append(f"{indent}       (+{len(reasons) - 1} more: {MORE_ERRORS})")
    return lines


def _wrapped(text: str, indent: str, width: int = 100) -> list[str]:
    """Every word of a notice (it holds a command to copy), wrapped under the job's row."""
    import textwrap

    return [indent + line for line in textwrap.wrap(text, width=width, break_long_words=False)]


def remote_lines(job, indent: str) -> list[str]:
    """Scale-out: the worker a running job is on, or why a queued job waits (no worker fits)."""
    worker, waiting = getattr(job, "worker", None), getattr(job, "waiting", None)
    if worker and job.state in (JobState.PREPARING, JobState.TRAINING, JobState.RENDERING):
        return [f"{indent}on worker {worker}"]
    if waiting and job.state in (JobState.QUEUED, JobState.INTERRUPTED):
        return [f"{indent}{waiting}"]
    return []


def visible(jobs: list, *, show_all: bool, now: float) -> list:
    if show_all:
        return jobs
    return [j for j in jobs if j.state not in FINISHED or (now - (j.finished_at or j.updated_at)) < 86400]


def _json_row(job) -> dict:
    """A job for `status --json`; a done job's learning metrics also as top-level `metrics`."""
    row = job.to_dict()
    outputs = row.get("outputs")
    if isinstance(outputs, dict) and isinstance(outputs.get("metrics"), dict):
        row["metrics"] = outputs["metrics"]
    return row


def render_status(
    jobs: list,
    *,
    show_all: bool,
    as_json: bool,
    daemon_pid: int | None,
    now: float,
    daemon: dict | None = None,
) -> str:
    """`daemon`: what the running daemon trains with ({"model", "model_source"}), for the JSON."""
    shown = visible(jobs, show_all=show_all, now=now)
    if as_json:
        import json

        return json.dumps(
            {
                "daemon_pid": daemon_pid,
                **({"daemon": daemon} if daemon else {}),
                "jobs": [_json_row(j) for j in shown],
            },
            indent=2,
            default=str,
            ensure_ascii=False,
        )
    lines = [f"daemon: {'running (pid ' + str(daemon_pid) + ')' if daemon_pid else 'not running'}"]
    if not shown:
        lines.append("no jobs" + ("" if show_all else " in the last day (--all shows older ones)"))
        return "\n".join(lines)
    lines.append(f"{'JOB':<22} {'DATASET':<24} {'STATE':<11} {'PROGRESS':<24} {'ETA':>7} {'AGE':>7}")
    for job in shown:
        progress = bar(job.step, job.total_steps)
        if job.total_steps:
            progress += f" {job.step or 0}/{job.total_steps}"
        left = eta_now(job, now)
        eta = duration(left) if left is not None else "-"
        dataset = job.dataset if len(job.dataset) <= 24 else job.dataset[:23] + "…"
        lines.append(
            f"{job.id:<22} {dataset:<24} {job.state:<11} {progress:<24} {eta:>7} {duration(now - job.created_at):>7}"
        )
        if job.state == JobState.FAILED and job.error:
            lines += error_lines(job.error, f"{'':<22} ")
        elif job.state not in FINISHED and getattr(job, "note", None):
            lines.append(f"{'':<22} {job.note}")
        elif job.state == JobState.QUEUED and job.settings.get("weights_missing"):
            lines += _wrapped("cannot train here yet: " + str(job.settings["weights_missing"]), f"{'':<22} ")
        lines += remote_lines(job, f"{'':<22} ")
    return "\n".join(lines)
