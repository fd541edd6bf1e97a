"""The one job runner (daemon/runner.py) driven in-process (issue 21): the local pipeline through the
queue's in-process dispatcher (`Queue(..., immediate=True)` / `run_pending`), the Redis worker's events
through a recording stand-in for its Redis side. The engine is a small fake in this file: no child
process, no daemon, no Redis, no sleep.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from PIL import Image
from structlog.testing import capture_logs

from daemon.jobs import JobStore
from daemon.pipeline import Pipeline
from daemon.queue import Queue
from daemon.remote.worker import RemoteWorker
from daemon.runner import cloud_fallback_target
from daemon.settings import resolve
from daemon.states import JobState
from engines.base import (
    Failure,
    MemoryPlanError,
    Progress,
    RenderResult,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
)
from lorad_base.workdir import WorkDir

OOM = "killed by the OS (out of memory)"


def write_safetensors(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    return path


class FakeEngine:
    """The engine members the runner and the publisher call, scripted by the test."""

    name = "fake"
    models = ("tiny",)

    def __init__(self, name: str = "fake"):
        self.name = name
        self.failures: list[str] = []  # errors the next train calls return, in order
        self.plan_error: Exception | None = None
        self.disk_bytes = 0
        self.trains: list[str] = []  # the tier of each train call
        self.renders = 0
        self.step_downs = 0
        self.on_plan = lambda: None  # what "happens meanwhile" while the job prepares

    def plan(self, *, job, machine) -> TrainingPlan:
        self.on_plan()
        if self.plan_error is not None:
            raise self.plan_error
        return TrainingPlan(engine=self.name, model=job.model, backend="cpu", tier="high", reason="test",
                            total_steps=2)  # fmt: skip

    def step_down(self, *, plan, job, machine, failed) -> TrainingPlan | None:
        self.step_downs += 1
        return TrainingPlan(engine=self.name, model=plan.model, backend="cpu", tier="low", reason="stepped down",
                            total_steps=2, step_downs=plan.step_downs + 1)  # fmt: skip

    def train(self, *, plan, workdir, progress, stop, on_spawn=None) -> TrainResult:
        self.trains.append(plan.tier)
        if self.failures:
            return TrainResult(TrainStatus.FAILED, error=self.failures.pop(0), failure=Failure.MEMORY)
        for step in (1, 2):
            progress(Progress(step, 2, loss=0.5 / step))
        return TrainResult(TrainStatus.COMPLETED, adapter=write_safetensors(Path(workdir) / "adapter.safetensors"),
                           step=2)  # fmt: skip

    def render(self, *, plan, workdir, lora, prompt, out_dir, stop, seed=42) -> RenderResult:
        self.renders += 1
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        paths = [Path(out_dir) / n for n in ("with.png", "base.png", "compare.png")]
        for path in paths:
            Image.new("RGB", (4, 4)).save(path)
        return RenderResult(with_lora=paths[0], base=paths[0], compare=paths[2])

    def report_files(self, workdir) -> list[Path]:
        return []

    def adapter_metadata(self, plan) -> dict[str, str]:
        return {"ss_network_dim": "4"}

    def disk_needed(self, *, plan, workdir) -> int:
        return self.disk_bytes

    def saved_state(self, workdir) -> None:
        return None


class Local:
    """A state dir, its jobs table, the pipeline and the queue's in-process dispatcher."""

    def __init__(self, tmp_path: Path, **flags):
        self.settings = resolve(flags={"assets": tmp_path / "assets", "registry": tmp_path / "config.json",
                                       "ram_gb": 16.0, **flags}, base=tmp_path)  # fmt: skip
        self.store = JobStore(self.settings.state / "jobs.db", jobs_dir=self.settings.jobs_dir)
        self.engines = {"fake": FakeEngine()}
        self.engine = self.engines["fake"]
        self.pipeline = Pipeline(self.settings, self.store, threading.Event(), engines=self.make_engine)
        self.queue = Queue(self.settings.queue_db, run_job=self.pipeline.run_job, immediate=True)

    def make_engine(self, settings, name: str) -> FakeEngine:
        return self.engines[name]

    def job(self, job_id: str = "j1", name: str = "ohwx_a"):
        folder = self.settings.training_data / name
        folder.mkdir(parents=True, exist_ok=True)
        work = WorkDir.of(self.settings.jobs_dir, job_id)
        work.data.mkdir(parents=True)
        images = [{"image": "0001.png", "width": 8, "height": 8, "caption": "ohwx", "sha256": "0" * 64}]
        work.manifest.write_text(json.dumps({"images": images, "preview_prompt": "ohwx, a photo"}))
        return self.store.create(job_id=job_id, dataset_path=folder, name=name, trigger="ohwx",
                                 fingerprint="f" * 64, ready_token=None, settings={"engine": "fake"})  # fmt: skip

    def state(self, job_id: str = "j1"):
        job = self.store.get(job_id)
        assert job is not None
        return job


@pytest.fixture
def local(tmp_path):
    return Local(tmp_path)


def test_a_job_runs_through_every_phase_in_the_callers_thread(local):
    seen = []
    local.engine.on_plan = lambda: seen.append(local.state().state)
    local.job()
    local.queue.enqueue("j1")  # immediate: ran to the end before enqueue returned
    job = local.state()
    assert seen == [JobState.PREPARING] and local.engine.trains == ["high"] and local.engine.renders == 1
    assert job.state == JobState.DONE and job.step == 2 and job.plan["tier"] == "high"
    assert Path(job.outputs["lora"]).is_file() and local.queue.pending_job_ids() == []


def test_run_pending_runs_queued_jobs_in_priority_order(tmp_path):
    local = Local(tmp_path)
    local.queue.immediate = False
    local.job("j1", "ohwx_a")
    local.job("j2", "ohwx_b")
    local.queue.enqueue("j1", priority=0, ready_at=1.7e9 + 1)
    local.queue.enqueue("j2", priority=5, ready_at=1.7e9 + 2)
    assert local.store.get("j1").state == JobState.QUEUED  # nothing ran on enqueue
    assert local.queue.run_pending() == ["j2", "j1"]
    assert {local.state(i).state for i in ("j1", "j2")} == {JobState.DONE}


def test_cancel_requested_while_preparing_cancels_at_the_training_boundary(local):
    local.engine.on_plan = lambda: local.store.cancel("j1")  # `lorad cancel` arrives mid-prepare
    local.job()
    local.queue.enqueue("j1")
    assert local.state().state == JobState.CANCELLED
    assert local.engine.trains == [] and local.engine.renders == 0


def test_one_step_down_after_an_oom_then_done(local):
    local.engine.failures = [OOM]
    local.job()
    with capture_logs() as logs:
        local.queue.enqueue("j1")
    job = local.state()
    assert local.engine.trains == ["high", "low"] and local.engine.step_downs == 1
    assert job.state == JobState.DONE and job.plan["tier"] == "low" and job.plan["step_downs"] == 1
    assert [e["to_tier"] for e in logs if e["event"] == "job.stepdown"] == ["low"]


def test_a_second_failure_after_the_step_down_fails_the_job_with_its_error(local):
    local.engine.failures = [OOM, "out of memory again"]
    local.job()
    local.queue.enqueue("j1")
    job = local.state()
    assert local.engine.trains == ["high", "low"] and local.engine.step_downs == 1  # never a second one
    assert job.state == JobState.FAILED and job.error == "out of memory again"
    assert local.engine.renders == 0 and not local.settings.loras.exists()


def test_a_retry_of_a_job_whose_lora_is_published_only_completes_the_registry(tmp_path):
    local = Local(tmp_path, lock_timeout_s=0.001)
    local.job()
    lock = local.settings.registry.with_name(local.settings.registry.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another program holds the registry
        local.queue.enqueue("j1")
    finally:
        os.close(fd)
    job = local.state()
    assert job.state == JobState.FAILED and "registry lock" in (job.error or "")
    assert (local.settings.loras / "ohwx_a.safetensors").is_file() and local.engine.trains == ["high"]
    local.store.transition("j1", JobState.QUEUED)  # lorad retry
    with capture_logs() as logs:
        local.queue.enqueue("j1")
    job = local.state()
    assert job.state == JobState.DONE and local.engine.trains == ["high"] and local.engine.renders == 1
    assert "ohwx_a" in json.loads(local.settings.registry.read_text())["loras"]
    assert any(e["event"] == "job.registry_only" for e in logs)


def test_local_mode_refuses_a_job_whose_checkpoints_cannot_fit(local):
    local.engine.disk_bytes = 1 << 62
    local.job()
    with capture_logs() as logs:
        local.queue.enqueue("j1")
    job = local.state()
    assert job.state == JobState.FAILED and "not enough free space for training" in (job.error or "")
    assert "lorad retry j1" in (job.error or "") and job.step is None and local.engine.trains == []
    assert any(e["event"] == "space.refused" and e["phase"] == "train" for e in logs)


def test_no_local_plan_fits_memory_the_cloud_fallback_trains_it(tmp_path):
    local = Local(tmp_path, cloud_fallback="fal")  # the fake stands in for the named cloud engine
    local.engine.plan_error = MemoryPlanError("needs 40 GB, has 16 GB")
    local.engines["fal"] = cloud = FakeEngine("fal")
    local.job()
    local.queue.enqueue("j1")
    job = local.state()
    assert job.state == JobState.DONE and local.engine.trains == [] and cloud.trains == ["high"]
    assert job.settings["engine"] == "fal" and job.settings["fallback_from"] == "fake"


def test_without_cloud_fallback_a_memory_plan_error_fails_the_job(local):
    local.engine.plan_error = MemoryPlanError("needs 40 GB, has 16 GB")
    local.job()
    local.queue.enqueue("j1")
    assert local.state().state == JobState.FAILED and local.state().error == "needs 40 GB, has 16 GB"


@pytest.mark.parametrize(
    "cloud, engine, fallback_from, expected",
    [
        (None, "mflux", None, None),  # cloud_fallback off
        ("fal", "mflux", None, "fal"),
        ("fal", "fal", None, None),  # already there
        ("fal", "mflux", "mflux", None),  # fell back once already: it waits rather than bounce
    ],
)
def test_cloud_fallback_target_table(cloud, engine, fallback_from, expected):
    assert cloud_fallback_target(cloud, engine, fallback_from) == expected


# -- the Redis worker: the same runner, its news as fenced events -----------------------------------


class Ref:
    def __init__(self, key: str):
        self.key = key

    def to_dict(self) -> dict:
        return {"key": self.key}


def worker_for(tmp_path: Path, engine: FakeEngine):
    """A RemoteWorker whose Redis side is a recorder: every event it would send is kept in order."""
    worker = RemoteWorker.__new__(RemoteWorker)
    worker.settings = resolve(flags={"assets": tmp_path / "assets", "ram_gb": 16.0}, base=tmp_path)
    worker.id, worker.engines, worker.log = "w1", {"fake": engine}, structlog.get_logger("lorad")
    sent: list[tuple[str, dict]] = []

    def emit(current, kind, **data):
        sent.append((kind, data))
        return True

    worker.emit = emit
    worker.emit_retrying = emit
    worker.release = lambda current: sent.append(("released", {}))
    worker.files = SimpleNamespace(put_file=lambda key, path: Ref(key))
    return worker, sent


def run_offer(tmp_path: Path, engine: FakeEngine):
    worker, sent = worker_for(tmp_path, engine)
    workdir = tmp_path / "work" / "j1"
    (workdir / "data").mkdir(parents=True)
    offer = SimpleNamespace(job_id="j1", token="1.abc", engine="fake", name="ohwx_a", trigger="ohwx",
                            model="tiny", image_count=1, max_side=8, options={}, preview_prompt="ohwx")  # fmt: skip
    current = {"job_id": "j1", "token": "1.abc", "stop": StopToken()}
    plan = engine.plan(job=SimpleNamespace(model="tiny"), machine=None)
    with capture_logs() as logs:
        worker.train_and_deliver(offer, plan, workdir, current, worker.log)
    return sent, logs


def test_the_worker_refuses_a_job_whose_checkpoints_cannot_fit_with_the_same_words(tmp_path):
    engine = FakeEngine()
    engine.disk_bytes = 1 << 62
    sent, logs = run_offer(tmp_path, engine)
    assert [kind for kind, _ in sent] == ["failed"] and engine.trains == []
    error = sent[0][1]["error"]
    assert "not enough free space for training" in error and "lorad retry j1" in error
    assert any(e["event"] == "space.refused" and e["phase"] == "train" for e in logs)


def test_the_worker_steps_down_once_and_delivers_through_the_same_runner(tmp_path):
    engine = FakeEngine()
    engine.failures = [OOM]
    sent, logs = run_offer(tmp_path, engine)
    kinds = [kind for kind, _ in sent]
    assert engine.trains == ["high", "low"] and kinds[0] == "plan" and kinds[-2:] == ["rendering", "done"]
    done = sent[-1][1]
    assert done["plan"]["tier"] == "low" and set(done["files"]) == {"adapter", "render", "base", "compare"}
    assert any(e["event"] == "worker.delivered" for e in logs)


def test_a_second_failure_on_the_worker_is_sent_as_failed_with_its_error(tmp_path):
    engine = FakeEngine()
    engine.failures = [OOM, "out of memory again"]
    sent, _logs = run_offer(tmp_path, engine)
    assert [kind for kind, _ in sent] == ["plan", "failed"] and sent[-1][1]["error"] == "out of memory again"


@pytest.mark.parametrize("start", [JobState.QUEUED, JobState.INTERRUPTED])
def test_a_verified_result_goes_straight_to_publishing(local, start):
    """The coordinator's edge (states.TRANSITIONS): a job whose result is already here is not
    walked through preparing, training and rendering."""
    local.job()
    if start == JobState.INTERRUPTED:
        local.store.transition("j1", JobState.PREPARING)
        local.store.transition("j1", JobState.INTERRUPTED)
    with capture_logs() as logs:
        job = local.store.transition("j1", JobState.PUBLISHING, expect=start)
    assert job.state == JobState.PUBLISHING and job.started_at is not None
    moves = [(e.get("previous"), e.get("state")) for e in logs if e.get("job_id") == "j1"]
    assert moves == [(start, JobState.PUBLISHING)]
