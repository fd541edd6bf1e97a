"""Which MLX device trains here and how much memory the plan may use. Daemon side: no mlx here.

The device is probed once per process in a child (`python -m engines.mflux.probe`, bounded by a
timeout) and cached; the pure `planning_memory` then picks the memory that limits training:
the GPU's on CUDA (never the system RAM), the unified RAM on Metal, the system RAM on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import Machine, PlanError
from lorad_base.childenv import child_env

PROBE_TIMEOUT_S = 120.0  # importing mlx on a cold disk, plus CUDA initialisation
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Device:
    backend: str  # metal | cuda | cpu | unknown
    name: str
    total_gb: float | None = None  # the device's own memory where it has one (CUDA, Metal)
    free_gb: float | None = None  # CUDA only: free GPU memory when probed
    source: str = ""
    mlx: str | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Device:
        if "error" in data and "backend" not in data:
            return cls(backend="unknown", name="unknown", error=str(data["error"]))
        return cls(
            backend=str(data.get("backend", "unknown")),
            name=str(data.get("device", "unknown")),
            total_gb=data.get("total_gb"),
            free_gb=data.get("free_gb"),
            source=str(data.get("source", "")),
            mlx=data.get("mlx"),
        )


@dataclass(frozen=True)
class PlanMemory:
    total_gb: float
    available_gb: float
    label: str  # what the numbers are, for the plan's summary

    def line(self) -> str:
        return f"{self.total_gb:.0f} GB {self.label}, {self.available_gb:.0f} GB free"


def planning_memory(device: Device, machine: Machine) -> PlanMemory:
    """The memory that limits training on this device (pure)."""
    if machine.memory_override_gb is not None:
        gb = machine.memory_override_gb
        return PlanMemory(gb, gb, "(ram_gb setting / --ram-gb)")
    if device.backend == "cuda":
        if not device.total_gb:
            raise PlanError(
                f"could not read the memory of the CUDA device {device.name!r} from MLX or NVML; "
                "set ram_gb in lorad.toml to the GPU's memory in GB"
            )
        free = device.free_gb if device.free_gb is not None else device.total_gb
        return PlanMemory(device.total_gb, free, f"GPU memory ({device.source})")
    label = "unified memory" if device.backend == "metal" else "system RAM"
    return PlanMemory(machine.total_gb, machine.available_gb, label)


def run_probe(*, doctor_model: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """The probe's JSON (or {"error": ...}); never raises."""
    args = [sys.executable, "-m", "engines.mflux.probe"]
    if doctor_model is not None:
        args += ["--doctor", doctor_model]
    env = child_env(os.environ, extra={"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"the MLX device probe did not answer within {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"the MLX device probe exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    data: dict[str, Any] = json.loads(lines[-1])
    return data


_cache: dict[str, Device] = {}
_lock = threading.Lock()


def probe_device() -> Device:
    """This machine's MLX device, probed once per process (the daemon's run)."""
    with _lock:
        if "device" not in _cache:
            import structlog

            log = structlog.get_logger() if structlog.is_configured() else None  # the CLI prints, not logs
            if log is not None:
                log.info("engine.probe", engine="mflux", timeout_s=PROBE_TIMEOUT_S)
            device = Device.from_json(run_probe())
            if log is not None:
                log.info(
                    "engine.device",
                    backend=device.backend,
                    device=device.name,
                    total_gb=device.total_gb,
                    free_gb=device.free_gb,
                    error=device.error,
                )
            _cache["device"] = device
        return _cache["device"]
