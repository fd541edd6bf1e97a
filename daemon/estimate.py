"""How long a plan will train: seconds per step recorded from finished jobs on this machine (same
model, tier and backend), else a derived rough figure; `lorad plan` says which (pure but for
reading the jobs' loss series, progress.jsonl, which retention keeps)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from daemon.states import JobState
from lorad_base.workdir import WorkDir

# Rough seconds per training step at 1024 px, batch 1, for a full-size model (z-image-turbo
# class), by backend; the miniature model is far cheaper. Only used with no recorded job.
DERIVED_S_PER_STEP = {"metal": 8.0, "cuda": 2.0, "cpu": 120.0}
TINY_S_PER_STEP = 0.5
RECENT = 5  # the newest this many matching jobs are averaged (median)


def series_rate(points: list[dict]) -> float | None:
    """Seconds per step from a job's loss series [{"step", "t"}, ...] (pure); None when it does
    not span two steps."""
    usable = [p for p in points if isinstance(p.get("step"), int) and isinstance(p.get("t"), (int, float))]
    if len(usable) < 2:
        return None
    first, last = usable[0], usable[-1]
    steps = last["step"] - first["step"]
    return (last["t"] - first["t"]) / steps if steps > 0 and last["t"] > first["t"] else None


def _read_series(path: Path) -> list[dict]:
    points = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                point = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(point, dict):
                points.append(point)
    except OSError:
        return []
    return points


def recorded_rate(
    jobs: list, jobs_dir: Path, *, model: str, tier: str, backend: str
) -> tuple[float, int] | None:
    """(median seconds per step, how many jobs) of the newest done jobs that trained this model
    at this tier on this backend here; None when there is none."""
    rates = []
    for job in sorted(jobs, key=lambda j: j.finished_at or 0, reverse=True):
        plan = job.plan if isinstance(job.plan, dict) else {}
        if job.state != JobState.DONE or (plan.get("model"), plan.get("tier"), plan.get("backend")) != (
            model,
            tier,
            backend,
        ):
            continue
        rate = series_rate(_read_series(WorkDir.of(jobs_dir, job.id).progress))
        if rate is not None:
            rates.append(rate)
        if len(rates) >= RECENT:
            break
    return (statistics.median(rates), len(rates)) if rates else None


def derived_rate(model: str, backend: str, resolution: int | None, batch: int | None) -> float:
    """A rough seconds per step from the backend and the plan's size (pure)."""
    if model.startswith("tiny"):
        return TINY_S_PER_STEP
    base = DERIVED_S_PER_STEP.get(backend, DERIVED_S_PER_STEP["cpu"])
    scale = ((resolution or 1024) / 1024) ** 2 * max(1, batch or 1)
    return base * scale


def estimate(plan, jobs: list, jobs_dir: Path) -> tuple[float, str, str]:
    """(seconds, "recorded" | "derived", the words saying where the figure comes from)."""
    recorded = recorded_rate(jobs, jobs_dir, model=plan.model, tier=plan.tier, backend=plan.backend)
    if recorded is not None:
        rate, count = recorded
        return (rate * plan.total_steps, "recorded",
                f"{rate:.1f} s/step recorded from {count} finished job(s) of {plan.model}, {plan.tier}, "
                f"{plan.backend} on this machine")  # fmt: skip
    config = plan.config if isinstance(plan.config, dict) else {}
    raw_loop = config.get("training_loop")
    loop: dict = raw_loop if isinstance(raw_loop, dict) else {}
    batch = config.get("batch_size") or loop.get("batch_size")
    rate = derived_rate(plan.model, plan.backend, config.get("max_resolution"), batch)
    return (rate * plan.total_steps, "derived",
            f"~{rate:.1f} s/step derived for {plan.backend} (no finished job of {plan.model}, {plan.tier}, "
            f"{plan.backend} here yet: a rough figure)")  # fmt: skip
