"""Issue 12, newcomer friction (items 14-17): what a new user sees first.

enqueue's interactive defaults, the model-weights notice, the progress display (marker, ETA,
selftest line, status errors, `lorad plan`), and `uv run` not recompiling the venv.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from daemon.jobs import Job

NOW = 1_800_000_000.0


def _job(**fields) -> Job:
    columns = dict(
        id="20260101-000000-abcd",
        seq=1,
        dataset="ohwx_alice",
        dataset_path="/tmp/ohwx_alice",
        name="alice",
        state="training",
        step=None,
        total_steps=None,
        eta_s=None,
        loss=None,
        error=None,
        created_at=NOW - 100,
        updated_at=NOW,
        started_at=NOW - 90,
        finished_at=None,
        settings="{}",
        outputs="{}",
        plan="{}",
    )
    columns.update(fields)
    return Job(**columns)


def _status_lines(jobs: list[Job], now: float = NOW) -> list[str]:
    from daemon.status import render_status

    return render_status(jobs, show_all=True, as_json=False, daemon_pid=None, now=now).splitlines()


# -- 16 (d): status errors: whole words, and how many more -------------------------------------

SIX_ERRORS = [
    f"ERROR: img_{i}.png: the image is 120x90 px, smaller than the 256 px minimum on its short side "
    f"-> use a larger photo or remove img_{i}.png from the folder"
    for i in range(6)
]


def test_status_error_keeps_whole_words_and_counts_the_rest():
    job = _job(state="failed", error="\n".join(SIX_ERRORS), finished_at=NOW)
    lines = _status_lines([job])
    shown = " ".join(line.strip() for line in lines[2:])
    assert "(+5 more: lorad status --json or FAILED.txt)" in shown
    first = shown.split("error: ", 1)[1].split("(+5 more")[0].replace("…", " ")
    words = set(SIX_ERRORS[0].split())
    assert all(word in words for word in first.split()), first
    assert "img_1.png" not in shown  # the rest are counted, not printed half


def test_status_single_short_error_printed_whole():
    job = _job(state="failed", error="training process exited with code 1", finished_at=NOW)
    lines = _status_lines([job])
    assert lines[-1].strip() == "error: training process exited with code 1"
    assert "more:" not in "\n".join(lines)


# -- 16 (b): ETA ----------------------------------------------------------------------------------


def test_status_eta_counts_down_from_the_last_report():
    # The engine reported 100 s left, 60 s ago (a long step since): status says ~40 s, not 1m40s.
    job = _job(step=16, total_steps=80, eta_s=100.0, updated_at=NOW - 60)
    row = _status_lines([job])[2]
    assert " 40s " in row, row


def test_status_eta_shown_for_training_not_for_rendering():
    training = _job(step=16, total_steps=80, eta_s=300.0)
    rendering = _job(id="20260101-000000-beef", state="rendering", step=80, total_steps=80, eta_s=0.0)
    lines = _status_lines([training, rendering])
    assert " 5m00s " in lines[2]
    assert " 0s " not in lines[3]  # the training ETA is no estimate of the render


def test_progress_sink_keeps_last_eta_when_engine_sends_none(tmp_path):
    """After a resume the first step has no rate yet: the known ETA stays instead of vanishing."""
    from daemon.jobs import JobStore
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    sink = ProgressSink(store, "job1", marker_refresh_s=3600)
    sink(Progress(10, 80, 0.5, 700.0))
    sink(Progress(11, 80, 0.5, None))  # held back (one db write a second), then written by the timer
    try:
        wait_for(lambda: store.get("job1").step == 11, timeout=10, message="step 11 in the table")
    finally:
        sink.close()
    assert store.get("job1").eta_s == 700.0
    assert isinstance(store, JobStore)


# -- 16 (a): the TRAINING marker follows within marker_refresh_s ---------------------------------


def _store_with_training_job(tmp_path: Path):
    from daemon.jobs import JobStore

    folder = tmp_path / "ohwx_alice"
    folder.mkdir()
    store = JobStore(tmp_path / "jobs.db")
    store.create(
        job_id="job1",
        dataset_path=folder,
        name="alice",
        trigger="ohwx",
        fingerprint="f",
        ready_token=None,
        settings={},
    )
    store.transition("job1", "preparing")
    store.transition("job1", "training")
    return store


def test_training_marker_follows_progress_within_refresh_interval(tmp_path):
    """Steps 2..16 arrive quickly after step 1, then the trainer is busy (a long step, a preview):
    the marker must not stay at step 1 while the table says 16."""
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    marker = tmp_path / "ohwx_alice" / "TRAINING"
    sink = ProgressSink(store, "job1", marker_refresh_s=0.5)
    sink(Progress(1, 80, 1.0, None))
    assert "step 1/80" in marker.read_text()
    for step in range(2, 17):
        sink(Progress(step, 80, 1.0, 100.0))
    try:
        wait_for(lambda: "step 16/80" in marker.read_text(), timeout=10, message="marker at step 16")
        assert store.get("job1").step == 16
    finally:
        sink.close()


def test_progress_sink_close_stops_pending_marker_writes(tmp_path):
    """After close (training over), a pending refresh must not rewrite TRAINING over a newer marker."""
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    folder = tmp_path / "ohwx_alice"
    sink = ProgressSink(store, "job1", marker_refresh_s=0.3)
    sink(Progress(1, 80, 1.0, None))
    sink(Progress(2, 80, 1.0, 50.0))  # throttled: a refresh is pending
    sink.close()
    store.transition("job1", "failed", error="boom")
    time.sleep(0.8)  # longer than the refresh interval: a leftover timer would have fired
    assert (folder / "FAILED.txt").is_file() and not (folder / "TRAINING").exists()


# -- 16 (c): selftest progress line ---------------------------------------------------------------


def test_selftest_line_before_the_first_step():
    from daemon.selftest import progress_line

    assert progress_line(_job(state="preparing", step=None, total_steps=4)) == "  preparing step 0/4"
    assert progress_line(_job(state="training", step=3, total_steps=4)) == "  training step 3/4"
    assert progress_line(_job(state="queued")) == "  queued"


# -- 16 (e): lorad plan -----------------------------------------------------------------------------


def test_plan_warning_names_the_planned_resolution():
    from engines.mflux.memory_plan import plan_memory

    tiny = plan_memory(model="tiny-z-image", total_gb=16, available_gb=12, image_count=3, max_side=256)
    assert tiny.max_resolution == 64
    assert tiny.warnings and all("512" not in w for w in tiny.warnings), tiny.warnings
    assert any("64 px" in w for w in tiny.warnings)
    # A 24 GB machine stepped down for lack of free memory: no "16 GB is the floor".
    turbo = plan_memory(model="z-image-turbo", total_gb=24, available_gb=12, image_count=10, max_side=1024)
    assert turbo.tier == "q4-minimal"
    assert all("16 GB is the floor" not in w for w in turbo.warnings), turbo.warnings
    assert any(f"{turbo.max_resolution} px" in w for w in turbo.warnings)
    lowered = plan_memory(
        model="z-image-turbo", total_gb=16, available_gb=14, image_count=10, max_side=1024, resolution=384
    )
    assert any("384 px" in w for w in lowered.warnings) and all("512 px" not in w for w in lowered.warnings)


def _cli(*args, cwd, env=None, input_text=None):
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        input=input_text,
        timeout=120,
    )


def test_plan_labels_and_units(tmp_path):
    result = _cli(
        "--assets", str(tmp_path / "assets"), "plan", "--images", "20", "--ram-gb", "24", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "checkpoint." not in out
    assert "grad ckpt" in out
    cache = next(line for line in out.splitlines() if line.startswith("cache limit"))
    assert cache.split()[-1] == "GB", cache
    resolution = next(line for line in out.splitlines() if line.startswith("resolution"))
    assert resolution.endswith("px"), resolution


# -- 14: enqueue's interactive defaults are the plan's --------------------------------------------


def _enqueue_in_pty(
    folder: Path, answers: list[str], *, extra: tuple[str, ...] = (), env: dict | None = None
):
    """`lorad enqueue` on a pseudo-terminal (so it asks), answering each `]: ` prompt in turn."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--assets",
            str(folder.parent.parent),
            "enqueue",
            str(folder),
            *extra,
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=folder.parent,
        env={**os.environ, "LORAD_RAM_GB": "64", "LORAD_MODEL": "z-image-turbo", **(env or {})},
        close_fds=True,
    )
    os.close(slave)
    out, pending, answered = b"", list(answers), 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                while pending and out.count(b"]: ") > answered:
                    os.write(master, (pending.pop(0) + "\n").encode())
                    answered += 1
            elif proc.poll() is not None:
                break
        code = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, out.decode("utf-8", "replace").replace("\r\n", "\n")


def _fingerprint(folder: Path, ready: bytes, model: str = "z-image-turbo") -> str:
    from daemon.intake.snapshot import fingerprint
    from daemon.intake.take import effective_settings
    from daemon.intake.validate import validate_dataset
    from daemon.settings import Settings

    report = validate_dataset(folder, ready_text=ready)
    return fingerprint(
        report, effective_settings(report.options, Settings(assets=folder.parent.parent, model=model))
    )


@pytest.fixture
def dataset(tmp_path):
    from daemon.sample import make_dataset

    return make_dataset(tmp_path / "assets" / "training_data" / "ohwx_alice", images=3)


def test_enqueue_enter_keeps_the_plans_defaults(dataset):
    code, out = _enqueue_in_pty(dataset, ["", ""])
    assert code == 0, out
    # z-image-turbo, 3 images, 64 GB: batch 1, 1000 steps rounded up to whole epochs of 3 = 1002.
    assert "LoRA rank [16]" in out and "steps [1002]" in out, out
    ready = (dataset / "READY").read_bytes()
    assert ready == b"", ready  # nothing changed, nothing written: a plain READY
    assert _fingerprint(dataset, ready) == _fingerprint(dataset, b"")


def test_enqueue_writes_only_what_changed(dataset):
    (dataset / "lora.toml").write_text("rank = 32\n")
    code, out = _enqueue_in_pty(dataset, ["", "1500"])
    assert code == 0, out
    assert "LoRA rank [32]" in out, out  # lora.toml's rank is the default shown
    assert (dataset / "READY").read_text() == "steps = 1500\n"
    code, out = _enqueue_in_pty(dataset, ["8", ""])
    assert (dataset / "READY").read_text() == "rank = 8\n"
    assert (dataset / "lora.toml").read_text() == "rank = 32\n"  # the user's file is untouched


def test_enqueue_flags_all_have_help_and_model_lists_models(tmp_path):
    from daemon.cli import build_parser
    from engines.mflux.memory_plan import PROFILES

    parser = build_parser(only="enqueue")
    sub = next(a for a in parser._actions if a.dest == "command").choices["enqueue"]
    for action in sub._actions:
        assert action.help and action.help.strip(), f"{action.option_strings or action.dest} has no help"
    result = _cli("enqueue", "--help", cwd=tmp_path, env={"COLUMNS": "500"})
    assert result.returncode == 0
    flat = result.stdout
    for model in PROFILES:
        assert model in flat, model


def test_enqueue_unknown_model_is_refused_clearly(dataset):
    result = _cli(
        "--assets",
        str(dataset.parent.parent),
        "enqueue",
        str(dataset),
        "--model",
        "sdxl",
        "--yes",
        cwd=dataset.parent,
    )
    assert result.returncode == 2
    assert (
        "unknown model 'sdxl'" in result.stderr
        and "z-image-turbo" in result.stderr
        and "tiny-z-image" in result.stderr
    )
    assert not (dataset / "READY").exists()
    result = _cli(
        "--assets",
        str(dataset.parent.parent),
        "enqueue",
        str(dataset),
        "--model",
        "tiny-z-image",
        "--yes",
        cwd=dataset.parent,
    )
    assert result.returncode == 0, result.stderr
    assert (dataset / "READY").read_text() == 'model = "tiny-z-image"\n'


# -- 15: missing model weights are said at start, by doctor, and by the job -----------------------

TURBO_PIN = "f332072aa78be7aecdf3ee76d5c247082da564a6"


def _fake_snapshot(cache: Path, repo: str, revision: str, *, complete: bool = True) -> Path:
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    for folder in ("transformer", "text_encoder", "vae"):
        (snapshot / folder).mkdir(parents=True)
        (snapshot / folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "transformer" / "model.safetensors.index.json").write_text(json.dumps(index))
    if complete:
        (snapshot / "transformer" / "model-00002-of-00002.safetensors").write_bytes(b"x")
    return snapshot


def test_weights_check_finds_the_hf_cache_like_mflux(tmp_path):
    from engines.mflux.weights import hf_hub_cache, weights_check

    home = tmp_path / "hf"
    env = {"HF_HOME": str(home)}
    assert hf_hub_cache(env) == home / "hub"
    assert hf_hub_cache({"HF_HUB_CACHE": str(tmp_path / "c"), "HF_HOME": str(home)}) == tmp_path / "c"
    assert hf_hub_cache({"XDG_CACHE_HOME": str(tmp_path / "x")}) == tmp_path / "x" / "huggingface" / "hub"

    missing = weights_check("z-image-turbo", env)
    assert missing.status.value == "warn"
    for words in (
        "not on this machine",
        "about 31 GB",
        f"hf download Tongyi-MAI/Z-Image-Turbo --revision {TURBO_PIN}",
        "LORAD_MODEL=tiny-z-image",
    ):
        assert words in missing.detail, missing.detail
    _fake_snapshot(
        home / "hub", "Tongyi-MAI/Z-Image-Turbo", "0" * 40
    )  # another revision: mflux would not use it
    assert weights_check("z-image-turbo", env).status.value == "warn"
    _fake_snapshot(home / "hub", "Tongyi-MAI/Z-Image-Turbo", TURBO_PIN, complete=False)  # a shard missing
    assert weights_check("z-image-turbo", env).status.value == "warn"
    shutil.rmtree(home / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / TURBO_PIN)
    _fake_snapshot(home / "hub", "Tongyi-MAI/Z-Image-Turbo", TURBO_PIN)
    # Issue 24: the training adapter mflux loads for every z-image-turbo run is part of the weights.
    env["MFLUX_CACHE_DIR"] = str(tmp_path / "mflux")
    assert weights_check("z-image-turbo", env).status.value == "warn"
    adapter = home / "hub" / "models--ostris--zimage_turbo_training_adapter" / "snapshots" / ("1" * 40)
    adapter.mkdir(parents=True)
    (adapter / "zimage_turbo_training_adapter_v2.safetensors").write_bytes(b"x")
    assert weights_check("z-image-turbo", env).status.value == "ok"
    assert weights_check("tiny-z-image", env).status.value == "ok"
    assert weights_check("sdxl", env).status.value == "fail"


def test_weights_table_matches_mflux():
    """The repos and pins lorad checks are the ones mflux loads (guards an mflux upgrade)."""
    from engines.mflux.memory_plan import PROFILES
    from engines.mflux.weights import MODEL_WEIGHTS, pinned_revisions

    code = (
        "import json, sys\n"
        "from mflux.models.common.config.model_config import ModelConfig\n"
        "from mflux.models.common.resolution.model_revisions import ModelRevisions\n"
        "names = json.loads(sys.argv[1])\n"
        "repos = {n: ModelConfig.from_name(n).model_name for n in names}\n"
        "print(json.dumps({'repos': repos, 'pins': {r: ModelRevisions.get(r) for r in repos.values()}}))\n"
    )
    # lorad's model name -> mflux's (they differ for FLUX.1 [dev]: lorad "flux-dev", mflux "dev").
    mflux_name = {name: p.mflux_model for name, p in PROFILES.items() if name != "tiny-z-image"}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sorted(set(mflux_name.values())))],
        capture_output=True,
        text=True,
        check=True,
    )
    truth = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(MODEL_WEIGHTS) == set(mflux_name)
    for name, mflux_model in mflux_name.items():
        repo = truth["repos"][mflux_model]
        assert MODEL_WEIGHTS[name][0] == repo
        assert pinned_revisions().get(repo) == truth["pins"][repo]


def test_doctor_says_weights_missing_and_what_to_do(tmp_path):
    result = _cli(
        "--assets", str(tmp_path / "assets"), "doctor", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")}
    )
    line = next(line for line in result.stdout.splitlines() if "] model" in line)
    assert line.startswith("[warn]") and "about 31 GB" in line and "LORAD_MODEL=tiny-z-image" in line, line


@pytest.mark.slow
def test_run_says_weights_missing_at_start_and_the_job_fails_with_it(daemon_factory, tmp_path):
    from daemon.sample import make_dataset

    d = daemon_factory(
        engine="mflux",
        model="z-image-turbo",
        extra_env={"HF_HOME": str(tmp_path / "hf"), "LORAD_RAM_GB": "64"},
    )
    d.start()
    assert d.log_has("model.weights", present=False)
    out = Path(d.out.name)
    wait_for(lambda: "LORAD_MODEL=tiny-z-image" in out.read_text(), 10, message="the printed notice")
    folder = make_dataset(d.training_data / "ohwx_alice", images=3)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "failed", 60, message="job failed")
    failed = (folder / "FAILED.txt").read_text()
    assert (
        "not on this machine" in failed and "about 31 GB" in failed and "LORAD_MODEL=tiny-z-image" in failed
    )
    assert d.proc.poll() is None  # the daemon keeps running
    assert not any(e.get("event") == "job.child" for e in d.events())  # no trainer was started to find out


def test_run_says_nothing_alarming_for_the_miniature_model(daemon_factory):
    d = daemon_factory(engine="mflux", model="tiny-z-image").start()
    assert d.log_has("model.weights", present=True)


# -- 17: `uv run` compiles nothing; the training child caches its own bytecode --------------------


def test_training_child_writes_bytecode_even_when_the_parent_says_not_to(tmp_path, monkeypatch):
    """With uv's compile-bytecode off, the child's imports (mflux, transformers: seconds) stay fast
    only if the first child may write .pyc files; PYTHONDONTWRITEBYTECODE must not reach it."""
    from engines.base import StopToken
    from engines.process.child import run_child

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    code = (
        "import json, os, sys\n"
        "fd = int(sys.argv[sys.argv.index('--progress-fd') + 1])\n"
        "os.write(fd, (json.dumps({'event': 'probe', 'dont_write': sys.dont_write_bytecode}) + '\\n').encode())\n"
    )
    events: list[dict] = []
    outcome = run_child(
        ["-c", code],
        cwd=tmp_path,
        log_path=tmp_path / "child.log",
        on_event=events.append,
        stop=StopToken(),
        keep_awake=False,
    )
    assert outcome.returncode == 0, outcome.stderr_tail
    assert events == [{"event": "probe", "dont_write": False}]


def test_pyproject_does_not_byte_compile_on_every_uv_run():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not config["tool"]["uv"].get("compile-bytecode", False)


@pytest.mark.slow
def test_second_uv_run_compiles_nothing():
    """The README's own invocation: a no-change `uv run lorad` must not recompile the venv."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_COMPILE_BYTECODE")}
    env["UV_OFFLINE"] = "1"  # never reach the network from a test; the lock is already resolved
    runs = [
        subprocess.run(
            [uv, "run", "lorad", "--help"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "Bytecode compiled" not in runs[1].stderr, runs[1].stderr
