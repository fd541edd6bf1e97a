from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Real redis-server fixtures (scale-out tests): redis_server, redis_factory.
from redis_fixture import redis_factory, redis_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

# The first-run kernel compile costs 10+ s per process; tests run many short trainings.
os.environ["MLX_DISABLE_COMPILE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download weights in tests

# The dev and CI machines export PYTHONDONTWRITEBYTECODE=1 and uv installs without bytecode
# (pyproject.toml says why): every daemon, worker and CLI process a test starts would compile what
# it imports from source again (redis alone: 0.5 s of CPU; a daemon start: 1.1 s), hundreds of
# times a run. The processes of the tests cache bytecode, as Python does on a user's machine.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LORAD_"):
            monkeypatch.delenv(name)


def _temp_of(name: str, skip: tuple[str, ...]) -> bool:
    """lorad's atomic-write temp of a skipped file (`.<name>.<pid>.<hex>.tmp`), e.g. a marker
    being written by a running daemon at the moment the test hashes the folder."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{s}.") for s in skip)


def tree_hash(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of a folder's names, file bytes and link targets (entries named in `skip`, and lorad's
    temp files of those, left out)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.name in skip or _temp_of(path.name, skip):
            continue
        h.update(str(path.relative_to(folder)).encode("utf-8", "surrogateescape"))
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


POLL_COST_SHARE = 4  # a poll may take at most 1/4 of the waiting time (sleep >= 3x its cost)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until truthy. An expensive predicate (a `lorad status` process, ~0.05 s of
    CPU) is polled less often, so that waiting never takes more than a quarter of a core from the
    processes under test: on the 2-core CI machine polling at a fixed 0.05 s was a third of the
    CPU of the daemon tests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        value = predicate()
        if value:
            return value
        cost = time.monotonic() - started
        time.sleep(max(interval, (POLL_COST_SHARE - 1) * cost))
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


_TINY_MODEL_SHARED: list[Path] = []  # where this run's miniature model is built once (a session fixture)


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_shared_dir(tmp_path_factory):
    """One folder per run for the miniature model, shared by the xdist workers of the run."""
    base = tmp_path_factory.getbasetemp()
    _TINY_MODEL_SHARED[:] = [
        (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-z-image"
    ]


def seed_tiny_model(state_dir: Path) -> None:
    """Give a test's state dir the miniature model lorad would build at its first job (hard links to
    one copy built once a run, by lorad's own `ensure_model`). Building it costs ~2.3 CPU-s in a
    child, and the suite starts dozens of processes that train or render on it. The build itself stays
    tested where a test passes `seed_model=False` (and by `lorad selftest`)."""
    shared = _TINY_MODEL_SHARED[0]
    source = shared / "models" / "tiny-z-image"
    if not (source / "tiny.json").is_file():
        build = [sys.executable, "-m", "engines.mflux.tiny_model", str(shared)]  # as MFluxEngine.prepare
        subprocess.run(build, cwd=ROOT, check=True, capture_output=True, timeout=300)
    target = state_dir / "models" / "tiny-z-image"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, copy_function=os.link)


class LoradProc:
    """A lorad process of a test (daemon or worker): its JSON log, signals and stop."""

    state: Path
    env: dict
    seed_model: bool = True
    proc: subprocess.Popen | None = None

    def _seed_model(self) -> None:
        """The miniature model in place before a process that trains or renders on it starts."""
        needs_mflux = self.env.get("LORAD_ENGINE") != "scripted"  # mflux, or a cloud rendering here
        if self.seed_model and needs_mflux and self.env.get("LORAD_MODEL") == "tiny-z-image":
            seed_tiny_model(Path(self.env.get("LORAD_STATE_DIR") or self.state))

    def events(self) -> list[dict]:
        path = self.state / "logs" / "lorad.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def log_has(self, event: str, **fields) -> bool:
        return any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events()
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "out", None):
            self.out.close()


class DaemonProc(LoradProc):
    """A real `lorad run` in a subprocess on a temp assets dir."""

    def __init__(
        self,
        root: Path,
        *,
        engine: str = "scripted",
        model: str = "tiny-z-image",
        extra_env: dict | None = None,
        preexec_fn=None,
        seed_model: bool = True,
    ):
        self.root, self.seed_model = root, seed_model
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. a lower file limit)
        self.assets = root / "assets"
        self.state = self.assets / ".lorad"
        self.registry = root / "config.json"
        self.env = {
            **os.environ,
            "LORAD_ASSETS": str(self.assets),
            "LORAD_REGISTRY": str(self.registry),
            "LORAD_ENGINE": engine,
            "LORAD_MODEL": model,
            "LORAD_LOG_LEVEL": "DEBUG",
            "LORAD_STOP_TIMEOUT_S": "30",
            "LORAD_MARKER_REFRESH_S": "1",
            # Tests run many daemons at once: the dashboard only where a test asks for it
            # (LORAD_UI=127.0.0.1:0 picks a free port; `ui.started` logs the URL).
            "LORAD_UI": "false",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.training_data.mkdir(parents=True, exist_ok=True)

    @property
    def training_data(self) -> Path:
        return self.assets / "training_data"

    def start(self) -> "DaemonProc":
        self._seed_model()
        self.out = (self.root / f"daemon-{time.time_ns()}.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=self.root,
            env=self.env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        pid = self.proc.pid
        wait_for(
            lambda: self.log_has("daemon.started", pid=pid) or self.proc.poll() is not None,
            30,
            message="daemon start",
        )
        assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}"
        return self

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def ui_url(self) -> str:
        """The dashboard's URL (the daemon was started with LORAD_UI set)."""
        assert self.proc is not None
        pid = self.proc.pid
        started = [e for e in self.events() if e.get("event") == "daemon.started" and e.get("pid") == pid]
        assert started and started[-1].get("ui"), (
            "the dashboard is not running (LORAD_UI unset or ui.unavailable)"
        )
        return started[-1]["ui"]

    def jobs(self) -> list[dict]:
        result = self.cli("status", "--json", "--all")
        return json.loads(result.stdout)["jobs"]

    def job_states(self) -> dict[str, str]:
        return {j["dataset"]: j["state"] for j in self.jobs()}


@pytest.fixture
def daemon_factory(tmp_path):
    """make(**kwargs) -> a daemon on tmp_path; make("sub", ...) -> one on tmp_path/sub (several
    daemons with their own assets folders in one test)."""
    made: list[DaemonProc] = []

    def make(sub: str | None = None, **kwargs) -> DaemonProc:
        root = tmp_path / sub if sub else tmp_path
        root.mkdir(parents=True, exist_ok=True)
        d = DaemonProc(root, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
    assert_no_orphans(tmp_path)


def assert_no_orphans(tmp_path: Path) -> None:
    """No training/render child of a test's processes may outlive it: kill any left, then fail."""
    leftovers = subprocess.run(
        ["pgrep", "-f", f"--job-dir {tmp_path}"], capture_output=True, text=True
    ).stdout.split()
    for pid in leftovers:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"orphan training processes: {leftovers}"


def hold_training_at(d: DaemonProc, step: int) -> Path:
    """Make the daemon's training children hold after `step` until stopped (engines/process/pause_hook.py),
    so a test's stop or kill lands exactly there on a slow CPU and a fast GPU alike. Takes effect
    at the daemon's next start; returns the file the child writes when it holds."""
    pause = d.root / f"held-at-step-{step}.json"
    d.env.update({"LORADTEST_HOLD_AT_STEP": str(step), "LORADTEST_HOLD_FILE": str(pause)})
    return pause


def wait_held(pause: Path, timeout: float = 240) -> int:
    """Wait until a training child holds at its step; returns the child's pid."""
    wait_for(pause.exists, timeout, interval=0.1, message=f"training child holding ({pause.name})")
    return json.loads(pause.read_text())["pid"]


# -- tests/unit is pure ----------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent / "unit"


class ImpureUnitTest(BaseException):
    """A BaseException, so that no `except Exception` in the code under test can swallow it."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise ImpureUnitTest(
            f"{what} in a test under tests/unit (the fast lane is pure: no subprocess, sleep or "
            "socket); move the test to tests/integration or tests/e2e"
        )

    return refuse


UNIT_SLEEP_BUDGET_S = 0.1  # e.g. one poll of a lock lorad waits on; no sleeping-and-hoping


def _sleep_within(budget_s: float):
    real_sleep = time.sleep
    slept = [0.0]

    def sleep(seconds: float) -> None:
        slept[0] += seconds
        if slept[0] > budget_s:
            _refuse(f"time.sleep beyond {budget_s} s in all")()
        real_sleep(seconds)

    return sleep


@pytest.fixture(autouse=True)
def _unit_tests_stay_pure(request, monkeypatch):
    """Under tests/unit, starting a process, opening a network socket or sleeping (beyond one short
    poll of lorad's own) fails the test."""
    if not request.node.path.is_relative_to(UNIT):
        yield
        return
    import socket

    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("a subprocess"))
    monkeypatch.setattr(os, "fork", _refuse("os.fork"))
    monkeypatch.setattr(time, "sleep", _sleep_within(UNIT_SLEEP_BUDGET_S))
    monkeypatch.setattr(socket.socket, "connect", _refuse("a socket connect"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("a socket bind"))
    yield
