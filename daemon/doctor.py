"""`lorad doctor`: what this machine can do, without importing mlx/mflux in this process.

The mflux/mlx check runs in a child interpreter: importing them here would cost seconds and,
on a broken install, could crash the caller instead of reporting.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass

import psutil

from daemon.settings import Settings

_CHILD_CHECK = r"""
import json, os, sys
out = {}
try:
    import mlx.core as mx
    import mlx
    out["mlx"] = getattr(mlx, "__version__", None) or __import__("importlib.metadata").metadata.version("mlx")
    out["mlx_device"] = str(mx.default_device())
except Exception as exc:
    out["mlx_error"] = f"{type(exc).__name__}: {exc}"
try:
    import importlib.metadata as md
    import mflux.models.common.training.runner  # noqa: F401  (the training path must import)
    out["mflux"] = md.version("mflux")
except Exception as exc:
    out["mflux_error"] = f"{type(exc).__name__}: {exc}"
model = sys.argv[1]
try:
    from mflux.models.common.config.model_config import ModelConfig
    repo = ModelConfig.from_name(model).model_name
    out["model_repo"] = repo
    from huggingface_hub import scan_cache_dir
    try:
        repos = scan_cache_dir().repos
    except Exception:  # no cache folder yet: nothing downloaded
        repos = []
    cached = [r for r in repos if r.repo_id == repo]
    out["model_cached"] = bool(cached)
    out["model_cache_bytes"] = sum(r.size_on_disk for r in cached)
except Exception as exc:
    out["model_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _ml_check(model: str) -> dict:
    if model == "tiny-z-image":
        model = "z-image"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CHECK, model],
            capture_output=True,
            text=True,
            timeout=120,
            env={**__import__("os").environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"},
        )
    except subprocess.TimeoutExpired:
        return {"mlx_error": "import check timed out after 120 s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"mlx_error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    py_ok = sys.version_info >= (3, 11)
    checks.append(Check("python", "ok" if py_ok else "fail", platform.python_version()))
    machine = platform.machine()
    apple = sys.platform == "darwin" and machine == "arm64"
    checks.append(
        Check(
            "platform",
            "ok" if apple else "warn",
            f"{platform.system()} {platform.release()} {machine}"
            + ("" if apple else " (not Apple Silicon: mlx runs on the CPU, training is slow)"),
        )
    )
    mem = psutil.virtual_memory()
    gb = 1024**3
    ram_status = "ok" if mem.total >= 32 * gb else ("warn" if mem.total >= 16 * gb else "fail")
    checks.append(
        Check("memory", ram_status, f"total {mem.total / gb:.1f} GB, available {mem.available / gb:.1f} GB")
    )
    probe = settings.assets
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    checks.append(
        Check("disk", "ok" if free >= 20 * gb else "warn", f"{free / gb:.1f} GB free under {settings.assets}")
    )
    ml = _ml_check(settings.model)
    if "mlx_error" in ml:
        checks.append(Check("mlx", "fail", ml["mlx_error"]))
    else:
        checks.append(Check("mlx", "ok", f"{ml.get('mlx')} on {ml.get('mlx_device')}"))
    if "mflux_error" in ml:
        checks.append(Check("mflux", "fail", ml["mflux_error"]))
    else:
        checks.append(Check("mflux", "ok", str(ml.get("mflux"))))
    if settings.model == "tiny-z-image":
        checks.append(Check("model", "ok", "tiny-z-image is generated locally on first use"))
    elif "model_error" in ml:
        checks.append(Check("model", "warn", f"{settings.model}: {ml['model_error']}"))
    elif ml.get("model_cached"):
        checks.append(
            Check("model", "ok", f"{ml['model_repo']} in the Hugging Face cache ({ml['model_cache_bytes'] / gb:.1f} GB)")
        )
    else:
        checks.append(
            Check(
                "model",
                "warn",
                f"{ml.get('model_repo', settings.model)} is not in the Hugging Face cache: the first job downloads it",
            )
        )
    checks.append(Check("assets", "ok" if settings.training_data.is_dir() else "warn", str(settings.training_data)))
    checks.append(Check("state", "ok", str(settings.state)))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0
