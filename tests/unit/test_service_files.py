"""Service management, pure parts: the rendered launchd plist and systemd unit, the exact
launchctl/systemctl commands each verb runs (a recorded runner), and parsing `launchctl print`."""

from __future__ import annotations

import plistlib
import subprocess
from pathlib import Path

from daemon import service
from daemon.service import LABEL, Launchd, Paths, Runner, Systemd, render_launchd, render_systemd
from daemon.settings import Settings


def _paths(tmp_path: Path) -> Paths:
    return Paths(
        lorad=tmp_path / "venv" / "bin" / "lorad",
        assets=tmp_path / "assets",
        workdir=tmp_path,
        logs=tmp_path / "assets" / ".lorad" / "logs",
        home=tmp_path / "home",
    )


def test_plist_has_the_keys_types_and_absolute_paths(tmp_path):
    settings = Settings(assets=tmp_path / "assets", stop_timeout_s=60)
    plist = render_launchd(settings, _paths(tmp_path))
    plist = plistlib.loads(plistlib.dumps(plist))  # round-trips as a real plist
    assert plist["Label"] == LABEL and plist["Label"].count(".") >= 2
    args = plist["ProgramArguments"]
    assert args[1:3] == ["run", "--assets"] and all(Path(a).is_absolute() for a in (args[0], args[3]))
    assert Path(plist["WorkingDirectory"]).is_absolute()
    env = plist["EnvironmentVariables"]
    assert "/opt/homebrew/bin" in env["PATH"].split(":") and env["PYTHONUNBUFFERED"] == "1"
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert isinstance(plist["ThrottleInterval"], int)
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] >= 60
    assert plist["ExitTimeOut"] > settings.stop_timeout_s  # the checkpoint fits before SIGKILL
    assert plist["ProcessType"] in ("Interactive", "Standard")
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert (
            Path(plist[key]).is_absolute()
            and Path(plist[key]).parent == tmp_path / "assets" / ".lorad" / "logs"
        )
    assert "~" not in plistlib.dumps(plist).decode()


def test_systemd_unit(tmp_path):
    settings = Settings(assets=tmp_path / "assets", stop_timeout_s=60)
    text = render_systemd(settings, _paths(tmp_path))
    assert f"ExecStart={tmp_path}/venv/bin/lorad run --assets {tmp_path}/assets" in text
    for line in (
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "TimeoutStopSec=90",
        "StartLimitBurst=5",
        "StartLimitIntervalSec=600",
    ):
        assert line in text
    plist = render_launchd(settings, _paths(tmp_path))
    assert f"TimeoutStopSec={plist['ExitTimeOut']}" in text  # the same grace as launchd


def test_launchd_verbs_run_exact_commands(tmp_path):
    run = Runner(dry_run=True, out=open("/dev/null", "w"))
    svc = Launchd(Settings(assets=tmp_path / "assets"), _paths(tmp_path), run, uid=501)
    svc.install()
    svc.start()
    svc.stop()
    svc.restart()
    svc.uninstall()
    plist = str(tmp_path / "home" / "Library" / "LaunchAgents" / f"{LABEL}.plist")
    assert run.calls == [
        ["launchctl", "bootout", f"gui/501/{LABEL}"],
        ["launchctl", "bootstrap", "gui/501", plist],
        ["launchctl", "enable", f"gui/501/{LABEL}"],
        ["launchctl", "kickstart", f"gui/501/{LABEL}"],
        ["launchctl", "kill", "SIGTERM", f"gui/501/{LABEL}"],
        ["launchctl", "kickstart", "-k", f"gui/501/{LABEL}"],
        ["launchctl", "bootout", f"gui/501/{LABEL}"],
    ]
    assert not (tmp_path / "home").exists()  # dry run: no side effects


def test_launchd_install_writes_the_plist(tmp_path):
    class Fake(Runner):
        def __call__(self, *cmd, check=True):
            self.calls.append(list(cmd))
            return subprocess.CompletedProcess(list(cmd), 0, "", "")

    run = Fake()
    paths = _paths(tmp_path)
    Launchd(Settings(assets=tmp_path / "assets"), paths, run, uid=501).install()
    plist = plistlib.loads((paths.home / "Library" / "LaunchAgents" / f"{LABEL}.plist").read_bytes())
    assert plist["ProgramArguments"][0] == str(paths.lorad)
    assert paths.logs.is_dir()  # launchd will not create the log folder itself
    (paths.logs / "lorad.jsonl").write_text("{}\n")
    Launchd(Settings(assets=tmp_path / "assets"), paths, run, uid=501).uninstall()
    assert not (paths.home / "Library" / "LaunchAgents" / f"{LABEL}.plist").exists()
    assert (paths.logs / "lorad.jsonl").read_text() == "{}\n"  # data is kept


def test_systemd_verbs_run_exact_commands(tmp_path):
    run = Runner(dry_run=True, out=open("/dev/null", "w"))
    svc = Systemd(Settings(assets=tmp_path / "assets"), _paths(tmp_path), run)
    svc.install()
    svc.start()
    svc.stop()
    svc.restart()
    svc.uninstall()
    assert run.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "lorad.service"],
        ["systemctl", "--user", "start", "lorad.service"],
        ["systemctl", "--user", "stop", "lorad.service"],
        ["systemctl", "--user", "restart", "lorad.service"],
        ["systemctl", "--user", "disable", "--now", "lorad.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]


def test_parse_launchctl_print():
    text = """gui/501/com.lorad.daemon = {
\tactive count = 1
\tpath = /Users/me/Library/LaunchAgents/com.lorad.daemon.plist
\tstate = running
\tprogram = /Users/me/lorad/.venv/bin/lorad
\tpid = 4242
\tlast exit code = 0
}"""
    assert service.parse_launchctl_print(text) == {"state": "running", "pid": "4242", "last_exit": "0"}
