"""Scale-out with real components: a real redis-server (tests/redis_fixture.py), `lorad run` as
the coordinator and `lorad worker` subprocesses with their own state dirs standing in for
machines. The scripted engine trains; holds (LORADTEST_HOLD_AT_STEP, SCRIPTED_ENGINE_HOLD_DIR)
put every kill and restart at an exact point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProc, wait_for
from daemon.sample import make_dataset


class WorkerProc:
    """A real `lorad worker --queue URL` with its own state dir (another machine)."""

    def __init__(self, root: Path, name: str, url: str, extra_env: dict | None = None):
        self.root, self.name, self.url = root, name, url
        self.state = root / f"worker-{name}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAD_")},
            "LORAD_STATE_DIR": str(self.state),
            "LORAD_ENGINE": "scripted",
            "LORAD_MODEL": "tiny-z-image",
            "LORAD_LOG_LEVEL": "DEBUG",
            "LORAD_LEASE_TTL_S": "3",
            "LORAD_STOP_TIMEOUT_S": "30",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProc":
        self.state.mkdir(parents=True, exist_ok=True)
        self.out = (self.root / f"worker-{self.name}-{time.time_ns()}.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "worker", "--queue", self.url],
            cwd=ROOT, env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        pid = self.proc.pid
        wait_for(lambda: self.log_has("worker.started", pid=pid) or self.proc.poll() is not None, 30, message="worker start")
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
        return self

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
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

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


@pytest.fixture
def cluster(tmp_path, redis_factory):
    """(make_coordinator, make_worker, redis): every process is stopped at teardown, and no
    training child may outlive the test."""
    made: list = []

    def coordinator(redis, *, local_worker: bool = False, extra_env: dict | None = None) -> DaemonProc:
        env = {"LORAD_QUEUE": redis.url, "LORAD_LOCAL_WORKER": str(local_worker).lower(), "LORAD_LEASE_TTL_S": "3",
               **(extra_env or {})}  # fmt: skip
        d = DaemonProc(tmp_path, extra_env=env)
        made.append(d)
        return d

    def worker(redis, name: str, extra_env: dict | None = None) -> WorkerProc:
        w = WorkerProc(tmp_path, name, redis.url, extra_env)
        made.append(w)
        return w

    yield coordinator, worker
    for p in reversed(made):
        p.stop()
    leftovers = subprocess.run(["pgrep", "-f", f"--job-dir {tmp_path}"], capture_output=True, text=True).stdout.split()
    for pid in leftovers:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"orphan training processes: {leftovers}"


def drop(d, name: str, *, images: int = 2, ready: str = "", seed: int = 0) -> Path:
    folder = make_dataset(d.training_data / name, images=images, seed=seed)
    (folder / "READY").write_text(ready)
    return folder


def published(d, name: str) -> list[str]:
    return sorted(p.name for p in (d.assets / "loras").glob(f"{name}*.safetensors"))


def lora_job_id(d, name: str) -> str:
    from daemon.publish import metadata_of

    return metadata_of(d.assets / "loras" / f"{name}.safetensors")["lorad.job_id"]


def test_remote_worker_trains_and_the_coordinator_publishes(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    w = make_worker(redis_server, "a").start()
    folder = drop(d, "ohwx_alice")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 90, message="remote job done")
    job = d.jobs()[0]
    assert job["worker"] and job["worker"].startswith(os.uname().nodename.split(".")[0])
    assert published(d, "alice") == ["alice.safetensors"]
    assert lora_job_id(d, "alice") == job["id"]
    for suffix in (".png", ".compare.png"):
        assert (d.assets / "loras" / f"alice{suffix}").is_file()
    assert list(json.loads(d.registry.read_text())["loras"]) == ["alice"]
    assert (folder / "DONE").exists()
    # The worker trained it; nothing of the job is left on the worker, and it never published.
    assert w.log_has("worker.claimed", job_id=job["id"]) and w.log_has("worker.delivered", job_id=job["id"])
    assert not (w.state / "work" / job["id"]).exists()
    assert not (w.state.parent / "assets").exists() or not list(w.state.rglob("*.safetensors"))
    # Its transfers left Redis when it ended.
    client = redis_server.client()
    assert not list(client.scan_iter(match="lorad:xfer:job:*"))
    assert not client.exists(f"lorad:token:{job['id']}") and not client.exists(f"lorad:lease:{job['id']}")
    # `lorad workers` lists it, idle again.
    out = d.cli("workers").stdout
    assert "idle" in out and "lorad:" not in out
