"""The layout of one job's work dir (`<state>/jobs/<id>/`), spelled once.

Intake writes the snapshot (`data/`, `manifest.json`); the runner writes the plan, the progress
series and the metrics; the engine writes its checkpoints, adapter and logs; the render lands in
`render/`; `job.json` is the job's record for a rebuilt jobs table. Every module that reads or
writes one of these goes through `WorkDir` instead of a string literal, so a renamed file is one
edit here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    """Paths inside one job's work dir (nothing here touches the disk)."""

    root: Path

    @classmethod
    def of(cls, jobs_dir: Path, job_id: str) -> WorkDir:
        return cls(Path(jobs_dir) / job_id)

    @property
    def data(self) -> Path:
        """The snapshot of the user's images and captions (the engine's training set)."""
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        """What intake snapshotted (names, sizes, hashes): the proof the snapshot is whole."""
        return self.root / "manifest.json"

    @property
    def captions_list(self) -> Path:
        return self.root / "captions.jsonl"

    @property
    def plan(self) -> Path:
        """The training plan, written once: a resumed job keeps its plan."""
        return self.root / "plan.json"

    @property
    def progress(self) -> Path:
        """One JSON line per reported step (the dashboard's loss chart)."""
        return self.root / "progress.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def render(self) -> Path:
        """The test render's folder (base, with-LoRA and comparison images)."""
        return self.root / "render"

    @property
    def render_log(self) -> Path:
        return self.root / "render.log"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def caption_log(self) -> Path:
        """The captioner child's log (missing_captions = "vlm")."""
        return self.root / "caption.log"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def adapter(self) -> Path:
        """The engine's raw adapter before it is stamped and published."""
        return self.root / "adapter.safetensors"

    @property
    def record(self) -> Path:
        """The job's own record (rebuilds jobs.db after a loss)."""
        return self.root / "job.json"

    @property
    def readme(self) -> Path:
        return self.root / "README.md"

    def lora(self, name: str) -> Path:
        """The stamped adapter under the LoRA's published name."""
        return self.root / f"{name}.safetensors"
