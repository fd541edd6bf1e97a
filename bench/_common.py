"""Shared helpers for the bench scripts: the RESULT line, a daemon in a temp folder, percentiles."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def result(rid: str, value: float, unit: str, baseline: float, target: str, passed: bool) -> str:
    ratio = value / baseline if baseline else float("nan")
    line = (
        f"RESULT {rid} value={value:.4g} unit={unit} baseline={baseline:.4g} ratio={ratio:.3g} "
        f"target={target} {'PASS' if passed else 'FAIL'}"
    )
    print(line, flush=True)
    return line


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


class Daemon:
    """`lorad run` in a subprocess on a temp assets folder."""

    def __init__(self, root: Path | None = None, **env: str):
        self.root = Path(root or tempfile.mkdtemp(prefix="lorad-bench-"))
        self.assets = self.root / "assets"
        self.state = self.assets / ".lorad"
        self.training_data = self.assets / "training_data"
        self.training_data.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAD_")},
            "LORAD_ASSETS": str(self.assets),
            "LORAD_REGISTRY": str(self.root / "config.json"),
            "LORAD_LOG_LEVEL": "INFO",
            "MLX_DISABLE_COMPILE": "1",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run"],
            cwd=ROOT,
            env=self.env,
            stdout=(self.root / "daemon.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.wait_for(
            lambda: any(
                e["event"] == "daemon.started" and e.get("pid") == self.proc.pid for e in self.events()
            ),
            60,
        )
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

    def jobs(self) -> list[dict]:
        result = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "status", "--json", "--all"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        return json.loads(result.stdout)["jobs"]

    @staticmethod
    def wait_for(predicate, timeout: float, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError("bench: timed out waiting")

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(120)
        return self.proc.returncode if self.proc else 0


def machine() -> str:
    import platform

    import psutil

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 1024**3:.0f} GB RAM, Python {platform.python_version()}"
    )
