"""`python -m engines.mflux.probe [--doctor MODEL]`: MLX's backend, device and memory, as one JSON line.

Child side (imports mlx): the daemon runs it once per run (engines.mflux.device caches it), so
the daemon process itself never imports mlx. The memory that limits training is the device's:
on CUDA the GPU's memory (discrete) or the unified memory (GB10), read from MLX's
`mx.device_info()` (MLX itself asks NVML for the free memory when it can), then from NVML
(pynvml, only if installed); never the system RAM. On Metal it is the unified RAM, which the
daemon measures at plan time (it changes); on the CPU backend the system RAM.

`--doctor MODEL` adds what `lorad doctor` checks: mflux imports its training path, the model's
weights are in the Hugging Face cache.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

GB = 1024**3


def backend_name(metal: bool, cuda: bool) -> str:
    return "metal" if metal else "cuda" if cuda else "cpu"


def describe(backend: str, info: Mapping[str, Any], nvml: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The probe's answer from MLX's device_info (and NVML's numbers where MLX has none). Pure."""
    total = info.get("total_memory") or info.get("memory_size")
    free = info.get("free_memory")
    source = "mlx device_info"
    if backend == "cuda" and (not total or free is None) and nvml:
        total = total or nvml.get("total")
        free = nvml.get("free") if free is None else free
        source = "mlx device_info + NVML"
    out: dict[str, Any] = {
        "backend": backend,
        "device": str(info.get("device_name") or info.get("architecture") or backend),
        "total_gb": round(int(total) / GB, 2) if total and backend != "cpu" else None,
        "free_gb": round(int(free) / GB, 2) if free is not None and backend == "cuda" else None,
        "source": source if backend != "cpu" else "system RAM",
    }
    return out


def _nvml() -> dict[str, int] | None:
    try:
        import pynvml  # optional: only where installed
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"total": int(mem.total), "free": int(mem.free)}
    except Exception:
        return None


def probe() -> dict[str, Any]:
    import importlib.metadata as md

    import mlx.core as mx

    backend = backend_name(mx.metal.is_available(), mx.cuda.is_available())
    info = dict(mx.device_info(mx.gpu if backend != "cpu" else mx.cpu))
    nvml = _nvml() if backend == "cuda" else None
    out = describe(backend, info, nvml)
    out["mlx"] = md.version("mlx")
    return out


def doctor(model: str) -> dict[str, Any]:
    """What `lorad doctor` needs besides the device: mflux's training path, the model's weights."""
    import importlib.metadata as md

    out: dict[str, Any] = {}
    try:
        import mflux.models.common.training.runner  # noqa: F401  (the training path must import)

        out["mflux"] = md.version("mflux")
    except Exception as exc:
        out["mflux_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from mflux.models.common.config.model_config import ModelConfig

        repo = ModelConfig.from_name(model).model_name
        out["model_repo"] = repo
        from huggingface_hub import scan_cache_dir

        try:
            repos = scan_cache_dir().repos
        except Exception:  # no cache folder yet: nothing downloaded
            repos = frozenset()
        cached = [r for r in repos if r.repo_id == repo]
        out["model_cached"] = bool(cached)
        out["model_cache_bytes"] = sum(r.size_on_disk for r in cached)
    except Exception as exc:
        out["model_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str]) -> int:
    out: dict[str, Any]
    try:
        out = probe()
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    if len(argv) == 2 and argv[0] == "--doctor":
        out.update(doctor(argv[1]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
