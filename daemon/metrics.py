"""Did this LoRA learn? The learning figures of a finished job and the verdicts on them.

`learning_metrics` (pure) turns the job's loss series (progress.jsonl: one `{"step", "loss"}`
line per training step, any engine) and `lora_effect` (how much the LoRA changes the test
render) into the `metrics` object that goes into `<name>.report/metrics.json`, the DONE marker,
`lorad status --json`, the `job.done` event, the notification and the dashboard.

How the figures are made, so one noisy step never decides:
- `loss_start` / `loss_end`: a trimmed mean (the highest and lowest TRIM_FRACTION of the values
  dropped) over the first / last WINDOW_FRACTION of the logged steps.
- `loss_curve`: at most CURVE_POINTS `[step, loss]` points, each the mean of one equal slice of
  the series (a moving average that also thins a 3000-step run to a chart's worth).
- `lora_effect`: the mean absolute difference of the base and LoRA renders (same seed, prompt
  and size), per channel, scaled to 0-1 (render_difference, the only I/O here).

The verdicts are heuristics, chosen from measurements on the miniature model (`tiny-z-image`,
8 flat red images, 120 steps; see docs/RELIABILITY.md "Learning verdicts"): a learning run
(learning_rate 1e-3) against a vanishing one (1e-8). Real diffusion losses are often flat while
the LoRA does learn, so a flat loss alone is no warning; the main verdict rests on lora_effect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

WINDOW_FRACTION = 0.25  # loss_start / loss_end: the first / last quarter of the logged steps
TRIM_FRACTION = 0.2  # the highest and lowest 20% of a window's values are left out of its mean
CURVE_POINTS = 30  # the chart's smoothed line: ~5 raw points a slice on a 120-step run
# Measured on tiny-z-image (see the module docstring): a learning run moved the render by
# ~0.06-0.2, a vanishing learning rate by < 0.001. 0.01 sits well between the two.
EFFECT_MIN = 0.01
# "The loss rose" only when the end window's mean is this much above the start window's:
# a flat run's two windows differ by a few percent on noise alone.
ROSE_FRACTION = 0.10

BARELY_CHANGES = "the LoRA barely changes the picture (train longer or raise the learning rate)"
LOSS_ROSE = "the loss rose (lower the learning rate, or check the captions and images)"

METRIC_KEYS = ("steps", "loss_start", "loss_end", "loss_curve", "lora_effect", "warnings")


def loss_points(records: Iterable[object]) -> list[tuple[int, float]]:
    """(step, loss) pairs, one per step (a resumed run's repeated steps: the last one wins),
    in step order; records without a finite loss are skipped (pure)."""
    by_step: dict[int, float] = {}
    for record in records:
        if not isinstance(record, dict):
            continue
        step, loss = record.get("step"), record.get("loss")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        by_step[step] = float(loss)
    return sorted(by_step.items())


def trimmed_mean(values: Sequence[float], trim: float = TRIM_FRACTION) -> float:
    """The mean without the highest and lowest `trim` share of the values (pure)."""
    ordered = sorted(values)
    cut = int(len(ordered) * trim)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


def window_means(points: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """(loss_start, loss_end): trimmed means over the first and last WINDOW_FRACTION (pure)."""
    if not points:
        return None, None
    size = max(1, math.ceil(len(points) * WINDOW_FRACTION))
    losses = [loss for _, loss in points]
    return trimmed_mean(losses[:size]), trimmed_mean(losses[-size:])


def smooth_curve(points: Sequence[tuple[int, float]], max_points: int = CURVE_POINTS) -> list[list[float]]:
    """At most max_points `[step, loss]`, each the mean of one equal, consecutive slice (pure)."""
    if not points:
        return []
    slices = min(max_points, len(points))
    curve = []
    for i in range(slices):
        chunk = points[i * len(points) // slices : (i + 1) * len(points) // slices]
        step = sum(s for s, _ in chunk) / len(chunk)
        loss = sum(v for _, v in chunk) / len(chunk)
        curve.append([round(step, 1), round(loss, 6)])
    return curve


def verdicts(loss_start: float | None, loss_end: float | None, lora_effect: float | None) -> list[str]:
    """The learning warnings, as plain sentences with what to do; none for a run that learned (pure)."""
    warnings = []
    if lora_effect is not None and lora_effect < EFFECT_MIN:
        warnings.append(BARELY_CHANGES)
    if loss_start is not None and loss_end is not None and loss_end > loss_start * (1 + ROSE_FRACTION):
        warnings.append(LOSS_ROSE)
    return warnings


def learning_metrics(records: Iterable[object], *, steps: int | None, lora_effect: float | None) -> dict:
    """The `metrics` object of a finished job (pure)."""
    points = loss_points(records)
    start, end = window_means(points)
    return {
        "steps": steps if steps is not None else (points[-1][0] if points else None),
        "loss_start": None if start is None else round(start, 6),
        "loss_end": None if end is None else round(end, 6),
        "loss_curve": smooth_curve(points),
        "lora_effect": None if lora_effect is None else round(lora_effect, 6),
        "warnings": verdicts(start, end, lora_effect),
    }


def summary_line(metrics: dict | None) -> str:
    """ "loss 0.42 → 0.31, LoRA effect 0.083" for the marker, notification and dashboard (pure)."""
    if not metrics:
        return ""
    parts = []
    if metrics.get("loss_start") is not None and metrics.get("loss_end") is not None:
        parts.append(f"loss {metrics['loss_start']:.3g} → {metrics['loss_end']:.3g}")
    if metrics.get("lora_effect") is not None:
        parts.append(f"LoRA effect {metrics['lora_effect']:.3f}")
    return ", ".join(parts)


# -- I/O at the edges ------------------------------------------------------------------------


def read_series(path: Path) -> list[object]:
    """The JSON lines of progress.jsonl; a torn or foreign line is skipped (the curve is a view)."""
    records: list[object] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def render_difference(base: Path, lora: Path) -> float | None:
    """Mean absolute per-channel difference of two renders, 0-1; None when one cannot be read
    or they differ in size (then there is nothing to compare)."""
    from PIL import Image, ImageChops, ImageStat

    try:
        with Image.open(base) as a, Image.open(lora) as b:
            left, right = a.convert("RGB"), b.convert("RGB")
    except (OSError, ValueError):
        return None
    if left.size != right.size:
        return None
    means = ImageStat.Stat(ImageChops.difference(left, right)).mean
    return sum(means) / len(means) / 255.0
