"""Service management for real: KeepAlive semantics against the daemon's real exit codes, the unit
through `systemd-analyze verify`, `lorad service print` and `install --dry-run` as processes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.service import Paths, render_launchd, render_systemd
from daemon.settings import Settings


def _paths(tmp_path: Path) -> Paths:
    return Paths(
        lorad=tmp_path / "venv" / "bin" / "lorad",
        assets=tmp_path / "assets",
        workdir=tmp_path,
        logs=tmp_path / "assets" / ".lorad" / "logs",
        home=tmp_path / "home",
    )


def test_keepalive_semantics_match_the_daemons_exit_codes(daemon_factory):
    """KeepAlive {SuccessfulExit: false, Crashed: true}: launchd restarts a non-zero exit or a
    crash, and leaves a zero exit stopped. So a graceful SIGTERM stop must exit 0 and a refusal
    to start (bad state) must not."""
    plist = render_launchd(Settings(), _paths(Path("/x")))
    assert plist["KeepAlive"]["SuccessfulExit"] is False
    d = daemon_factory().start()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0  # stays stopped under launchd
    d.start()
    second = d.cli("run", timeout=30)
    assert second.returncode != 0  # a failure, not a clean stop


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    exe = tmp_path / "venv" / "bin" / "lorad"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "lorad.service"
    unit.write_text(render_systemd(Settings(assets=tmp_path / "assets"), _paths(tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lorad.service" not in result.stderr  # no warnings about our unit either


@pytest.mark.parametrize("platform, marker", [("launchd", "<key>KeepAlive</key>"), ("systemd", "[Service]")])
def test_service_print_works_on_any_os(tmp_path, platform, marker):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--assets",
            str(tmp_path / "a"),
            "service",
            "print",
            "--platform",
            platform,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert not (tmp_path / "a").exists()  # no side effects


def test_service_install_dry_run_prints_commands(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--assets",
            str(tmp_path / "a"),
            "service",
            "install",
            "--platform",
            "launchd",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "$ launchctl bootstrap gui/" in result.stdout and "$ launchctl enable" in result.stdout
