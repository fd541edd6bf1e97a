"""`lorad service`: run lorad as a launchd LaunchAgent (macOS) or a systemd --user unit (Linux).

Rendering is pure (template + absolute paths -> plist dict / unit text). Every launchctl or
systemctl call goes through `Runner`, so tests check the exact commands without macOS, and
`--dry-run` prints them instead of running them.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from daemon.settings import Settings

LABEL = "com.lorad.daemon"
UNIT = "lorad.service"
# `lorad service install --worker`: a scale-out worker (`lorad worker`) beside or instead of the daemon.
WORKER_LABEL = "com.lorad.worker"
WORKER_UNIT = "lorad-worker.service"
TEMPLATE = Path(__file__).resolve().parent.parent / "launchd" / f"{LABEL}.plist"
# Homebrew (Apple Silicon and Intel) first: caffeinate and friends live in /usr/bin anyway.
FILE_LIMIT = 8192  # open files: systemd LimitNOFILE, launchd SoftResourceLimits (its template says the same)
LAUNCHD_PATH = "/opt/homebrew/bin:/opt/homebrew/sbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def exit_timeout(settings: Settings) -> int:
    """SIGTERM -> SIGKILL grace: the daemon's own stop timeout plus room to write the checkpoint."""
    return max(60, int(settings.stop_timeout_s) + 30)


def lorad_executable() -> Path:
    """The venv's `lorad` (absolute): launchd and systemd run it without a shell or PATH lookup."""
    candidate = Path(sys.executable).parent / "lorad"
    if candidate.exists():
        return candidate.absolute()
    found = shutil.which("lorad")
    return Path(found).absolute() if found else candidate.absolute()


@dataclass
class Paths:
    lorad: Path
    assets: Path
    workdir: Path
    logs: Path
    home: Path
    worker: bool = False  # the service runs `lorad worker` (its own state dir)
    state: Path | None = None
    queue: str | None = None  # the worker's queue URL (secret: files written 0600, printed masked)
    # `--env KEY[=VALUE]`: variables the service runs with (FAL_KEY, HF_HOME, LORAD_*); the file
    # is written 0600 with the real values, printed masked (effective.mask_value).
    env: dict[str, str] = field(default_factory=dict)


def paths_for(
    settings: Settings, home: Path | None = None, *, worker: bool = False, queue: str | None = None
) -> Paths:
    if worker:
        state = (settings.state_dir or settings.state / "remote-worker").absolute()
        return Paths(lorad=lorad_executable(), assets=settings.assets.absolute(), workdir=Path.cwd().absolute(),
                     logs=state / "logs", home=(home or Path.home()).absolute(), worker=True, state=state,
                     queue=queue)  # fmt: skip
    return Paths(
        lorad=lorad_executable(),
        assets=settings.assets.absolute(),
        workdir=Path.cwd().absolute(),
        logs=(settings.state / "logs").absolute(),
        home=(home or Path.home()).absolute(),
    )


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(items: list[str], environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """`--env KEY=VALUE` / `--env KEY` (this shell's value) -> {KEY: VALUE} (pure); ValueError
    names the item that is wrong and what to do."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"--env {item!r}: expected NAME=VALUE or NAME (letters, digits, _)")
        if not sep:
            if name not in environ:
                raise ValueError(f"--env {name}: {name} is not set in this shell; give --env {name}=VALUE")
            value = environ[name]
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(
                f"--env {name}: the value holds a line break or NUL, which a service file cannot carry"
            )
        env[name] = value
    return env


def masked_env(env: dict[str, str]) -> dict[str, str]:
    """The variables as printed: secrets (KEY, TOKEN, SECRET, PASSWORD in the name) and passwords
    inside URLs masked."""
    from daemon.effective import mask_value

    return {name: mask_value(name, value) for name, value in env.items()}


def env_not_carried(sources: dict[str, str], env: dict[str, str]) -> list[str]:
    """LORAD_* variables that gave a setting (here or to the running daemon) but are not passed
    with --env: the service would start without them (pure). --assets is on its command line."""
    names = {
        src.rpartition(" ")[2] for src in sources.values() if src.rpartition(" ")[2].startswith("LORAD_")
    }
    return sorted(names - set(env) - {"LORAD_ASSETS"})


PROTECTED_FOLDERS = ("Documents", "Desktop", "Downloads", "Library/Mobile Documents")


def protected_folder_warning(path: Path, home: Path, what: str) -> str | None:
    """macOS (TCC) refuses a LaunchAgent access to ~/Documents, ~/Desktop, ~/Downloads and iCloud
    Drive unless granted: what to grant or where to move when `path` lies there (pure)."""
    for folder in PROTECTED_FOLDERS:
        root = home / folder
        if path == root or root in path.parents:
            shown = "iCloud Drive" if folder.startswith("Library") else f"~/{folder}"
            return (
                f"the {what} ({path}) is in {shown}, which macOS protects: the service cannot read it "
                f"unless you grant Full Disk Access to {lorad_executable().parent / 'python'} (System Settings > "
                f"Privacy & Security > Full Disk Access), or move it out, e.g. to {home / 'lorad'}"
            )
    return None


def protected_warnings(paths: Paths) -> list[str]:
    """The checkout (working directory) and the assets folder, each checked."""
    found = [protected_folder_warning(p.absolute(), paths.home, what)
             for p, what in ((paths.workdir, "checkout"), (paths.assets, "assets folder"))]  # fmt: skip
    return [w for w in found if w]


def _fill(node, values: dict):
    if isinstance(node, str):
        return node.format(**values) if "{" in node else node
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    return node


def render_launchd(settings: Settings, paths: Paths, template: Path = TEMPLATE) -> dict:
    with template.open("rb") as fh:
        plist = plistlib.load(fh)
    values = {
        "label": LABEL,
        "lorad": str(paths.lorad),
        "assets": str(paths.assets),
        "workdir": str(paths.workdir),
        "path": LAUNCHD_PATH,
        "stdout": str(paths.logs / "launchd.out.log"),
        "stderr": str(paths.logs / "launchd.err.log"),
    }
    plist = _fill(plist, values)
    plist["ExitTimeOut"] = exit_timeout(settings)
    if paths.worker:
        plist["Label"] = WORKER_LABEL
        plist["ProgramArguments"] = [str(paths.lorad), "worker", "--state-dir", str(paths.state)]
        if paths.queue:
            plist["EnvironmentVariables"]["LORAD_QUEUE"] = paths.queue
    plist["EnvironmentVariables"].update(paths.env)
    return plist


def worker_env_file(paths: Paths) -> Path:
    """systemd: the worker's LORAD_QUEUE (with its password) lives here, mode 0600, not in the unit."""
    return paths.home / ".config" / "lorad" / "worker.env"


def _masked(text: str, paths: Paths) -> str:
    if paths.queue:
        from daemon.remote.redisurl import mask

        text = text.replace(paths.queue, mask(paths.queue))
    return text


def _systemd_env_lines(env: dict[str, str]) -> str:
    """Environment="NAME=VALUE" lines (systemd quoting: backslash, quote; % doubled)."""
    lines = []
    for name, value in env.items():
        quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        lines.append(f'Environment="{name}={quoted}"\n')
    return "".join(lines)


def render_systemd(settings: Settings, paths: Paths) -> str:
    timeout = exit_timeout(settings)
    if paths.worker:
        return f"""[Unit]
Description=lorad worker - trains jobs from a lorad coordinator's Redis queue
Documentation=file://{paths.workdir / "README.md"}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=simple
ExecStart={paths.lorad} worker --state-dir {paths.state}
WorkingDirectory={paths.workdir}
Environment=PYTHONUNBUFFERED=1
{_systemd_env_lines(paths.env)}# LORAD_QUEUE=redis://... (mode 0600; `lorad service install --worker --queue URL` writes it)
EnvironmentFile=-{worker_env_file(paths)}
Restart=on-failure
RestartSec=30
# SIGTERM: the job checkpoints, its state goes to the coordinator, then the worker exits.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={timeout}
# Open files: the dashboard's connections never take the daemon's descriptors (lorad caps them at
# a quarter of this limit, and raises its soft limit to the hard one at start).
LimitNOFILE={FILE_LIMIT}

[Install]
WantedBy=default.target
"""
    return f"""[Unit]
Description=lorad - hands-off LoRA training daemon
Documentation=file://{paths.workdir / "README.md"}
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=simple
ExecStart={paths.lorad} run --assets {paths.assets}
WorkingDirectory={paths.workdir}
Environment=PYTHONUNBUFFERED=1
{_systemd_env_lines(paths.env)}# Restart after a crash; a graceful stop (exit 0 after SIGTERM) stays stopped.
Restart=on-failure
RestartSec=30
# SIGTERM to the daemon only: it stops the trainer itself after a checkpoint, then exits.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={timeout}
# Open files: the dashboard's connections never take the daemon's descriptors (lorad caps them at
# a quarter of this limit, and raises its soft limit to the hard one at start).
LimitNOFILE={FILE_LIMIT}

[Install]
WantedBy=default.target
"""


def launchd_plist_path(paths: Paths) -> Path:
    return paths.home / "Library" / "LaunchAgents" / f"{WORKER_LABEL if paths.worker else LABEL}.plist"


def systemd_unit_path(paths: Paths) -> Path:
    return paths.home / ".config" / "systemd" / "user" / (WORKER_UNIT if paths.worker else UNIT)


@dataclass
class Runner:
    """The one place launchctl/systemctl run. dry_run prints instead; `calls` records all."""

    dry_run: bool = False
    calls: list[list[str]] = field(default_factory=list)
    out: TextIO | None = None

    def __call__(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        args = list(cmd)
        self.calls.append(args)
        if self.dry_run:
            print("$ " + " ".join(args), file=self.out or sys.stdout)
            return subprocess.CompletedProcess(args, 0, "", "")
        result = subprocess.run(args, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise ServiceError(
                f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
        return result


class ServiceError(Exception):
    pass


def parse_launchctl_print(text: str) -> dict:
    """state, pid and last exit code from `launchctl print gui/<uid>/<label>`."""
    info = {}
    for key, pattern in (
        ("state", r"^\s*state = (.+)$"),
        ("pid", r"^\s*pid = (\d+)$"),
        ("last_exit", r"^\s*last exit code = (.+)$"),
    ):
        match = re.search(pattern, text, flags=re.MULTILINE)
        if match:
            info[key] = match.group(1).strip()
    return info


class Launchd:
    def __init__(self, settings: Settings, paths: Paths, run: Runner, uid: int | None = None):
        self.settings, self.paths, self.run = settings, paths, run
        self.uid = os.getuid() if uid is None else uid
        self.domain = f"gui/{self.uid}"
        self.label = WORKER_LABEL if paths.worker else LABEL
        self.target = f"{self.domain}/{self.label}"

    def render(self) -> str:
        plist = render_launchd(self.settings, self.paths)
        plist["EnvironmentVariables"].update(masked_env(self.paths.env))
        return _masked(plistlib.dumps(plist).decode(), self.paths)

    def install(self) -> None:
        plist = launchd_plist_path(self.paths)
        data = plistlib.dumps(render_launchd(self.settings, self.paths))
        self.run("launchctl", "bootout", self.target, check=False)  # replace a loaded agent cleanly
        if not self.run.dry_run:
            from daemon.fsutil import atomic_write_bytes

            plist.parent.mkdir(parents=True, exist_ok=True)
            (self.paths.logs).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(plist, data, mode=0o600)  # it may hold secrets (queue URL, --env)
        self.run("launchctl", "bootstrap", self.domain, str(plist))
        self.run("launchctl", "enable", self.target)

    def uninstall(self) -> None:
        self.run("launchctl", "bootout", self.target, check=False)
        if not self.run.dry_run:
            launchd_plist_path(self.paths).unlink(missing_ok=True)

    def start(self) -> None:
        self.run("launchctl", "kickstart", self.target)

    def restart(self) -> None:
        self.run("launchctl", "kickstart", "-k", self.target)

    def stop(self) -> None:
        self.run("launchctl", "kill", "SIGTERM", self.target)
        if self.run.dry_run:
            return
        deadline = time.monotonic() + exit_timeout(self.settings)
        while time.monotonic() < deadline:
            info = parse_launchctl_print(self.run("launchctl", "print", self.target, check=False).stdout)
            if "pid" not in info:
                return
            time.sleep(1)
        raise ServiceError(f"lorad did not exit within {exit_timeout(self.settings)} s")

    def status(self) -> str:
        result = self.run("launchctl", "print", self.target, check=False)
        if result.returncode != 0:
            return f"{self.label}: not loaded (lorad service install)"
        info = parse_launchctl_print(result.stdout)
        return f"{self.label}: {info.get('state', '?')}, pid {info.get('pid', '-')}, last exit {info.get('last_exit', '-')}"


class Systemd:
    def __init__(self, settings: Settings, paths: Paths, run: Runner):
        self.settings, self.paths, self.run = settings, paths, run
        self.unit = WORKER_UNIT if paths.worker else UNIT

    def render(self) -> str:
        """The unit as printed: --env secrets masked (install writes the real values)."""
        shown = Paths(**{**self.paths.__dict__, "env": masked_env(self.paths.env)})
        return render_systemd(self.settings, shown)

    def install(self) -> None:
        if not self.run.dry_run:
            from daemon.fsutil import atomic_write_text

            unit = systemd_unit_path(self.paths)
            unit.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(unit, render_systemd(self.settings, self.paths), mode=0o600)
            if self.paths.worker and self.paths.queue:
                env = worker_env_file(self.paths)
                env.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"LORAD_QUEUE={self.paths.queue}\n")
                os.chmod(env, 0o600)
        self.run("systemctl", "--user", "daemon-reload")
        self.run("systemctl", "--user", "enable", "--now", self.unit)

    def uninstall(self) -> None:
        self.run("systemctl", "--user", "disable", "--now", self.unit, check=False)
        if not self.run.dry_run:
            systemd_unit_path(self.paths).unlink(missing_ok=True)
        self.run("systemctl", "--user", "daemon-reload")

    def start(self) -> None:
        self.run("systemctl", "--user", "start", self.unit)

    def stop(self) -> None:
        self.run("systemctl", "--user", "stop", self.unit)  # waits up to TimeoutStopSec

    def restart(self) -> None:
        self.run("systemctl", "--user", "restart", self.unit)

    def status(self) -> str:
        result = self.run(
            "systemctl",
            "--user",
            "show",
            self.unit,
            "-p",
            "ActiveState,SubState,MainPID,ExecMainStatus",
            check=False,
        )
        if result.returncode != 0:
            return f"{self.unit}: unknown ({result.stderr.strip()})"
        fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return (
            f"{self.unit}: {fields.get('ActiveState', '?')}/{fields.get('SubState', '?')}, pid {fields.get('MainPID', '-')}, "
            f"last exit {fields.get('ExecMainStatus', '-')}"
        )


def default_platform() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def manager(settings: Settings, platform: str, run: Runner, paths: Paths | None = None):
    paths = paths or paths_for(settings)
    return Launchd(settings, paths, run) if platform == "launchd" else Systemd(settings, paths, run)


def main(settings: Settings, args) -> int:
    platform = args.platform or default_platform()
    run = Runner(dry_run=args.dry_run)
    worker = bool(getattr(args, "worker", False))
    queue = getattr(args, "queue", None) or (settings.queue if settings.scale_out else None)
    if worker and args.action == "install" and not queue:
        print("lorad service install --worker: needs the queue URL: --queue redis://host:6379/0 "
              "(or the queue setting / LORAD_QUEUE)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        env = parse_env(list(getattr(args, "env", None) or []), os.environ)
    except ValueError as exc:
        print(f"lorad service {args.action}: {exc}", file=sys.stderr)
        return 2
    paths = paths_for(settings, worker=worker, queue=queue)
    paths.env = env
    svc = manager(settings, platform, run, paths)
    if args.action == "install" and platform == "launchd":
        for warning in protected_warnings(paths):
            print(f"lorad service install: warning: {warning}", file=sys.stderr)
    if args.action in ("install", "print"):
        for name in env_not_carried(settings.sources, env):
            print(f"lorad service {args.action}: note: {name} is set here (or in the running daemon) but the "
                  f"service would not see it: add --env {name}", file=sys.stderr)  # fmt: skip
    try:
        if args.action == "print":
            print(svc.render(), end="")
            return 0
        if args.action == "status":
            print(svc.status())  # the jobs follow from commands.cmd_service
            return 0
        getattr(svc, args.action)()
    except ServiceError as exc:
        print(f"lorad service {args.action}: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(
            f"lorad service {args.action}: {exc.filename} is not available on this machine", file=sys.stderr
        )
        return 1
    if not args.dry_run:
        print(f"lorad service {args.action}: ok ({platform})")
    return 0
