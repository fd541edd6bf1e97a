"""The engine interface: the daemon plans, trains and renders through this and nothing else.

An engine for a DGX (ai-toolkit / diffusers / kohya) or a cloud service implements the same
three calls; the daemon never imports an engine's ML stack (training runs in a child).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol


@dataclass(frozen=True)
class Machine:
    total_gb: float
    available_gb: float
    platform: str  # sys.platform
    apple_silicon: bool


@dataclass(frozen=True)
class JobInput:
    """What an engine needs to know about a job (from the snapshot manifest and the job row)."""

    job_id: str
    name: str
    trigger: str
    model: str
    image_count: int
    max_side: int
    options: dict
    data_dir: Path
    preview_prompt: str


@dataclass
class TrainingPlan:
    engine: str
    model: str
    tier: str
    quantize: int | None
    batch_size: int
    low_ram: bool
    gradient_checkpointing: bool
    max_resolution: int
    cache_limit_gb: float | None
    reason: str
    warnings: list[str] = field(default_factory=list)
    total_steps: int = 0
    config: dict = field(default_factory=dict)  # the engine's own training config
    step_downs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingPlan":
        return cls(**data)


class PlanError(Exception):
    """The job cannot run on this machine (e.g. not enough memory); the message says why."""


@dataclass
class Progress:
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None


@dataclass
class TrainResult:
    status: str  # completed | stopped | failed
    error: str | None = None
    memory_pressure: bool = False
    adapter: Path | None = None
    checkpoint: Path | None = None
    artifacts: dict = field(default_factory=dict)


@dataclass
class RenderResult:
    with_lora: Path
    base: Path
    compare: Path


class StopToken:
    """Why the running job should stop: 'shutdown' (daemon stopping) or 'cancel' (user)."""

    def __init__(self, check_cancel: Callable[[], bool] | None = None, poll_s: float = 1.0):
        self._event = threading.Event()
        self.reason: str | None = None
        self._check_cancel = check_cancel
        self._poll_s = poll_s
        self._last_poll = 0.0

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def requested(self) -> bool:
        if not self._event.is_set() and self._check_cancel is not None:
            now = time.monotonic()
            if now - self._last_poll >= self._poll_s:
                self._last_poll = now
                if self._check_cancel():
                    self.stop("cancel")
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout) or self.requested()


class Engine(Protocol):
    name: str

    def plan(self, job: JobInput, machine: Machine, *, ram_override_gb: float | None = None) -> TrainingPlan: ...

    def step_down(self, plan: TrainingPlan, job: JobInput) -> TrainingPlan | None: ...

    def train(
        self, plan: TrainingPlan, workdir: Path, progress: Callable[[Progress], None], stop: StopToken
    ) -> TrainResult: ...

    def render(self, plan: TrainingPlan, workdir: Path, lora: Path, prompt: str, out_dir: Path) -> RenderResult: ...
