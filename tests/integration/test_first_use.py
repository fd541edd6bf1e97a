"""What a new user sees first: `lorad plan`'s labels and units, enqueue's interactive defaults (in a
pty), the model-weights notice in doctor and run, and `uv run` not recompiling the venv."""

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
