"""Settings precedence, structured logs, the CLI's start-up hygiene and doctor."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import logs
from daemon import settings as settings_mod
from daemon.settings import Settings, SettingsError, resolve

# -- settings ------------------------------------------------------------------------------

BASE = Path("/proj")


@pytest.mark.parametrize(
    "file_values, env, flags, key, expected",
    [
        ({}, {}, {}, "model", "z-image-turbo"),
        ({"model": "flux2-klein-4b"}, {}, {}, "model", "flux2-klein-4b"),
        ({"model": "flux2-klein-4b"}, {"LORAD_MODEL": "z-image"}, {}, "model", "z-image"),
        (
            {"model": "flux2-klein-4b"},
            {"LORAD_MODEL": "z-image"},
            {"model": "tiny-z-image"},
            "model",
            "tiny-z-image",
        ),
        ({}, {}, {}, "assets", BASE / "assets"),
        ({"assets": "data/a"}, {}, {}, "assets", BASE / "data/a"),
        ({}, {"LORAD_ASSETS": "/abs/assets"}, {}, "assets", Path("/abs/assets")),
        ({}, {}, {}, "registry", BASE / "config.json"),
        ({}, {"LORAD_LOG_LEVEL": "debug"}, {}, "log_level", "DEBUG"),
        ({"log_level": "WARNING"}, {}, {"log_level": "error"}, "log_level", "ERROR"),
        ({}, {"LORAD_KEEP_AWAKE": "false"}, {}, "keep_awake", False),
        ({"rescan_interval_s": 30}, {}, {}, "rescan_interval_s", 30.0),
        ({}, {}, {"state_dir": None}, "state_dir", None),
    ],
)
def test_precedence(file_values, env, flags, key, expected):
    s = resolve(file_values=file_values, env=env, flags=flags, base=BASE, project_root=BASE)
    assert getattr(s, key) == expected


def test_state_dir_defaults_under_assets():
    s = resolve(base=BASE, project_root=BASE)
    assert s.state == BASE / "assets" / ".lorad"
    assert s.log_file == BASE / "assets" / ".lorad" / "logs" / "lorad.jsonl"
    s = resolve(env={"LORAD_STATE_DIR": "/var/lorad"}, base=BASE)
    assert s.state == Path("/var/lorad")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"file_values": {"modle": "x"}}, ["unknown setting 'modle'", "lorad.toml"]),
        ({"env": {"LORAD_FOO": "1"}}, ["unknown setting 'foo'", "LORAD_FOO"]),
        ({"env": {"LORAD_LOG_LEVEL": "loud"}}, ["log_level", "LORAD_LOG_LEVEL", "DEBUG"]),
        ({"flags": {"log_level": "loud"}}, ["log_level", "--log-level"]),
        ({"file_values": {"rescan_interval_s": "soon"}}, ["rescan_interval_s", "number"]),
        ({"file_values": {"rescan_interval_s": -1}}, ["rescan_interval_s", "greater than 0"]),
        ({"file_values": {"keep_awake": "maybe"}}, ["keep_awake", "true or false"]),
        ({"file_values": {"model": 3}}, ["model", "string"]),
        ({"file_values": {"observer": "magic"}}, ["observer", "polling"]),
        ({"file_values": {"assets": ""}}, ["assets", "path"]),
    ],
)
def test_bad_settings_name_key_and_source(kwargs, words):
    with pytest.raises(SettingsError) as info:
        resolve(base=BASE, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_load_reads_project_file_and_env(tmp_path, monkeypatch):
    (tmp_path / "lorad.toml").write_text('model = "z-image"\nassets = "my_assets"\n')
    monkeypatch.setenv("LORAD_LOG_LEVEL", "WARNING")
    s = settings_mod.load(cwd=tmp_path, flags={"model": "tiny-z-image"})
    assert s.model == "tiny-z-image"
    assert s.assets == tmp_path / "my_assets"
    assert s.log_level == "WARNING"


def _cli(*args, cwd, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_bad_settings_exit_2(tmp_path):
    (tmp_path / "lorad.toml").write_text("nonsense = 1\n")
    result = _cli("status", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown setting 'nonsense'" in result.stderr
    (tmp_path / "lorad.toml").write_text("model = [\n")
    result = _cli("status", cwd=tmp_path)
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    (tmp_path / "lorad.toml").unlink()
    result = _cli("status", cwd=tmp_path, env={"LORAD_LOG_LEVEL": "chatty"})
    assert result.returncode == 2 and "LORAD_LOG_LEVEL" in result.stderr
    result = _cli("--config", str(tmp_path / "missing.toml"), "status", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr


# -- logs ----------------------------------------------------------------------------------


def test_structlog_and_stdlib_lines_are_json(tmp_path):
    log_file = tmp_path / "logs" / "lorad.jsonl"
    stream = io.StringIO()
    logs.configure(level="INFO", log_file=log_file, stream=stream)
    import structlog

    structlog.contextvars.bind_contextvars(job_id="j1", dataset="ohwx_alice")
    try:
        logs.get_logger().info("job.progress", step=3, total=10)
        logging.getLogger("httpx").info(
            "HTTP Request: GET https://fal.example/status 200"
        )  # per-poll chatter: dropped
        logging.getLogger("huey.consumer").warning("worker %s died", "w1")
        try:
            secret = "user-data"  # must not leak into the log as a local
            assert secret
            raise ValueError("boom")
        except ValueError:
            logs.get_logger().exception("job.crashed")
    finally:
        structlog.contextvars.clear_contextvars()
        logs.configure(level="INFO", console=False)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["job.progress", "worker w1 died", "job.crashed"]
    for line in lines:
        assert line["ts"].endswith("Z") and "T" in line["ts"]
        assert line["level"] in ("info", "warning", "error")
    assert lines[0]["job_id"] == "j1" and lines[0]["dataset"] == "ohwx_alice" and lines[0]["step"] == 3
    assert lines[1]["logger"] == "huey.consumer" and lines[1]["job_id"] == "j1"
    exc = lines[2]["exception"]
    assert isinstance(exc, list) and exc[0]["exc_type"] == "ValueError"
    assert "user-data" not in log_file.read_text()
    # Not a TTY: the console gets JSON too.
    assert json.loads(stream.getvalue().splitlines()[0])["event"] == "job.progress"


def test_log_file_rotates_by_size(tmp_path):
    log_file = tmp_path / "lorad.jsonl"
    logs.configure(level="INFO", log_file=log_file, max_bytes=2000, backups=2, console=False)
    try:
        for i in range(100):
            logs.get_logger().info("tick", i=i)
    finally:
        logs.configure(level="INFO", console=False)
    assert (tmp_path / "lorad.jsonl.1").exists()
    assert log_file.stat().st_size <= 2000


# -- CLI -----------------------------------------------------------------------------------

HEAVY = ("mlx", "mflux", "PIL", "transformers", "numpy", "huey", "watchdog")


def test_cli_startup_imports_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "from daemon import cli\n"
        "for argv in (['--help'], ['status', '--help'], ['validate', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: cli.main(argv)\n"
        "        except SystemExit: pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_path_imports_nothing_heavy(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from daemon import cli\n"
        f"cli.main(['--assets', {str(tmp_path)!r}, 'status'])\n"
        f"print(sorted(m for m in {('mlx', 'mflux', 'PIL', 'transformers')!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "command",
    [
        "run",
        "status",
        "validate",
        "enqueue",
        "cancel",
        "retry",
        "plan",
        "logs",
        "service",
        "selftest",
        "doctor",
    ],
)
def test_every_subcommand_has_help(command, tmp_path):
    result = _cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--assets" in result.stdout and "--config" in result.stdout


def test_doctor_reports_this_machine(tmp_path):
    result = _cli(
        "--assets", str(tmp_path / "assets"), "doctor", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("python", "platform", "memory", "disk", "mlx", "mflux", "model"):
        assert f" {name}" in out
    assert "[ok  ] mflux" in out and "[ok  ] mlx" in out
    assert "not Apple Silicon" in out  # Linux CI
    assert "weights are not on this machine" in out and "LORAD_MODEL=tiny-z-image" in out


def test_logs_command_pretty_prints_and_filters(tmp_path):
    state = tmp_path / "assets" / ".lorad" / "logs"
    state.mkdir(parents=True)
    lines = [
        {
            "ts": "2026-01-01T00:00:00Z",
            "level": "info",
            "event": "job.started",
            "job_id": "aaa",
            "dataset": "x_y",
        },
        {
            "ts": "2026-01-01T00:00:01Z",
            "level": "error",
            "event": "job.failed",
            "job_id": "bbb",
            "error": "boom",
        },
    ]
    (state / "lorad.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    result = _cli("--assets", str(tmp_path / "assets"), "logs", "--job", "bbb", cwd=tmp_path)
    assert result.returncode == 0
    assert (
        "job.failed" in result.stdout and "error=boom" in result.stdout and "job.started" not in result.stdout
    )
    raw = _cli("--assets", str(tmp_path / "assets"), "logs", "--json", cwd=tmp_path)
    assert json.loads(raw.stdout.splitlines()[0])["event"] == "job.started"


def test_settings_paths():
    s = Settings(assets=Path("/a"))
    assert s.training_data == Path("/a/training_data") and s.loras == Path("/a/loras")
    assert s.jobs_db == Path("/a/.lorad/jobs.db") and s.queue_db == Path("/a/.lorad/queue.db")
