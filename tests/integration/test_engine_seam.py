"""The engine seam: what daemon/ may import, the registry, engine settings, and the pure
planning rules for the memory that limits training (Metal, CUDA, CPU)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.settings import Settings, SettingsError, resolve
from engines.base import (
    EngineContext,
    EngineSettingsError,
    Failure,
    JobInput,
    Machine,
    PlanError,
    TrainResult,
    TrainStatus,
    engine_class,
    get_engine,
    known_engines,
)
from engines.mflux.device import Device, planning_memory
from engines.mflux.engine import MFluxEngine, classify_failure
from engines.mflux.memory_plan import InsufficientMemory, plan_memory
from engines.mflux.probe import backend_name, describe

ROOT = Path(__file__).resolve().parents[2]
GB = 1024**3

# -- the seam ------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_daemon_imports_only_the_engine_contract():
    offenders = {}
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        bad = {
            name
            for name in _imports(path)
            if (name == "engines" or name.startswith("engines.")) and not name.startswith("engines.base")
        }
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_seam_test_sees_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "def f():\n    from engines.mflux import checkpoints\n    import engines.scripted.engine\n"
    )
    assert {"engines.mflux", "engines.scripted.engine"} <= _imports(source)


def test_status_and_daemon_import_no_engine_and_no_ml(tmp_path):
    code = (
        "import sys\n"
        "from daemon import cli\n"
        f"cli.main(['--assets', {str(tmp_path)!r}, 'status'])\n"
        "status = sorted(m for m in sys.modules if m == 'engines' or m.startswith('engines.'))\n"
        "import daemon.daemon, daemon.pipeline\n"
        "from daemon.pipeline import make_engine\n"
        "from daemon.settings import Settings\n"
        f"make_engine(Settings(assets=__import__('pathlib').Path({str(tmp_path)!r})))\n"
        "heavy = sorted(m for m in ('mlx', 'mflux', 'PIL', 'torch', 'transformers') if m in sys.modules)\n"
        "print(status, heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip().splitlines()[-1] == "[] []"


# -- the registry and engine settings ------------------------------------------------------


def test_registry_knows_the_builtin_engines():
    assert {"mflux", "scripted"} <= set(known_engines())
    assert engine_class("mflux") is MFluxEngine


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(EngineSettingsError, match=r"unknown engine 'nope'; known engines: .*mflux.*scripted"):
        get_engine("nope", EngineContext(state_dir=Path("/tmp")))


@pytest.mark.parametrize(
    "options, error",
    [
        ({"checkpoint_every": "x"}, "checkpoint_every' in \\[engines.mflux\\]: expected an integer"),
        ({"checkpoint_every": -1}, "must be at least 0"),
        ({"metal_timeout_workaround": "maybe"}, "expected true or false"),
        (
            {"keep_everything": True},
            "unknown setting 'keep_everything' in \\[engines.mflux\\]; known: checkpoint_every",
        ),
    ],
)
def test_engine_section_errors_name_the_key(options, error):
    with pytest.raises(EngineSettingsError, match=error):
        MFluxEngine(EngineContext(state_dir=Path("/tmp"), options=options))


def test_engine_section_values_reach_the_engine():
    engine = MFluxEngine(
        EngineContext(
            state_dir=Path("/tmp"), options={"checkpoint_every": "7", "metal_timeout_workaround": "false"}
        )
    )
    assert engine.checkpoint_every == 7 and engine.metal_timeout_workaround is False


@pytest.mark.parametrize(
    "file_values, env, engines, deprecated",
    [
        ({"engines": {"mflux": {"checkpoint_every": 5}}}, {}, {"mflux": {"checkpoint_every": 5}}, 0),
        ({}, {"LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY": "9"}, {"mflux": {"checkpoint_every": "9"}}, 0),
        (
            {"engines": {"mflux": {"checkpoint_every": 5}}},
            {"LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY": "9"},
            {"mflux": {"checkpoint_every": "9"}},
            0,
        ),  # env beats the file, as for every setting
        ({"checkpoint_every": 3}, {}, {"mflux": {"checkpoint_every": 3}}, 1),  # deprecated alias still works
        (
            {"checkpoint_every": 3, "engines": {"mflux": {"checkpoint_every": 4}}},
            {},
            {"mflux": {"checkpoint_every": 4}},
            1,
        ),
        ({}, {"LORAD_METAL_TIMEOUT_WORKAROUND": "0"}, {"mflux": {"metal_timeout_workaround": "0"}}, 1),
        # cloud_daily_jobs: the cap of every paid cloud, now each cloud's `daily_jobs`
        ({"cloud_daily_jobs": 3}, {}, {"fal": {"daily_jobs": 3}, "replicate": {"daily_jobs": 3}}, 1),
        (
            {"cloud_daily_jobs": 3, "engines": {"fal": {"daily_jobs": 5}}},
            {},
            {"fal": {"daily_jobs": 5}, "replicate": {"daily_jobs": 3}},
            1,
        ),  # the engine's section wins over the alias
        (
            {"engines": {"fal": {"daily_jobs": 5}}},
            {"LORAD_CLOUD_DAILY_JOBS": "2"},
            {"fal": {"daily_jobs": "2"}, "replicate": {"daily_jobs": "2"}},
            1,
        ),  # env beats the file, as for checkpoint_every
        ({}, {"LORAD_ENGINES_FAL_DAILY_JOBS": "4"}, {"fal": {"daily_jobs": "4"}}, 0),
    ],
)
def test_engine_sections_in_settings(file_values, env, engines, deprecated):
    settings = resolve(file_values=file_values, env=env)
    assert settings.engines == engines and len(settings.deprecations) == deprecated


def test_the_deprecated_daily_cap_names_both_new_homes():
    (note,) = resolve(file_values={"cloud_daily_jobs": 1}).deprecations
    assert note == (
        "setting 'cloud_daily_jobs' in lorad.toml is deprecated: "
        "move it to [engines.fal] daily_jobs and [engines.replicate] daily_jobs"
    )
    (note,) = resolve(env={"LORAD_CLOUD_DAILY_JOBS": "1"}).deprecations
    assert note.endswith("use LORAD_ENGINES_FAL_DAILY_JOBS and LORAD_ENGINES_REPLICATE_DAILY_JOBS")


@pytest.mark.parametrize(
    "file_values, engine, daily",
    [
        ({}, "fal", 10),  # the default cap
        ({"cloud_daily_jobs": 2}, "fal", 2),
        ({"cloud_daily_jobs": 2}, "replicate", 2),
        ({"engines": {"replicate": {"daily_jobs": 0}}}, "replicate", 0),
    ],
)
def test_the_daily_cap_reaches_the_cloud_engine(tmp_path, file_values, engine, daily):
    from daemon.engine_host import make_engine

    settings = resolve(file_values=file_values, flags={"state_dir": tmp_path})
    assert make_engine(settings, engine).daily_jobs == daily


@pytest.mark.parametrize(
    "env, section, keep_awake",
    [
        ({}, {}, True),
        ({"LORAD_KEEP_AWAKE": "false"}, {}, False),
        ({"LORAD_KEEP_AWAKE": "false"}, {"keep_awake": True}, True),
    ],
)
def test_keep_awake_is_an_engine_option_the_generic_setting_fills(tmp_path, env, section, keep_awake):
    from daemon.engine_host import engine_options, make_engine

    settings = resolve(env=env, file_values={"engines": {"mflux": section}}, flags={"state_dir": tmp_path})
    assert make_engine(settings, "mflux").keep_awake is keep_awake
    assert "keep_awake" not in engine_options(settings, engine_class("fal").options, {})  # fal declares none


def test_lorad_config_shows_the_engine_settings_and_where_they_came_from(tmp_path):
    from daemon.engine_host import engine_setting_rows

    settings = resolve(
        file_values={"cloud_fallback": "fal", "cloud_daily_jobs": 3, "engines": {"scripted": {"step_s": 1}}},
        env={"LORAD_KEEP_AWAKE": "false"},
        flags={"state_dir": tmp_path},
    )
    rows = {key: (value, source) for key, value, source in engine_setting_rows(settings)}
    assert rows["engines.fal.daily_jobs"] == (3, "lorad.toml (cloud_daily_jobs, deprecated)")
    assert rows["engines.fal.max_cost_usd"] == (5.0, "default")  # the fallback's options, all of them
    assert rows["engines.mflux.keep_awake"] == (False, "LORAD_KEEP_AWAKE")  # the generic setting fills it
    assert rows["engines.replicate.daily_jobs"] == (3, "lorad.toml (cloud_daily_jobs, deprecated)")
    assert rows["engines.scripted.step_s"] == (1, "lorad.toml")  # another section: as given


def test_typed_option_reads_check_the_type():
    from engines.base import Option, coerce_options

    values = coerce_options("x", (Option("n", int, 1), Option("f", float, 0.5), Option("b", bool, True)), {})
    assert values.integer("n") == 1 and values.number("f") == 0.5 and values.number("n") == 1.0
    assert values.flag("b") is True
    with pytest.raises(TypeError, match="'b' is bool, not int"):
        values.integer("b")
    with pytest.raises(TypeError):
        values.text("n")


def test_no_type_ignore_on_option_reads():
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "engines").rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if "type: ignore" in line and "values" in line
    ]
    assert offenders == []


def test_renderer_for_picks_the_engine_or_the_local_mflux_renderer(tmp_path):
    from daemon.engine_host import make_engine, renderer_for
    from engines.base import Renderer

    settings = resolve(flags={"state_dir": tmp_path})
    for name in ("mflux", "scripted"):
        engine = make_engine(settings, name)
        assert renderer_for(settings, engine) is engine
    for name, label in (("fal", "fal.ai"), ("replicate", "Replicate")):
        engine = make_engine(settings, name)
        assert not isinstance(engine, Renderer)  # a cloud engine has no renderer of its own
        renderer = renderer_for(settings, engine)
        assert isinstance(renderer, Renderer) and (renderer.trained_on, renderer.folder) == (label, name)


def test_the_local_renderer_says_what_is_missing_with_the_same_words(tmp_path, monkeypatch):
    """A cloud-trained LoRA whose model this machine lacks: the render fails saying the LoRA is ready."""
    from daemon.engine_host import make_engine, renderer_for
    from engines.base import Check, CheckStatus, RenderFailed, StopToken, TrainingPlan
    from engines.mflux import render

    monkeypatch.setattr(
        render.MFluxEngine, "model_check", lambda self, model: Check("model", CheckStatus.FAIL, "no weights")
    )
    settings = resolve(flags={"state_dir": tmp_path})
    renderer = renderer_for(settings, make_engine(settings, "fal"))
    plan = TrainingPlan("fal", "z-image-turbo", "fal.ai", "cloud", "", 10)
    lora = tmp_path / "a.safetensors"
    outcome = renderer.render(
        plan=plan, workdir=tmp_path, lora=lora, prompt="p", out_dir=tmp_path / "r", stop=StopToken()
    )
    assert outcome == RenderFailed(
        f"the LoRA trained on fal.ai is ready in {lora}, but the local test render needs the model here: no weights"
    )


def test_engines_must_be_tables():
    with pytest.raises(SettingsError, match=r"\[engines.mflux\]"):
        resolve(file_values={"engines": {"mflux": 3}})


def _run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=120,
    )


def test_unknown_engine_stops_the_daemon_at_start_with_exit_2(tmp_path):
    result = _run_cli(tmp_path, "run", env={"LORAD_ENGINE": "dgx"})
    assert result.returncode == 2
    assert (
        "unknown engine 'dgx'" in result.stderr and "mflux" in result.stderr and "scripted" in result.stderr
    )


def test_bad_engine_section_stops_the_daemon_and_plan_with_exit_2(tmp_path):
    env = {"LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY": "often"}
    for command in (("run",), ("plan", "--images", "20")):
        result = _run_cli(tmp_path, *command, env=env)
        assert result.returncode == 2, result.stderr
        assert "checkpoint_every' in [engines.mflux]" in result.stderr


# -- the probe (pure part, and for real on this CPU machine) -------------------------------


@pytest.mark.parametrize(
    "metal, cuda, backend",
    [(True, False, "metal"), (False, True, "cuda"), (False, False, "cpu"), (True, True, "metal")],
)
def test_backend_name(metal, cuda, backend):
    assert backend_name(metal, cuda) == backend


@pytest.mark.parametrize(
    "backend, info, nvml, total, free, source",
    [
        (
            "cuda",
            {"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * GB, "free_memory": 79 * GB},
            None,
            80,
            79,
            "mlx device_info",
        ),
        (
            "cuda",
            {"device_name": "NVIDIA GB10", "total_memory": 128 * GB},
            {"total": 128 * GB, "free": 100 * GB},
            128,
            100,
            "mlx device_info + NVML",
        ),
        ("cuda", {"device_name": "x"}, {"total": 24 * GB, "free": 20 * GB}, 24, 20, "mlx device_info + NVML"),
        ("cuda", {"device_name": "x"}, None, None, None, "mlx device_info"),
        (
            "metal",
            {"device_name": "Apple M4 Max", "memory_size": 128 * GB},
            None,
            128,
            None,
            "mlx device_info",
        ),
        ("cpu", {"device_name": "Xeon", "architecture": "x86_64"}, None, None, None, "system RAM"),
    ],
)
def test_probe_describes_the_device(backend, info, nvml, total, free, source):
    out = describe(backend, info, nvml)
    assert (out["backend"], out["total_gb"], out["free_gb"], out["source"]) == (backend, total, free, source)


def test_probe_runs_here_and_says_cpu():
    out = subprocess.run(
        [sys.executable, "-m", "engines.mflux.probe"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=120,
    ).stdout
    data = json.loads(out.strip().splitlines()[-1])
    assert data["backend"] == "cpu" and data["device"] and data["mlx"]
    assert Device.from_json(data).backend == "cpu"


# -- the memory that limits training (pure) ------------------------------------------------

MAC = Machine(total_gb=64, available_gb=40, platform="darwin", apple_silicon=True)
LINUX = Machine(total_gb=512, available_gb=500, platform="linux", apple_silicon=False)
H100 = Device("cuda", "NVIDIA H100 80GB HBM3", total_gb=80, free_gb=79, source="mlx device_info")


@pytest.mark.parametrize(
    "device, machine, total, available, label",
    [
        (Device("metal", "Apple M4 Max", total_gb=64), MAC, 64, 40, "unified memory"),
        (Device("cpu", "Xeon"), LINUX, 512, 500, "system RAM"),
        (H100, LINUX, 80, 79, "GPU memory"),  # never the 512 GB of system RAM
        (
            Device("cuda", "NVIDIA GB10", total_gb=119, free_gb=None, source="mlx device_info"),
            LINUX,
            119,
            119,
            "GPU memory",
        ),
        (H100, Machine(512, 500, "linux", False, memory_override_gb=24), 24, 24, "ram_gb"),
    ],
)
def test_planning_memory(device, machine, total, available, label):
    limit = planning_memory(device, machine)
    assert (limit.total_gb, limit.available_gb) == (total, available) and label in limit.label


def test_cuda_without_a_readable_memory_is_a_plan_error():
    with pytest.raises(PlanError, match="ram_gb"):
        planning_memory(Device("cuda", "mystery"), LINUX)


CUDA_TABLE = [
    # total, free -> tier, quantize: bf16 whenever it fits, whatever the total
    (80, 79, "bf16-checkpointed", None),  # H100: bf16 without checkpointing needs ~162 GB (P12)
    (141, 139, "bf16-checkpointed", None),  # H200: bf16 without checkpointing needs ~162 GB
    (128, 110, "bf16-checkpointed", None),  # GB10 unified memory
    (192, 180, "bf16", None),
    (80, 50, "bf16-checkpointed", None),  # busy GPU: unquantized with checkpointing still fits
    (48, 46, "bf16-checkpointed", None),  # L40S / A6000
    (40, 39, "bf16-checkpointed", None),  # A100 40 GB
    (24, 23, "q4-lowram", 4),  # RTX 4090: only quantized fits (q8-checkpointed needs ~25 GB)
    (24, 20, "q4-lowram", 4),
    (32, 31, "q8-checkpointed", 8),  # RTX 5090
]


@pytest.mark.parametrize("total, free, tier, quantize", CUDA_TABLE)
def test_cuda_prefers_bf16_whenever_it_fits(total, free, tier, quantize):
    plan = plan_memory(
        model="z-image-turbo",
        total_gb=total,
        available_gb=free,
        image_count=15,
        max_side=1024,
        backend="cuda",
    )
    assert (plan.tier, plan.quantize) == (tier, quantize)


@pytest.mark.parametrize("total", [40, 48, 64, 80, 96, 128, 141, 192])
def test_cuda_with_enough_memory_never_gets_a_quantized_tier(total):
    plan = plan_memory(
        model="z-image-turbo",
        total_gb=total,
        available_gb=total,
        image_count=15,
        max_side=1024,
        backend="cuda",
    )
    assert plan.quantize is None


@pytest.mark.parametrize("total, tier", [(192, "bf16"), (80, "bf16-checkpointed"), (40, "bf16-checkpointed")])
def test_unquantized_only_after_a_missing_quantized_kernel(total, tier):
    plan = plan_memory(
        model="z-image-turbo",
        total_gb=total,
        available_gb=total,
        image_count=15,
        max_side=1024,
        backend="cuda",
        quantized=False,
    )
    assert (plan.tier, plan.quantize) == (tier, None)


def test_unquantized_only_fails_clearly_when_bf16_does_not_fit():
    with pytest.raises(
        InsufficientMemory, match="without quantization needs at least 37 GB free, have 24 .*GPU memory"
    ):
        plan_memory(
            model="z-image-turbo",
            total_gb=24,
            available_gb=24,
            image_count=15,
            max_side=1024,
            backend="cuda",
            quantized=False,
        )


@pytest.mark.parametrize(
    "message, memory_pressure, failure",
    [
        ("RuntimeError: [quantized_matmul] No implementation for problem shape", False, Failure.UNSUPPORTED),
        ("training process was killed (SIGKILL), most likely by memory pressure", True, Failure.MEMORY),
        ("ValueError: bad caption", False, Failure.OTHER),
    ],
)
def test_classify_failure(message, memory_pressure, failure):
    assert classify_failure(message, memory_pressure=memory_pressure) is failure


# -- mflux step-down on CUDA ---------------------------------------------------------------


def _engine_on(device: Device, tmp_path: Path) -> MFluxEngine:
    engine = MFluxEngine(EngineContext(state_dir=tmp_path))
    engine.device = device  # the probe's answer on a CUDA machine (this one has none)
    return engine


def _job(tmp_path: Path) -> JobInput:
    return JobInput("j", "alice", "ohwx", "z-image-turbo", 15, 1024, {}, tmp_path / "data", "ohwx")


def _failed(failure: Failure) -> TrainResult:
    return TrainResult(
        TrainStatus.FAILED, error="RuntimeError: No implementation for problem shape", failure=failure
    )


def test_quantized_kernel_failure_steps_up_to_bf16_when_it_fits(tmp_path):
    engine = _engine_on(
        Device("cuda", "NVIDIA RTX 6000", total_gb=48, free_gb=30, source="mlx device_info"), tmp_path
    )
    plan = engine.plan(job=_job(tmp_path), machine=LINUX)
    assert plan.backend == "cuda" and plan.config["quantize"] == 8  # 30 GB free at plan time: q8
    lower = engine.step_down(
        plan=plan, job=_job(tmp_path), machine=LINUX, failed=_failed(Failure.UNSUPPORTED)
    )
    assert lower is not None and lower.config["quantize"] is None and lower.tier == "bf16-checkpointed"
    assert (
        lower.step_downs == 1
        and "mflux issue 563" in lower.reason
        and any("563" in w for w in lower.warnings)
    )


def test_quantized_kernel_failure_without_room_for_bf16_fails_clearly(tmp_path):
    engine = _engine_on(
        Device("cuda", "NVIDIA RTX 4090", total_gb=24, free_gb=23, source="mlx device_info"), tmp_path
    )
    plan = engine.plan(job=_job(tmp_path), machine=LINUX)
    assert plan.config["quantize"] == 4
    with pytest.raises(PlanError, match="without quantization needs at least 37 GB free, have 24"):
        engine.step_down(plan=plan, job=_job(tmp_path), machine=LINUX, failed=_failed(Failure.UNSUPPORTED))


def test_other_failures_do_not_step_down(tmp_path):
    engine = _engine_on(H100, tmp_path)
    plan = engine.plan(job=_job(tmp_path), machine=LINUX)
    assert (
        engine.step_down(plan=plan, job=_job(tmp_path), machine=LINUX, failed=_failed(Failure.OTHER)) is None
    )
    assert (
        engine.step_down(plan=plan, job=_job(tmp_path), machine=LINUX, failed=_failed(Failure.UNSUPPORTED))
        is None
    )  # bf16 has no quantized kernel


def test_plan_summary_shows_backend_device_and_memory(tmp_path):
    plan = _engine_on(H100, tmp_path).plan(job=_job(tmp_path), machine=LINUX)
    text = "\n".join(plan.summary)
    assert "cuda (NVIDIA H100 80GB HBM3)" in text and "80 GB GPU memory" in text and "79 GB free" in text
    assert plan.tier == "bf16-checkpointed"


def test_doctor_and_plan_show_backend_device_and_plan_memory(tmp_path):
    doctor = _run_cli(tmp_path, "doctor")
    line = next(ln for ln in doctor.stdout.splitlines() if " backend " in ln)
    assert "cpu:" in line and "plans from" in line and "GB system RAM" in line
    plan = _run_cli(tmp_path, "plan", "--images", "20")
    assert plan.returncode == 0, plan.stderr
    assert "backend      cpu (" in plan.stdout and "GB system RAM" in plan.stdout


@pytest.mark.parametrize(
    "engine, chars, long_warning",
    [
        ("mflux", 1000, False),
        ("mflux", 2000, True),  # past mflux's 512 tokens (~1792 characters)
        ("scripted", 20000, False),  # an engine without a prompt limit warns about none
    ],
)
def test_caption_length_limit_comes_from_the_engine(tmp_path, engine, chars, long_warning):
    """Intake's long-caption warning uses the training engine's own limit (Engine.intake_limits)."""
    from daemon.intake.validate import limits, validate_dataset
    from daemon.sample import make_dataset

    settings = Settings(assets=tmp_path / "assets", engine=engine)
    folder = make_dataset(tmp_path / "ohwx_long", images=1)
    caption = next(folder.glob("*.txt"))
    caption.write_text("ohwx " + "x" * chars)
    report = validate_dataset(folder, read_ready=False, **limits(settings))
    codes = {f.code for f in report.findings}
    assert ("caption.long" in codes) is long_warning, report.findings
