"""Where a cloud training is, read from its log lines (pure): the newest step and loss."""

from __future__ import annotations

import re

_STEP_PATTERNS = (
    re.compile(r"(?i)\bstep\D{0,3}(\d+)\s*(?:/|of)\s*(\d+)"),
    re.compile(r"(\d+)\s*/\s*(\d+)\s*\["),  # tqdm: " 120/1000 [00:10<...]"
)


_LOSS_PATTERN = re.compile(r"(?i)\bloss\b\s*[=:]?\s*([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)")


def loss_from_logs(logs: list[dict]) -> float | None:
    """The newest training loss the logs mention ("loss: 0.42", "loss=4.2e-1"), for the learning
    metrics (pure); None when none does."""
    for entry in reversed(logs):
        message = str(entry.get("message", "")) if isinstance(entry, dict) else str(entry)
        found = _LOSS_PATTERN.findall(message)
        if found:
            return float(found[-1])
    return None


def step_from_logs(logs: list[dict], total: int) -> int | None:
    """The newest training step the logs mention (pure); None when none does."""
    for entry in reversed(logs):
        message = str(entry.get("message", "")) if isinstance(entry, dict) else str(entry)
        for pattern in _STEP_PATTERNS:
            found = pattern.findall(message)
            if found:
                step, of = (int(x) for x in found[-1])
                if of > 0:
                    return min(total, round(step * total / of)) if of != total else min(step, total)
    return None
