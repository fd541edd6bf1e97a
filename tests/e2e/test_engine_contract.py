"""Conformance: every registered engine goes through the same contract, for real.

mflux trains the miniature model `tiny-z-image` in its child process; the scripted engine runs
its stand-in child; the fal engine talks to the local stand-in of fal.ai (tests/fal_standin.py).
Each: plan, train stopped at a step (by a StopToken, as the daemon does), resume to completion,
render through the renderer the daemon picks (and a stopped render), report files, adapter
metadata, intake limits, doctor checks, step-down. A new engine is covered by registering it.

The contract's size is pinned too: a minimal engine defining only the members
docs/ARCHITECTURE.md "adding an engine" lists is registered, planned and trained through the
daemon's own seam (make_engine), and the base class's abstract members are exactly that list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.engine_host import make_engine, renderer_for
from daemon.sample import make_dataset
from daemon.settings import resolve
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
    Renderer,
    RenderResult,
    RenderStopped,
    SavedState,
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

    plan = engine.plan(job=job, machine=MACHINE)
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

    stopped = engine.train(plan=plan, workdir=workdir, progress=progress, stop=stop)
    assert isinstance(stopped, TrainResult) and stopped.status is TrainStatus.STOPPED, stopped.error
    assert stopped.step is not None and STOP_AT <= stopped.step < plan.total_steps
    assert seen and all(p.total == plan.total_steps for p in seen)

    resumed_steps: list[int] = []
    done = engine.train(
        plan=plan, workdir=workdir, progress=lambda p: resumed_steps.append(p.step), stop=StopToken()
    )
    assert done.status is TrainStatus.COMPLETED, done.error
    assert done.adapter is not None and done.adapter.is_file()
    assert resumed_steps and resumed_steps[0] > stopped.step  # resumed, not restarted
    assert resumed_steps[-1] == plan.total_steps

    renderer = renderer_for(resolve(flags={"state_dir": tmp_path / "state"}, base=tmp_path), engine)
    assert isinstance(renderer, Renderer) and (renderer is engine) == hasattr(engine, "render")
    out = workdir / "render"
    rendered = renderer.render(
        plan=plan,
        workdir=workdir,
        lora=done.adapter,
        prompt=job.preview_prompt,
        out_dir=out,
        stop=StopToken(),
    )
    assert isinstance(rendered, RenderResult), rendered
    assert rendered.with_lora.is_file() and rendered.base.is_file() and rendered.compare.is_file()
    already_stopped = StopToken()
    already_stopped.stop("cancel")
    assert isinstance(
        renderer.render(
            plan=plan,
            workdir=workdir,
            lora=done.adapter,
            prompt=job.preview_prompt,
            out_dir=workdir / "r2",
            stop=already_stopped,
        ),
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
    plan = engine.plan(job=job, machine=MACHINE)
    failed = TrainResult(TrainStatus.FAILED, error="killed", failure=Failure.MEMORY)
    try:
        lower = engine.step_down(plan=plan, job=job, machine=MACHINE, failed=failed)
    except PlanError:
        lower = None
    if lower is not None:
        assert lower.step_downs == plan.step_downs + 1 and lower.tier != plan.tier
    assert (
        engine.step_down(
            plan=plan,
            job=job,
            machine=MACHINE,
            failed=TrainResult(TrainStatus.FAILED, error="bug", failure=Failure.OTHER),
        )
        is None
    )


@pytest.mark.slow
def test_engine_doctor_checks(engine):
    checks = engine.doctor_checks(model="tiny-z-image", machine=MACHINE)
    assert checks and all(isinstance(c, Check) and isinstance(c.status, CheckStatus) for c in checks)
    assert not [c for c in checks if c.status is CheckStatus.FAIL]


@pytest.mark.parametrize("name", known_engines())
def test_every_engine_implements_every_contract_member(name):
    """Every registered engine can be built (no abstract member left) and sets what it must."""
    from engines.base import REQUIRED_ATTRIBUTES, engine_class

    cls = engine_class(name)
    assert not getattr(cls, "__abstractmethods__", None)
    assert all(getattr(cls, a, None) for a in REQUIRED_ATTRIBUTES)


def test_saved_state_is_read_in_one_look_while_a_newer_one_is_written(tmp_path):
    """Scale-out sends saved_state()'s files labelled with its step: with checkpoint 4 half-written,
    both must describe checkpoint 2 (two separate views once said 4 while the file sent was 2's,
    and the next worker resumed two steps earlier than the coordinator's row said)."""
    from engines.mflux import checkpoints

    engine = get_engine("scripted", EngineContext(state_dir=tmp_path / "state"))
    assert engine.saved_state(tmp_path / "w") is None  # nothing saved yet
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
    assert state == SavedState(step=2, files=(ckpts / "0000002_checkpoint.zip",))


# -- the size of the contract: what a new engine must write -----------------------------------

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


class MinimalEngine(Engine):
    """Only the members "adding an engine" says a new engine must implement."""

    name = "minimal"
    models = ("tiny-z-image",)

    def plan(self, *, job, machine):
        return TrainingPlan(self.name, job.model, "cpu", "only", "minimal", total_steps=3)

    def train(self, *, plan, workdir, progress, stop, on_spawn=None):
        for step in range(1, plan.total_steps + 1):
            progress(Progress(step, plan.total_steps))
        adapter = Path(workdir) / "adapter.safetensors"
        adapter.write_bytes(b"fake")
        (Path(workdir) / "step").write_text(str(plan.total_steps))
        return TrainResult(TrainStatus.COMPLETED, adapter=adapter, step=plan.total_steps)

    def model_check(self, model):
        return Check("model", CheckStatus.OK, f"{model}: nothing to fetch")

    def saved_state(self, workdir):
        marker = Path(workdir) / "step"
        return SavedState(int(marker.read_text()), (marker,)) if marker.is_file() else None


def _documented(heading: str) -> list[str]:
    """The `name` items of the bullet list under `heading` in ARCHITECTURE.md's "adding an engine"."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index("## Adding an engine") :]
    block = section[section.index(heading) :].split("\n\n")[1]
    return [line.split("`")[1] for line in block.splitlines() if line.startswith("- `")]


def test_the_abstract_members_are_exactly_the_documented_ones():
    from engines.base import OVERRIDABLE, REQUIRED, REQUIRED_ATTRIBUTES, REQUIRED_METHODS

    assert Engine.__abstractmethods__ == frozenset(REQUIRED_METHODS)
    assert _documented("must implement") == list(REQUIRED)
    assert _documented("may override") == list(OVERRIDABLE)
    public = {n for n in vars(Engine) if not n.startswith("_")}
    assert public == set(REQUIRED_METHODS) | set(OVERRIDABLE)
    assert all(n in Engine.__annotations__ for n in REQUIRED_ATTRIBUTES)


def test_an_engine_missing_a_required_member_cannot_be_built(tmp_path):
    class NoSavedState(Engine):
        name, models = "broken", ("m",)
        plan, train, model_check = MinimalEngine.plan, MinimalEngine.train, MinimalEngine.model_check

    with pytest.raises(TypeError, match="saved_state"):
        NoSavedState(EngineContext(state_dir=tmp_path))


def test_a_minimal_engine_is_registered_planned_trained_and_resumable(tmp_path, monkeypatch):
    from engines import base

    monkeypatch.setitem(base._REGISTRY, "minimal", f"{__name__}:MinimalEngine")
    settings = resolve(flags={"state_dir": tmp_path / "state", "engine": "minimal"}, base=tmp_path)
    engine = make_engine(settings)
    assert isinstance(engine, MinimalEngine)
    workdir = tmp_path / "job"
    job = _job(workdir)
    plan = engine.plan(job=job, machine=MACHINE)
    seen: list[int] = []
    result = engine.train(
        plan=plan, workdir=workdir, progress=lambda p: seen.append(p.step), stop=StopToken()
    )
    assert result.status is TrainStatus.COMPLETED and seen == [1, 2, 3]
    assert engine.saved_state(workdir) == SavedState(3, (workdir / "step",))
    # The defaults it did not write:
    assert engine.step_down(plan=plan, job=job, machine=MACHINE, failed=result) is None
    assert engine.report_files(workdir) == [] and engine.adapter_metadata(plan) == {}
    assert engine.intake_limits() == IntakeLimits() and engine.disk_needed(plan=plan, workdir=workdir) == 0
    assert engine.doctor_checks(model="tiny-z-image", machine=MACHINE) == [engine.model_check("tiny-z-image")]
    # It renders nothing itself: the daemon's seam gives it the local mflux renderer.
    assert renderer_for(settings, engine) is not engine


def test_engine_methods_take_keywords(tmp_path):
    engine = MinimalEngine(EngineContext(state_dir=tmp_path))
    with pytest.raises(TypeError):
        engine.plan(_job(tmp_path / "job"), MACHINE)  # type: ignore[misc]
