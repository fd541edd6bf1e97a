"""Conformance: every registered engine goes through the same contract, for real.

mflux trains the miniature model `tiny-z-image` in its child process; the scripted engine runs
its stand-in child; the fal engine talks to the local stand-in of fal.ai (tests/fal_standin.py). Each: plan, train stopped at a step (by a StopToken, as the daemon does),
resume to completion, render (and a stopped render), report files, adapter metadata, intake
limits, doctor checks, step-down. A new engine is covered by registering it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.sample import make_dataset
from engines.base import (
    Check,
    CheckStatus,
    Engine,
    EngineContext,
    Failure,
    IntakeLimits,
    JobInput,
    Machine,
    PlanError,
    Progress,
    RenderResult,
    RenderStopped,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
    get_engine,
    known_engines,
)

STOP_AT = 2
STEPS = 20  # room for the stop to land before the end even on a fast GPU
MACHINE = Machine(
    total_gb=128, available_gb=128, platform="linux", apple_silicon=False, memory_override_gb=128
)


def _job(workdir: Path, rank: int = 8) -> JobInput:
    data = make_dataset(workdir / "data", images=2, trigger="ohwx")
    return JobInput(
        "contract",
        "alice",
        "ohwx",
        "tiny-z-image",
        2,
        256,
        {"steps": STEPS, "rank": rank},
        data,
        "ohwx, portrait",
    )


@pytest.fixture(params=known_engines())
def engine(request, tmp_path, monkeypatch) -> Engine:
    options: dict = {}
    if request.param == "fal":  # the cloud engine runs against the local stand-in of fal.ai
        from fal_standin import FalStandIn, diffusers_lora

        standin = FalStandIn(tmp_path / "fal")
        standin.lora = diffusers_lora(tmp_path / "fal" / "rank8.safetensors", rank=8)
        request.addfinalizer(standin.close)
        for name, value in standin.env().items():
            monkeypatch.setenv(name, value)
        options = {"poll_s": 0.02, "retry_base_s": 0.02, **standin.options()}
    if request.param == "replicate":  # against the local stand-in of Replicate's API
        from fal_standin import diffusers_lora
        from replicate_standin import ReplicateStandIn, weights_tar

        rep = ReplicateStandIn(tmp_path / "replicate")
        rep.weights = weights_tar(diffusers_lora(tmp_path / "replicate" / "rank8.safetensors", rank=8))
        request.addfinalizer(rep.close)
        for name, value in rep.env().items():
            monkeypatch.setenv(name, value)
        options = {"poll_s": 0.02, "retry_base_s": 0.02, **rep.options()}
    return get_engine(
        request.param, EngineContext(state_dir=tmp_path / "state", stop_timeout_s=60, options=options)
    )


@pytest.mark.slow
def test_engine_contract(engine, tmp_path):
    assert isinstance(engine, Engine)
    workdir = tmp_path / "job"
    job = _job(workdir)

    plan = engine.plan(job, MACHINE)
    assert isinstance(plan, TrainingPlan) and plan.engine == engine.name and plan.model == "tiny-z-image"
    assert plan.total_steps >= STEPS and plan.tier and plan.backend and plan.summary
    assert TrainingPlan.from_dict(plan.to_dict()) == plan  # what the job row and plan.json keep

    # Stop at a given step, as the daemon's StopToken does on shutdown.
    stop = StopToken()
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.step >= STOP_AT:
            stop.stop("shutdown")

    stopped = engine.train(plan, workdir, progress, stop)
    assert isinstance(stopped, TrainResult) and stopped.status is TrainStatus.STOPPED, stopped.error
    assert stopped.step is not None and STOP_AT <= stopped.step < plan.total_steps
    assert seen and all(p.total == plan.total_steps for p in seen)

    resumed_steps: list[int] = []
    done = engine.train(plan, workdir, lambda p: resumed_steps.append(p.step), StopToken())
    assert done.status is TrainStatus.COMPLETED, done.error
    assert done.adapter is not None and done.adapter.is_file()
    assert resumed_steps and resumed_steps[0] > stopped.step  # resumed, not restarted
    assert resumed_steps[-1] == plan.total_steps

    out = workdir / "render"
    rendered = engine.render(plan, workdir, done.adapter, job.preview_prompt, out, StopToken())
    assert isinstance(rendered, RenderResult), rendered
    assert rendered.with_lora.is_file() and rendered.base.is_file() and rendered.compare.is_file()
    already_stopped = StopToken()
    already_stopped.stop("cancel")
    assert isinstance(
        engine.render(plan, workdir, done.adapter, job.preview_prompt, workdir / "r2", already_stopped),
        RenderStopped,
    )

    reports = engine.report_files(workdir)
    # Files, or a folder of them (mflux's samples/ is published as one folder).
    assert reports and all((p.is_file() or p.is_dir()) and workdir in p.parents for p in reports)

    keys = engine.adapter_metadata(plan)
    assert keys["ss_network_dim"] == "8" and all(isinstance(v, str) for v in keys.values())


def test_engine_contract_fast_parts(engine, tmp_path):
    """The calls that start no child: intake limits, doctor checks, step-down."""
    job = _job(tmp_path / "job")
    assert isinstance(engine.intake_limits(), IntakeLimits)
    plan = engine.plan(job, MACHINE)
    failed = TrainResult(TrainStatus.FAILED, error="killed", failure=Failure.MEMORY)
    try:
        lower = engine.step_down(plan, job, MACHINE, failed)
    except PlanError:
        lower = None
    if lower is not None:
        assert lower.step_downs == plan.step_downs + 1 and lower.tier != plan.tier
    assert (
        engine.step_down(
            plan, job, MACHINE, TrainResult(TrainStatus.FAILED, error="bug", failure=Failure.OTHER)
        )
        is None
    )


@pytest.mark.slow
def test_engine_doctor_checks(engine):
    checks = engine.doctor_checks("tiny-z-image", MACHINE)
    assert checks and all(isinstance(c, Check) and isinstance(c.status, CheckStatus) for c in checks)
    assert not [c for c in checks if c.status is CheckStatus.FAIL]


@pytest.mark.parametrize("name", known_engines())
def test_every_engine_implements_every_contract_member(name):
    """A member added to the contract (e.g. saved_state for scale-out) must reach every engine:
    a missing one only shows when that path runs (a coordinator error loop, not a test failure)."""
    from engines.base import Engine, engine_class

    members = sorted({n for n in dir(Engine) if not n.startswith("_")} | {"name", "options", "models"})
    cls = engine_class(name)
    assert [m for m in members if not hasattr(cls, m)] == []


def test_saved_step_is_the_step_of_the_saved_state_while_a_newer_one_is_written(tmp_path):
    """Scale-out sends saved_state() labelled with saved_step(): with checkpoint 4 half-written, both
    must describe checkpoint 2 (before, the step said 4 while the file sent was 2's, and the next
    worker resumed two steps earlier than the coordinator's row said; flaky in test_remote)."""
    from engines.base import EngineContext, get_engine
    from engines.mflux import checkpoints

    engine = get_engine("scripted", EngineContext(state_dir=tmp_path / "state"))
    ckpts = tmp_path / "w" / "train" / "checkpoints"
    ckpts.mkdir(parents=True)
    import zipfile

    members = {
        "lora_adapter": "a.safetensors",
        "optimizer": "o.safetensors",
        "iterator": "i.json",
        "config": "c.json",
    }
    with zipfile.ZipFile(ckpts / "0000002_checkpoint.zip", "w") as zf:
        zf.writestr("checkpoint.json", json.dumps({"files": members}))
        zf.writestr("run.json", "{}")
        for name in members.values():
            zf.writestr(name, "x")
    (ckpts / "0000004_checkpoint.zip").write_bytes(b"PK\x03\x04 half written")
    assert checkpoints.verify(ckpts / "0000002_checkpoint.zip") is None  # the fixture is a good checkpoint
    state = engine.saved_state(tmp_path / "w")
    assert [p.name for p in state] == ["0000002_checkpoint.zip"]
    assert engine.saved_step(tmp_path / "w") == 2
