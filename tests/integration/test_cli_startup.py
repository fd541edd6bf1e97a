"""The CLI's start-up hygiene (bad settings exit 2, no heavy imports on the start and status paths),
every verb's help, doctor and the logs command: each a real `lorad` process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
