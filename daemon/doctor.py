"""`lorad doctor`: what this machine can do, without importing mlx/mflux in this process.

The mflux/mlx check runs in a child interpreter: importing them here would cost seconds and,
on a broken install, could crash the caller instead of reporting.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
print(json.dumps(out))
"""


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


# mflux model -> (Hugging Face repo mflux loads it from, approximate download in GB). Sizes from
# mflux's READMEs: models/z_image "Z-Image weights are large (~31GB)"; models/flux2 "FLUX.2-klein-4B
# ... (~15GB), FLUX.2-klein-9B ... (~32GB)" (the base variants have the same shapes).
MODEL_WEIGHTS: dict[str, tuple[str, int]] = {
    "z-image-turbo": ("Tongyi-MAI/Z-Image-Turbo", 31),
    "z-image": ("Tongyi-MAI/Z-Image", 31),
    "flux2-klein-4b": ("black-forest-labs/FLUX.2-klein-4B", 15),
    "flux2-klein-base-4b": ("black-forest-labs/FLUX.2-klein-base-4B", 15),
    "flux2-klein-9b": ("black-forest-labs/FLUX.2-klein-9B", 32),
    "flux2-klein-base-9b": ("black-forest-labs/FLUX.2-klein-base-9B", 32),
}
# The folders whose *.safetensors mflux requires in a cached snapshot (its download patterns).
WEIGHT_FOLDERS = ("transformer", "text_encoder", "vae")


def hf_hub_cache(env: dict | None = None) -> Path:
    """Where huggingface_hub (and so mflux) keeps downloaded repos; same rules as its constants
    module, without importing it: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME."""
    env = os.environ if env is None else env
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


@lru_cache(maxsize=None)
def pinned_revisions() -> dict[str, str]:
    """mflux's pinned commit per repo (it loads only that snapshot), read from its source file so
    that mflux and mlx are not imported here. Empty when it cannot be read."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("mflux")  # finds the package without running it
        roots = list(spec.submodule_search_locations or []) if spec else []
        for root in roots:
            source = Path(root, "models", "common", "resolution", "model_revisions.py")
            if source.is_file():
                for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
                    if isinstance(node, ast.Assign) and len(node.targets) == 1:
                        target = node.targets[0]
                    elif isinstance(node, ast.AnnAssign):
                        target = node.target
                    else:
                        continue
                    if getattr(target, "id", None) == "PINNED":
                        return dict(ast.literal_eval(node.value))
    except (OSError, ValueError, SyntaxError, ImportError):
        pass
    return {}


def _snapshot_complete(snapshot: Path) -> bool:
    """Every weight folder holds a readable .safetensors file and every shard its index names."""
    for name in WEIGHT_FOLDERS:
        folder = snapshot / name
        try:
            if not any(f.name.endswith(".safetensors") and f.is_file() for f in folder.iterdir()):
                return False
            for index in folder.glob("*.safetensors.index.json"):
                shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
                if not all((folder / shard).is_file() for shard in shards):
                    return False
        except (OSError, ValueError):
            return False
    return True


def weights_check(model: str, env: dict | None = None) -> Check:
    """Are this model's weights on this machine? Looks in the Hugging Face cache the way mflux
    does (the pinned snapshot, weight folders complete); never downloads. The detail of a
    missing model says what to do; `lorad run`, `lorad doctor` and a job all show it."""
    if model == "tiny-z-image":
        return Check("model", "ok", "tiny-z-image is generated locally on first use (no download)")
    if model not in MODEL_WEIGHTS:
        return Check("model", "fail", f"unknown model {model!r}; known: {', '.join([*MODEL_WEIGHTS, 'tiny-z-image'])}")
    repo, size_gb = MODEL_WEIGHTS[model]
    cache = hf_hub_cache(env)
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    pin = pinned_revisions().get(repo)
    try:
        candidates = [snapshots / pin] if pin else sorted(snapshots.iterdir())
    except OSError:
        candidates = []
    for snapshot in candidates:
        if snapshot.is_dir() and _snapshot_complete(snapshot):
            return Check("model", "ok", f"{model} weights present ({repo} in {cache})")
    revision = f" --revision {pin}" if pin else ""
    return Check(
        "model",
        "warn",
        f"{model} weights are not on this machine (no complete {repo}{' at ' + pin[:7] if pin else ''} in {cache}); "
        f"jobs fail until they are. Download them once (about {size_gb} GB) with: uv run hf download {repo}{revision} ; "
        f"to try the pipeline first without them: LORAD_MODEL=tiny-z-image uv run lorad run",
    )


def announce_weights(settings: Settings, log) -> Check | None:
    """At `lorad run` start: one log line, and a printed line on stderr when the weights are missing."""
    if settings.engine != "mflux":
        return None
    check = weights_check(settings.model)
    if check.status == "ok":
        log.info("model.weights", model=settings.model, present=True, detail=check.detail)
    else:
        log.warning("model.weights", model=settings.model, present=False, detail=check.detail)
        print(f"lorad: {check.detail}", file=sys.stderr, flush=True)
    return check


def _ml_check() -> dict:
    from engines.child import with_bytecode_cache  # the same import cache as the training child

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CHECK],
            capture_output=True,
            text=True,
            timeout=120,
            env=with_bytecode_cache({**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}),
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
    ml = _ml_check()
    if "mlx_error" in ml:
        checks.append(Check("mlx", "fail", ml["mlx_error"]))
    else:
        checks.append(Check("mlx", "ok", f"{ml.get('mlx')} on {ml.get('mlx_device')}"))
    if "mflux_error" in ml:
        checks.append(Check("mflux", "fail", ml["mflux_error"]))
    else:
        checks.append(Check("mflux", "ok", str(ml.get("mflux"))))
    checks.append(weights_check(settings.model))
    checks.append(Check("assets", "ok" if settings.training_data.is_dir() else "warn", str(settings.training_data)))
    checks.append(Check("state", "ok", str(settings.state)))
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in checks) else 0
