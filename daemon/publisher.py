"""One publisher for every mode (issue 21): stamp the adapter, publish it, complete the registry.

The local pipeline publishes what it trained; the coordinator publishes what a worker delivered
and it verified. Both go through `Publisher`, so the provenance header, the report (captions,
learning metrics), the `.v<N>` bookkeeping of older jobs and the registry-only retry are written
once. The file-level steps (prepare, commit, register) are daemon/publish.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon import registry
from daemon.fsutil import atomic_write_text
from daemon.jobs import Job, JobStore
from daemon.logs import get_logger
from daemon.metrics import learning_metrics, read_series, render_difference
from daemon.publish import (
    complete_registry,
    moved_outputs,
    provenance,
    publish,
    published_by,
    spelling_on_disk,
    version_owners,
    write_with_metadata,
)
from daemon.settings import Settings
from daemon.states import JobState
from engines.base import Engine, RenderResult, TrainingPlan
from lorad_base.workdir import WorkDir


def stamp_adapter(
    engine: Engine, job: Job, plan: TrainingPlan, adapter: Path, lora_file: Path, image_count: int
) -> None:
    """The trained adapter with lorad's provenance header and the engine's metadata keys."""
    write_with_metadata(
        adapter,
        lora_file,
        provenance(
            job=job,
            plan=plan.to_dict(),
            fingerprint=job.fingerprint,
            image_count=image_count,
            engine_keys=engine.adapter_metadata(plan),
        ),
    )


def write_metrics(workdir: Path, plan: TrainingPlan, rendered: RenderResult) -> Path:
    """metrics.json in the work dir: the loss series (progress.jsonl) and the renders' difference."""
    wd = WorkDir(Path(workdir))
    effect = None
    if Path(rendered.base) != Path(rendered.with_lora):  # a render without its base: no effect to measure
        effect = render_difference(Path(rendered.base), Path(rendered.with_lora))
    metrics = learning_metrics(read_series(wd.progress), steps=plan.total_steps, lora_effect=effect)
    atomic_write_text(wd.metrics, json.dumps(metrics, indent=2))
    return wd.metrics


def publish_job(
    settings: Settings,
    job: Job,
    plan: TrainingPlan,
    lora_file: Path,
    rendered: RenderResult,
    report_files: list[Path],
    store: JobStore | None = None,
) -> dict:
    """The normal publish path (daemon/publish.py) for a job trained here or on a worker. The
    snapshot's captions.jsonl (each image's caption and its source) joins the report, and the
    learning metrics (daemon/metrics.py) go into it as metrics.json; with `store`, older jobs
    whose LoRA just moved to `<name>.v<N>` are told (follow_versions)."""
    wd = WorkDir.of(settings.jobs_dir, job.id)
    captions = wd.captions_list
    if captions.is_file() and all(p.name != captions.name for p in report_files):
        report_files = [*report_files, captions]
    metrics_file = write_metrics(wd.root, plan, rendered)
    outputs = publish(
        loras=settings.loras,
        registry_path=settings.registry,
        job=job,
        lora_file=lora_file,
        render_with=rendered.with_lora,
        render_compare=rendered.compare,
        report_files=[*report_files, metrics_file],
        plan=plan.to_dict(),
        lock_timeout_s=settings.lock_timeout_s,
    )
    if store is not None:
        follow_versions(settings, store, job.name)
    return outputs


def follow_versions(settings: Settings, store: JobStore, name: str) -> list[str]:
    """Rewrite the outputs (row, job.json, DONE) of every done job whose LoRA now lives under
    `<name>.v<N>` (read from the files' headers, so a crash mid-way is caught by the next
    publish); returns their ids. Best effort: the LoRA files themselves are already right."""
    owners = version_owners(settings.loras, name)
    if not owners:
        return []
    try:
        entries = registry.load(settings.registry).get("loras") or {}
    except registry.RegistryError:
        entries = {}
    keys = {v.get("job_id"): k for k, v in entries.items() if isinstance(v, dict)}
    moved = []
    for job_id, stem in owners.items():
        job = store.get(job_id)
        if job is None or job.state != JobState.DONE:
            continue
        outputs = moved_outputs(job.outputs, settings.loras, stem, keys.get(job_id))
        if outputs is not None:
            store.move_outputs(job_id, outputs)
            moved.append(job_id)
    return moved


class Publisher:
    """Stamp, publish, registry: what both the local pipeline and the coordinator do with a
    finished adapter. PublishError (daemon/publish.py) says why a step failed."""

    def __init__(self, settings: Settings, store: JobStore | None = None):
        self.settings, self.store = settings, store

    def already_published(self, job: Job) -> bool:
        """The LoRA on disk is this job's (its header says so): only the registry may be missing."""
        return published_by(self.settings.loras, job)

    def stamp(self, engine: Engine, job: Job, plan: TrainingPlan, adapter: Path, image_count: int) -> Path:
        """The adapter stamped with its provenance as `<work>/<name>.safetensors`; returns that path."""
        lora_file = WorkDir.of(self.settings.jobs_dir, job.id).lora(job.name)
        stamp_adapter(engine, job, plan, adapter, lora_file, image_count)
        return lora_file

    def publish(
        self, job: Job, plan: TrainingPlan, lora_file: Path, rendered: RenderResult, report: list[Path]
    ) -> dict:
        """The LoRA, its renders and report into the loras folder and the registry; the outputs."""
        return publish_job(self.settings, job, plan, lora_file, rendered, report, self.store)

    def registry_only(self, job: Job) -> dict:
        """The job's LoRA is already published (its header names this job): only its registry
        entry is missing (the lock was held, or lorad stopped mid-publish). Nothing is retrained
        or rendered again, and no `.v<N>` of its own file is made."""
        return complete_registry(
            loras=self.settings.loras,
            registry_path=self.settings.registry,
            job=job,
            lock_timeout_s=self.settings.lock_timeout_s,
        )

    def log_registry_only(self, job: Job) -> None:
        spelling = spelling_on_disk(self.settings.loras, job.name)
        get_logger().info("job.registry_only", lora=str(self.settings.loras / f"{spelling}.safetensors"))
