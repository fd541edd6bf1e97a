"""Issue 24, daily use: one configuration every command sees, outputs that stay true, retention,
a service that carries its environment, weights that are everything the engine loads."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, DaemonProc

from daemon.settings import DEFAULT_SOURCE, resolve

# -- 1. one configuration ----------------------------------------------------------------------


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAD_")}
    return {**env, **extra}


def _cli(cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=cwd,
        env=env if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "layers, want, source",
    [
        ({}, "z-image-turbo", DEFAULT_SOURCE),
        ({"file": {"model": "flux2-klein-4b"}}, "flux2-klein-4b", "lorad.toml"),
        ({"file": {"model": "a"}, "daemon": {"model": ("tiny-z-image", "LORAD_MODEL")}}, "tiny-z-image",
         "daemon: LORAD_MODEL"),
        ({"daemon": {"model": ("tiny-z-image", "LORAD_MODEL")}, "env": {"LORAD_MODEL": "b"}}, "b", "LORAD_MODEL"),
        ({"env": {"LORAD_MODEL": "b"}, "flags": {"model": "c"}}, "c", "--model"),
    ],
)  # fmt: skip
def test_precedence_flags_env_daemon_file_defaults(layers, want, source):
    settings = resolve(
        file_values=layers.get("file"),
        env=layers.get("env"),
        flags=layers.get("flags"),
        daemon_values=layers.get("daemon"),
    )
    assert settings.model == want
    assert settings.sources["model"] == source


def test_mask_value_masks_secrets_and_url_passwords():
    from daemon.effective import mask_value

    assert mask_value("ui_token", "abc") == "***"
    assert mask_value("FAL_KEY", "k") == "***"
    assert mask_value("queue", "redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert mask_value("queue", "redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert mask_value("model", "tiny-z-image") == "tiny-z-image"
    assert "tok" not in mask_value("notify", ("ntfy://tok@ntfy.sh/topic",))


def _pty_run(cwd: Path, args: list[str], env: dict, answers: int) -> str:
    """A lorad command on a pseudo-terminal (so enqueue asks), pressing Enter at each prompt."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, cwd=cwd, env=env, close_fds=True)  # fmt: skip
    os.close(slave)
    out, answered = b"", 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    break
                if out.count(b"]: ") > answered and answered < answers:
                    os.write(master, b"\n")
                    answered += 1
        proc.wait(30)
    finally:
        os.close(master)
    return out.decode(errors="replace")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_command_sees_the_running_daemons_settings(tmp_path, redis_server):
    """Acceptance: only LORAD_MODEL=tiny-z-image (and the queue) on `lorad run`; plan, enqueue,
    ui --print, workers, status and config all use the daemon's settings and say so."""
    from daemon.sample import make_dataset

    port = _free_port()
    d = DaemonProc(tmp_path, engine="mflux", extra_env={"LORAD_QUEUE": redis_server.url,
                   "LORAD_LOCAL_WORKER": "false", "LORAD_UI": f"127.0.0.1:{port}",
                   "LORAD_UI_TOKEN": "s3cret-token-0123456789"})  # fmt: skip
    dataset = make_dataset(tmp_path / "outside" / "ohwx_alice", images=3)
    try:
        d.start()
        settings_file = d.state / "daemon-settings.json"
        assert stat.S_IMODE(settings_file.stat().st_mode) == 0o600
        assert (
            json.loads(settings_file.read_text())["settings"]["ui_token"] == "s3cret-token-0123456789"
        )  # real values

        status = _cli(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        assert f"daemon: running (pid {d.proc.pid}), model tiny-z-image from LORAD_MODEL" in status.stdout
        daemon = json.loads(_cli(tmp_path, "status", "--json").stdout)["daemon"]
        assert daemon == {"pid": d.proc.pid, "model": "tiny-z-image", "model_source": "LORAD_MODEL"}

        plan = _cli(tmp_path, "plan", str(dataset), "--json")
        assert plan.returncode == 0, plan.stderr
        assert json.loads(plan.stdout)["model"] == "tiny-z-image"
        assert "using the running daemon's settings (model tiny-z-image from LORAD_MODEL" in plan.stderr

        out = _pty_run(tmp_path, ["enqueue", str(dataset)], _clean_env(), answers=2)
        assert "tiny-z-image" in out, out

        ui = _cli(tmp_path, "ui", "--print")
        assert ui.stdout.strip() == f"http://127.0.0.1:{port}/?token=***", ui.stdout
        assert "not running" not in ui.stderr

        workers = _cli(tmp_path, "workers")
        assert workers.returncode == 0, workers.stderr
        assert "queue: redis://127.0.0.1" in workers.stdout

        config = _cli(tmp_path, "config")
        assert config.returncode == 0, config.stderr
        lines = {line.split()[0]: line for line in config.stdout.splitlines()[1:]}
        assert "tiny-z-image" in lines["model"] and "(daemon: LORAD_MODEL)" in lines["model"]
        assert "***" in lines["ui_token"] and "s3cret" not in config.stdout
        # A command's own environment still wins over the daemon's settings.
        own = _cli(tmp_path, "config", env=_clean_env(LORAD_MODEL="z-image-turbo"))
        assert "z-image-turbo  (LORAD_MODEL)" in own.stdout
    finally:
        d.stop()
    assert not settings_file.exists()  # a stopped daemon leaves no settings behind
    after = _cli(tmp_path, "config")
    assert "daemon: not running" in after.stdout and "z-image-turbo  (default)" in after.stdout


def test_a_daemon_elsewhere_is_found_through_the_pointer(tmp_path):
    """A daemon started with another assets folder: a plain command in the project finds it."""
    project = tmp_path / "project"  # no assets folder yet: the default state dir is lorad's own to create
    project.mkdir()
    d = DaemonProc(tmp_path / "elsewhere")
    d.env.update({"LORAD_UI": "false"})
    d.env.pop("LORAD_REGISTRY")
    d.proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"], cwd=project, env=d.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        from conftest import wait_for

        wait_for(lambda: d.log_has("daemon.started", pid=d.proc.pid), 60, message="daemon start")
        pointer = project / "assets" / ".lorad" / "daemon-pointer.json"
        assert stat.S_IMODE(pointer.stat().st_mode) == 0o600
        status = _cli(project, "status")
        assert f"running (pid {d.proc.pid}), model tiny-z-image from LORAD_MODEL" in status.stdout
        config = _cli(project, "config")
        assert str(d.assets) in config.stdout and "(daemon: LORAD_ASSETS)" in config.stdout
    finally:
        d.stop()
    assert not (project / "assets" / ".lorad" / "daemon-pointer.json").exists()


def test_run_prints_the_dashboard_url(tmp_path):
    d = DaemonProc(tmp_path, extra_env={"LORAD_UI": "127.0.0.1:0"})
    try:
        d.start()
        text = d.out.name
    finally:
        d.stop()
    assert "dashboard http://127.0.0.1:" in Path(text).read_text(), Path(text).read_text()


_ = ROOT


# -- 2. outputs that stay true ----------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_after_a_retrain_the_older_job_names_its_versioned_lora(daemon_factory):
    """Acceptance: the older job's status, DONE and page name `<name>.v1.safetensors`, and that
    file holds the older LoRA (sha256 as published)."""
    import urllib.request

    from conftest import wait_for

    from daemon.sample import make_dataset

    d = daemon_factory(extra_env={"LORAD_UI": "127.0.0.1:0"}).start()
    first_folder = make_dataset(d.training_data / "ohwx_carol", images=2)
    (first_folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_carol") == "done", 120, message="first")
    loras = d.assets / "loras"
    first_sha = _sha256(loras / "carol.safetensors")
    second_folder = make_dataset(
        d.training_data / "sks_carol", images=3, seed=7
    )  # another dataset, same name
    (second_folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("sks_carol") == "done", 120, message="second")
    old = next(j for j in d.jobs() if j["dataset"] == "ohwx_carol")
    versioned = loras / "carol.v1.safetensors"
    assert old["outputs"]["lora"] == str(versioned)
    assert old["outputs"]["render"] == str(loras / "carol.v1.png")
    assert _sha256(versioned) == first_sha
    done = (first_folder / "DONE").read_text()
    assert f"lora: {versioned}" in done and "carol.safetensors" not in done.replace("carol.v1.", "")
    registry = json.loads(d.registry.read_text())["loras"]
    assert registry[old["outputs"]["registry_key"]]["path"] == str(versioned)
    with urllib.request.urlopen(d.ui_url().rstrip("/") + f"/jobs/{old['id']}", timeout=30) as page:
        html = page.read().decode()
    assert "carol.v1.safetensors" in html
    new = next(j for j in d.jobs() if j["dataset"] == "sks_carol")
    assert new["outputs"]["lora"] == str(loras / "carol.safetensors")
    assert f"lora: {loras / 'carol.safetensors'}" in (second_folder / "DONE").read_text()


def test_moved_outputs_is_pure_and_idempotent(tmp_path):
    from daemon.publish import moved_outputs

    loras = tmp_path / "loras"
    outputs = {"lora": str(loras / "a.safetensors"), "render": str(loras / "a.png"), "registry": "/r.json",
               "report": str(loras / "a.report"), "previous": str(loras / "a.v1.safetensors")}  # fmt: skip
    moved = moved_outputs(outputs, loras, "a.v2", "a.v2")
    assert moved == {"lora": str(loras / "a.v2.safetensors"), "render": str(loras / "a.v2.png"),
                     "registry": "/r.json", "report": str(loras / "a.v2.report"), "registry_key": "a.v2"}  # fmt: skip
    assert moved_outputs(moved, loras, "a.v2", "a.v2") is None


# -- 3. the service carries its environment -----------------------------------------------------


def test_service_print_carries_env_with_secrets_masked(tmp_path):
    """Acceptance: both variables printed, the key masked."""
    result = _cli(tmp_path, "--assets", str(tmp_path / "a"), "service", "print", "--platform", "launchd",
                  "--env", "FAL_KEY=k-very-secret", "--env", "HF_HOME=/x")  # fmt: skip
    assert result.returncode == 0, result.stderr
    import plistlib

    env = plistlib.loads(result.stdout.encode())["EnvironmentVariables"]
    assert env["FAL_KEY"] == "***" and env["HF_HOME"] == "/x"
    assert "k-very-secret" not in result.stdout
    unit = _cli(tmp_path, "service", "print", "--platform", "systemd", "--env", "HF_TOKEN",
                "--env", "LORAD_QUEUE=redis://:pw@h:6379/0", env=_clean_env(HF_TOKEN="hf_abc"))  # fmt: skip
    assert unit.returncode == 0, unit.stderr
    assert 'Environment="HF_TOKEN=***"' in unit.stdout and "hf_abc" not in unit.stdout
    assert 'Environment="LORAD_QUEUE=redis://:***@h:6379/0"' in unit.stdout


def test_service_install_writes_env_unmasked_0600(tmp_path):
    import plistlib

    from daemon.service import Launchd, Paths, Runner, Systemd, launchd_plist_path, systemd_unit_path
    from daemon.settings import Settings

    class Fake(Runner):
        def __call__(self, *cmd, check=True):
            self.calls.append(list(cmd))
            return subprocess.CompletedProcess(list(cmd), 0, "", "")

    paths = Paths(lorad=tmp_path / "bin" / "lorad", assets=tmp_path / "assets", workdir=tmp_path,
                  logs=tmp_path / "logs", home=tmp_path / "home",
                  env={"FAL_KEY": "k-very-secret", "HF_HOME": "/x", "P": 'a"b%c'})  # fmt: skip
    settings = Settings(assets=tmp_path / "assets")
    Launchd(settings, paths, Fake(), uid=501).install()
    plist_path = launchd_plist_path(paths)
    assert stat.S_IMODE(plist_path.stat().st_mode) == 0o600
    env = plistlib.loads(plist_path.read_bytes())["EnvironmentVariables"]
    assert env["FAL_KEY"] == "k-very-secret" and env["HF_HOME"] == "/x" and "PATH" in env
    Systemd(settings, paths, Fake()).install()
    unit = systemd_unit_path(paths)
    assert stat.S_IMODE(unit.stat().st_mode) == 0o600
    text = unit.read_text()
    assert 'Environment="FAL_KEY=k-very-secret"' in text and 'Environment="P=a\\"b%%c"' in text


@pytest.mark.parametrize(
    "items, environ, want",
    [
        (["A=1", "B=x=y"], {}, {"A": "1", "B": "x=y"}),
        (["HF_HOME"], {"HF_HOME": "/h"}, {"HF_HOME": "/h"}),
        (["A="], {}, {"A": ""}),
        (["MISSING"], {}, "not set in this shell"),
        (["1BAD=x"], {}, "expected NAME=VALUE"),
        (["A=x\ny"], {}, "line break"),
    ],
)
def test_parse_env(items, environ, want):
    from daemon.service import parse_env

    if isinstance(want, dict):
        assert parse_env(items, environ) == want
    else:
        with pytest.raises(ValueError, match=want):
            parse_env(items, environ)


@pytest.mark.parametrize(
    "sub, warned",
    [("Documents/lorad", "~/Documents"), ("Desktop", "~/Desktop"), ("Downloads/x/y", "~/Downloads"),
     ("Library/Mobile Documents/com~apple~CloudDocs/lorad", "iCloud Drive"), ("code/lorad", None),
     ("DocumentsX/lorad", None)],
)  # fmt: skip
def test_protected_folder_warning(tmp_path, sub, warned):
    from daemon.service import protected_folder_warning

    home = tmp_path / "home"
    text = protected_folder_warning(home / sub, home, "checkout")
    if warned is None:
        assert text is None
    else:
        assert warned in text and "Full Disk Access" in text and "move it" in text


def test_doctor_and_install_warn_about_a_protected_checkout(tmp_path, monkeypatch):
    from daemon.doctor import folder_checks
    from daemon.settings import Settings

    home = tmp_path / "home"
    checkout = home / "Documents" / "lorad"
    checkout.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(checkout)
    checks = folder_checks(Settings(assets=checkout / "assets"), "darwin")
    assert [c.name for c in checks] == ["folders", "folders"]
    assert "~/Documents" in checks[0].detail and folder_checks(Settings(), "linux") == []
    result = _cli(checkout, "service", "install", "--platform", "launchd", "--dry-run",
                  env=_clean_env(HOME=str(home)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "warning" in result.stderr and "~/Documents" in result.stderr and "Full Disk Access" in result.stderr
    )


# -- 4. weights = everything the engine loads ---------------------------------------------------

TURBO_PIN = "f332072aa78be7aecdf3ee76d5c247082da564a6"
ADAPTER_REPO, ADAPTER_FILE = (
    "ostris/zimage_turbo_training_adapter",
    "zimage_turbo_training_adapter_v2.safetensors",
)


def _fake_model(hub: Path) -> None:
    snapshot = hub / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / TURBO_PIN
    for folder in ("transformer", "text_encoder", "vae"):
        (snapshot / folder).mkdir(parents=True)
        (snapshot / folder / "model.safetensors").write_bytes(b"x")


def _fake_adapter(hub: Path) -> Path:
    path = hub / f"models--{ADAPTER_REPO.replace('/', '--')}" / "snapshots" / ("1" * 40) / ADAPTER_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"adapter")
    return path


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """A fake Hugging Face cache holding the Z-Image-Turbo repo but not the training adapter."""
    env = {"HF_HOME": str(tmp_path / "hf"), "MFLUX_CACHE_DIR": str(tmp_path / "mflux")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _fake_model(tmp_path / "hf" / "hub")
    return env


def test_training_extras_match_mflux():
    """The adapter lorad checks is the one mflux's training runner loads (guards an upgrade)."""
    import importlib.util

    from engines.mflux.weights import TRAINING_EXTRAS

    spec = importlib.util.find_spec("mflux")
    source = Path(spec.submodule_search_locations[0], "models", "common", "training", "runner.py").read_text()
    repo, filename = TRAINING_EXTRAS["z-image-turbo"][0]
    assert f'ZIMAGE_TURBO_TRAINING_ADAPTER = "{repo}:{filename}"' in source


def test_weights_check_names_the_missing_adapter_and_its_fetch_command(hf_env, tmp_path):
    from engines.mflux.weights import find_extra, weights_check

    check = weights_check("z-image-turbo", hf_env)
    assert check.status.value == "warn"
    assert (
        ADAPTER_REPO in check.detail and f"uv run hf download {ADAPTER_REPO} {ADAPTER_FILE}" in check.detail
    )
    assert "Tongyi-MAI/Z-Image-Turbo --revision" not in check.detail  # the model itself is there
    path = _fake_adapter(tmp_path / "hf" / "hub")
    assert find_extra(ADAPTER_REPO, ADAPTER_FILE, hf_env) == path
    assert weights_check("z-image-turbo", hf_env).status.value == "ok"
    assert weights_check("z-image", hf_env).status.value == "warn"  # no adapter needed, but no repo


def test_doctor_names_the_missing_adapter(hf_env, tmp_path):
    result = _cli(tmp_path, "--assets", str(tmp_path / "assets"), "doctor", env=_clean_env(**hf_env))
    line = next(line for line in result.stdout.splitlines() if "] model" in line)
    assert line.startswith("[warn]") and ADAPTER_REPO in line, line
    assert f"uv run hf download {ADAPTER_REPO} {ADAPTER_FILE}" in line


def test_intake_flags_missing_weights_in_queued_and_status(hf_env, tmp_path):
    from daemon.intake.take import Intake
    from daemon.jobs import JobStore
    from daemon.sample import make_dataset
    from daemon.settings import Settings
    from daemon.status import render_status

    settings = Settings(assets=tmp_path / "assets", engine="mflux", model="z-image-turbo")
    settings.training_data.mkdir(parents=True)
    store = JobStore(settings.jobs_db, jobs_dir=settings.jobs_dir)
    queued: list = []
    folder = make_dataset(settings.training_data / "ohwx_alice", images=2)
    (folder / "READY").write_text("")
    outcome = Intake(settings, store, lambda *args: queued.append(args)).take(folder)
    assert outcome.status == "queued" and queued  # it still waits
    marker = (folder / "QUEUED").read_text()
    assert ADAPTER_REPO in marker and f"hf download {ADAPTER_REPO} {ADAPTER_FILE}" in marker
    job = store.get(outcome.job_id)
    assert ADAPTER_REPO in job.to_dict()["settings"]["weights_missing"]
    text = render_status([job], show_all=True, as_json=False, daemon_pid=None, now=time.time())
    assert ADAPTER_REPO in text and ADAPTER_FILE in text


def test_a_job_never_reaches_the_network(hf_env, tmp_path):
    """The training child runs with the Hub offline unless download_models = true, and a job
    whose adapter is missing fails before any child starts, naming it and its fetch command."""
    from engines.base import EngineContext, TrainingPlan
    from engines.mflux.engine import MFluxEngine

    engine = MFluxEngine(EngineContext(state_dir=tmp_path / "state"))
    assert engine._env()["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in MFluxEngine(EngineContext(state_dir=tmp_path, download_models=True))._env()
    plan = TrainingPlan(
        engine="mflux", model="z-image-turbo", backend="cpu", tier="t", reason="", total_steps=4
    )
    problem = engine.prepare(plan)
    assert problem and ADAPTER_REPO in problem and f"hf download {ADAPTER_REPO} {ADAPTER_FILE}" in problem
    assert MFluxEngine(EngineContext(state_dir=tmp_path, download_models=True)).prepare(plan) is None


# -- 5. retention -------------------------------------------------------------------------------

DAY = 86400.0


def _job_row(job_id: str, state: str, finished_at: float | None, **settings) -> dict:
    return dict(id=job_id, dataset=f"ohwx_{job_id}", dataset_path=f"/nowhere/ohwx_{job_id}", name=job_id,
                trigger_word="ohwx", fingerprint=f"fp-{job_id}", settings=json.dumps(settings), state=state,
                ready_at=(finished_at or time.time()) - 60, created_at=(finished_at or time.time()) - 60,
                finished_at=finished_at, outputs="{}")  # fmt: skip


def _workdir(jobs_dir: Path, job_id: str, *, cloud: bool = False) -> Path:
    workdir = jobs_dir / job_id
    for rel, data in (("data/0001.png", b"p" * 1000), ("train/checkpoints/0000004_checkpoint.zip", b"c" * 5000),
                      ("render/lora.png", b"r"), ("render/compare.png", b"r"), ("progress.jsonl", b"{}\n"),
                      ("job.json", b"{}"), ("manifest.json", b"{}"), ("plan.json", b"{}"),
                      ("adapter.safetensors", b"a" * 3000), ("train.log", b"log")):  # fmt: skip
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes(data)
    if cloud:
        (workdir / "fal").mkdir()
        (workdir / "fal" / "request.json").write_text('{"request_id": "r1", "endpoint": "e"}')
        (workdir / "fal" / "dataset.zip").write_bytes(b"z" * 2000)
    return workdir


@pytest.fixture
def full_state(tmp_path):
    """A state dir with 55 done jobs (one every 6 hours), a queued, a training and an interrupted
    job, a recent cancelled one, an old failed one with a pending cloud request, and LoRAs."""
    from daemon.jobs import JobStore
    from daemon.settings import Settings

    settings = Settings(assets=tmp_path / "assets")
    settings.loras.mkdir(parents=True)
    for i in range(3):
        (settings.loras / f"l{i}.safetensors").write_bytes(b"lora" * 100)
    store = JobStore(settings.jobs_db, jobs_dir=settings.jobs_dir, write_markers=False)
    now = time.time()
    for i in range(55):
        store.adopt(_job_row(f"done{i:02d}", "done", now - i * DAY / 4))
        _workdir(settings.jobs_dir, f"done{i:02d}")
    for state in ("queued", "training", "interrupted"):
        store.adopt(_job_row(state, state, None))
        _workdir(settings.jobs_dir, state)
    store.adopt(_job_row("cancelled", "cancelled", now - 2 * DAY))
    _workdir(settings.jobs_dir, "cancelled")
    store.adopt(_job_row("cloudfail", "failed", now - 30 * DAY))
    _workdir(settings.jobs_dir, "cloudfail", cloud=True)
    store.close()
    return settings


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_prune_dry_run_lists_and_changes_nothing(full_state, tmp_path):
    from conftest import tree_hash

    before = tree_hash(full_state.state, skip=("jobs.db-wal", "jobs.db-shm"))
    result = _cli(tmp_path, "--assets", str(full_state.assets), "prune", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "done50" in out and "done54" in out and "cloudfail" in out and "would free" in out
    assert str(full_state.jobs_dir / "done30" / "data") in out  # 7.5 days old: trimmed
    for kept in ("queued", "training", "interrupted", "cancelled", "done00", "done27"):
        assert f"{kept}  " not in out, out
    assert tree_hash(full_state.state, skip=("jobs.db-wal", "jobs.db-shm")) == before


def test_prune_keeps_running_queued_interrupted_and_loras(full_state, tmp_path):
    from daemon.jobs import JobStore

    loras_before = _tree(full_state.loras)
    untouched = {
        n: _tree(full_state.jobs_dir / n)
        for n in ("queued", "training", "interrupted", "cancelled", "done00")
    }
    result = _cli(tmp_path, "--assets", str(full_state.assets), "prune")
    assert result.returncode == 0, result.stderr
    assert _tree(full_state.loras) == loras_before
    for name, tree in untouched.items():
        assert _tree(full_state.jobs_dir / name) == tree, name
    for i in range(49, 55):  # beyond keep_jobs: work dir gone, row hidden but its fingerprint kept
        assert not (full_state.jobs_dir / f"done{i}").exists()
    trimmed = sorted(p.name for p in (full_state.jobs_dir / "done30").iterdir())
    assert trimmed == ["job.json", "manifest.json", "plan.json", "progress.jsonl", "render"]
    cloud = _tree(full_state.jobs_dir / "cloudfail")
    assert set(cloud) == {"job.json", "fal/request.json"}  # the pending request's record stays
    store = JobStore(full_state.jobs_db, check=False)
    listed = {j.id for j in store.list()}
    # the newest 50 finished: done00..done48 and the cancelled one (2 days old)
    assert "done49" not in listed and "cloudfail" not in listed and "done48" in listed
    assert len([j for j in store.list() if j.state in ("done", "failed", "cancelled")]) == 50
    assert store.done_with_fingerprint("fp-done52").id == "done52"  # an unchanged re-drop stays unchanged
    again = _cli(tmp_path, "--assets", str(full_state.assets), "prune", "--dry-run")
    assert "in 0 job(s)" in again.stdout, again.stdout  # idempotent


@pytest.mark.parametrize(
    "ages, keep_jobs, keep_days, want",
    [
        ([1, 2, 3], 2, 7, [("j2", "drop")]),
        ([1, 8], 50, 7, [("j1", "trim")]),
        ([1, 8], 1, 7, [("j1", "drop")]),
        ([8], 0, 7, [("j0", "drop")]),
    ],
)
def test_decide_table(ages, keep_jobs, keep_days, want):
    from daemon.jobs import Job
    from daemon.retention import decide

    now = 1_800_000_000.0
    jobs = [Job(id=f"j{i}", state="done", finished_at=now - age * DAY, updated_at=now, settings="{}")
            for i, age in enumerate(ages)]  # fmt: skip
    jobs.append(Job(id="q", state="queued", finished_at=None, updated_at=now - 99 * DAY, settings="{}"))
    assert [(j, k) for j, k, _ in decide(jobs, now=now, keep_jobs=keep_jobs, keep_days=keep_days)] == want


def test_retry_refuses_a_pruned_work_dir(full_state, tmp_path):
    result = _cli(tmp_path, "--assets", str(full_state.assets), "--log-level", "INFO", "prune")
    assert result.returncode == 0
    env = _clean_env(LORAD_KEEP_WORKDIRS_DAYS="1")
    result = _cli(tmp_path, "--assets", str(full_state.assets), "prune", env=env)
    assert "cancelled" in result.stdout
    retry = _cli(tmp_path, "--assets", str(full_state.assets), "retry", "cancelled")
    assert retry.returncode == 2 and "pruned" in retry.stderr and "READY" in retry.stderr


def test_an_unchanged_redrop_of_a_pruned_job_stays_unchanged(tmp_path):
    from daemon import retention
    from daemon.intake.take import Intake
    from daemon.jobs import JobStore
    from daemon.sample import make_dataset
    from daemon.settings import Settings

    settings = Settings(assets=tmp_path / "assets", engine="scripted", model="tiny-z-image", keep_jobs=0)
    settings.training_data.mkdir(parents=True)
    store = JobStore(settings.jobs_db, jobs_dir=settings.jobs_dir)
    intake = Intake(settings, store, lambda *args: None)
    folder = make_dataset(settings.training_data / "ohwx_alice", images=2)
    (folder / "READY").write_text("")
    job_id = intake.take(folder).job_id
    store.update(job_id, state="done", finished_at=time.time() - 1)
    actions, _ = retention.prune(settings, store)
    assert [a.kind for a in actions] == ["drop"] and not (settings.jobs_dir / job_id).exists()
    assert store.list() == []
    (folder / "READY").write_text("")
    outcome = intake.take(folder)
    assert outcome.status == "unchanged" and outcome.job_id == job_id


# -- 6. plans that answer -----------------------------------------------------------------------


def test_plan_refuses_without_a_folder_unless_images(tmp_path):
    result = _cli(tmp_path, "--assets", str(tmp_path / "assets"), "plan")
    assert result.returncode == 2 and "--images N" in result.stderr
    result = _cli(
        tmp_path, "--assets", str(tmp_path / "assets"), "--model", "tiny-z-image", "plan", "--images", "7"
    )
    assert result.returncode == 0, result.stderr
    assert "7 images" in result.stdout
    duration = next(line for line in result.stdout.splitlines() if line.startswith("duration"))
    assert "derived" in duration and "s/step" in duration


def test_plan_duration_recorded_from_finished_jobs_here(tmp_path):
    from daemon.estimate import estimate, series_rate
    from daemon.jobs import Job
    from engines.base import TrainingPlan

    assert series_rate([{"step": 1, "t": 10.0}, {"step": 5, "t": 30.0}]) == 5.0
    assert series_rate([{"step": 3, "t": 10.0}]) is None
    plan = TrainingPlan(
        engine="mflux", model="tiny-z-image", backend="cpu", tier="tiny", reason="", total_steps=10
    )
    same = {"model": "tiny-z-image", "tier": "tiny", "backend": "cpu"}
    jobs = []
    for i, (plan_fields, rate) in enumerate([(same, 2.0), ({**same, "backend": "cuda"}, 0.1), (same, 4.0)]):
        jobs.append(Job(id=f"j{i}", state="done", finished_at=float(i), plan=json.dumps(plan_fields)))
        series = tmp_path / f"j{i}" / "progress.jsonl"
        series.parent.mkdir()
        series.write_text(
            "".join(json.dumps({"step": s, "loss": 0.1, "t": 100 + s * rate}) + "\n" for s in (1, 2, 3))
        )
    seconds, source, words = estimate(plan, jobs, tmp_path)
    assert source == "recorded" and seconds == 30.0 and "2 finished job(s)" in words  # median of 2 and 4
    seconds, source, _ = estimate(plan, [], tmp_path)
    assert source == "derived" and seconds > 0


@pytest.mark.parametrize(
    "available, total, need, close",
    [(23, 24, 11, False), (12, 16, 11, True), (10, 16, 11, True), (15, 16, 11, False)],
)
def test_memory_warning_worded_by_headroom(available, total, need, close):
    from engines.mflux.memory_plan import headroom_words

    words = headroom_words(available, total, need)
    assert ("close other apps" in words) is close, words
    assert f"{available} of {total} GB free" in words


# -- 7. papercuts -------------------------------------------------------------------------------


def test_logs_job_honours_n(tmp_path):
    import io

    from daemon.logview import show

    log = tmp_path / "lorad.jsonl"
    lines = [json.dumps({"event": f"e{i}", "job_id": "jobX" if i % 3 == 0 else "other", "level": "info"})
             for i in range(300)]  # fmt: skip
    log.write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    show(log, lines=2, follow=False, job="jobX", raw=True, out=out)
    shown = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert shown == ["e294", "e297"]
    out = io.StringIO()
    show(log, lines=3, follow=False, job=None, raw=True, out=out)
    assert len(out.getvalue().splitlines()) == 3


def test_marker_refresh_default_is_5_s():
    from daemon.settings import Settings

    assert Settings().marker_refresh_s == 5.0


@pytest.mark.parametrize(
    "kind_line, images, warned",
    [("", 3, "character"), ("", 12, None), ('kind = "style"\n', 12, "style"), ('kind = "style"\n', 25, None),
     ('kind = "character"\n', 12, None)],
)  # fmt: skip
def test_image_count_advice_depends_on_kind(tmp_path, kind_line, images, warned):
    from daemon.intake.validate import validate_dataset
    from daemon.sample import make_dataset

    folder = make_dataset(tmp_path / "ohwx_alice", images=images)
    (folder / "lora.toml").write_text(kind_line)
    report = validate_dataset(folder, read_ready=False)
    few = [f.message for f in report.warnings if f.code == "folder.few"]
    assert report.valid
    if warned is None:
        assert few == []
    else:
        assert len(few) == 1 and warned in few[0]


def test_unknown_kind_is_refused_naming_the_key(tmp_path):
    from daemon.intake.validate import validate_dataset
    from daemon.sample import make_dataset

    folder = make_dataset(tmp_path / "ohwx_alice", images=2)
    (folder / "lora.toml").write_text('kind = "landscape"\n')
    report = validate_dataset(folder, read_ready=False)
    assert not report.valid and any("'kind'" in f.message for f in report.errors)


def test_plan_disk_estimate_counts_the_work_dir_left_behind(tmp_path):
    from daemon.sample import make_dataset

    folder = make_dataset(tmp_path / "ohwx_alice", images=3)
    data = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    args = ("--assets", str(tmp_path / "assets"), "--model", "tiny-z-image", "plan")
    result = _cli(tmp_path, *args, str(folder), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["workdir_bytes"] > data and plan["keep_workdirs_days"] == 7
    text = _cli(tmp_path, *args, "--images", "4").stdout
    assert "disk         about" in text and "keep_workdirs_days" in text


def test_service_names_the_lorad_variables_it_would_not_carry():
    from daemon.service import env_not_carried

    sources = {
        "model": "daemon: LORAD_MODEL",
        "queue": "LORAD_QUEUE",
        "assets": "LORAD_ASSETS",
        "ui": "default",
    }
    assert env_not_carried(sources, {}) == ["LORAD_MODEL", "LORAD_QUEUE"]
    assert env_not_carried(sources, {"LORAD_MODEL": "x"}) == ["LORAD_QUEUE"]
