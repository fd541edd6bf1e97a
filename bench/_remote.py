"""Scale-out bench helpers: a throwaway redis-server and `lorad worker` processes (bench P7-P9)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, Daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    """redis-server on a free loopback port, no persistence, in a temp dir."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lorad-bench-redis-"))
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "redis-server is not installed (apt-get install redis-server / brew install redis)"
            )
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    """`lorad worker --queue URL` with its own state dir."""

    def __init__(self, root: Path, name: str, url: str, **env: str):
        self.state = root / f"worker-{name}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAD_")},
            "LORAD_STATE_DIR": str(self.state), "LORAD_LOG_LEVEL": "INFO", "MLX_DISABLE_COMPILE": "1",
            "HF_HUB_OFFLINE": "1", **env,
        }  # fmt: skip
        self.state.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "worker", "--queue", url], cwd=ROOT, env=self.env,
            stdout=(root / f"worker-{name}.out").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        log = self.state / "logs" / "lorad.jsonl"
        Daemon.wait_for(lambda: log.exists() and "worker.started" in log.read_text(), 60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def coordinator(url: str, **env: str) -> Daemon:
    return Daemon(LORAD_QUEUE=url, LORAD_LOCAL_WORKER="false", **env)
