"""Are a model's weights on this machine? The Hugging Face cache, read the way mflux reads it.

Pure file-system look-ups: no mlx/mflux import (mflux's pinned revisions are read from its
source file), never a download. `lorad run` (at start), `lorad doctor` and every job ask this,
so a missing model is said once, early, with what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from engines.base import Check, CheckStatus

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
    # FLUX.1 [dev] (render only: the test render of a cloud-trained LoRA); a gated repo on
    # Hugging Face (accept its licence, then `hf auth login`). ~34 GB: transformer 24, T5 9.5.
    "flux-dev": ("black-forest-labs/FLUX.1-dev", 34),
}
# What else mflux loads from the Hub when it *trains* a model, beyond the model's repo: (repo, file).
# mflux/models/common/training/runner.py, TrainingRunner.ZIMAGE_TURBO_TRAINING_ADAPTER (an
# assistant LoRA applied to every Z-Image-Turbo training run). A test keeps this equal to mflux's.
TRAINING_EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "z-image-turbo": (
        ("ostris/zimage_turbo_training_adapter", "zimage_turbo_training_adapter_v2.safetensors"),
    ),
}
# The folders whose *.safetensors mflux requires in a cached snapshot (its download patterns).
WEIGHT_FOLDERS = ("transformer", "text_encoder", "vae")


def hf_hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub (and so mflux) keeps downloaded repos; same rules as its constants
    module, without importing it: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME."""
    env = os.environ if env is None else env
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def mflux_lora_cache(env: Mapping[str, str] | None = None) -> Path:
    """Where mflux keeps the LoRAs it fetched itself (MFLUX_CACHE_DIR/loras; platformdirs' user
    cache otherwise), computed without importing mflux."""
    import sys

    env = os.environ if env is None else env
    if env.get("MFLUX_CACHE_DIR"):
        return Path(os.path.expanduser(env["MFLUX_CACHE_DIR"])) / "loras"
    if sys.platform == "darwin":
        return Path(os.path.expanduser("~/Library/Caches/mflux/loras"))
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mflux" / "loras"


def find_extra(repo: str, filename: str, env: Mapping[str, str] | None = None) -> Path | None:
    """A training extra on this machine: in mflux's own LoRA cache (its link or snapshot) or in
    the Hugging Face cache (`hf download`); None when absent. The training child hands the
    path found to mflux, so it never looks it up on the Hub."""
    lora_cache = mflux_lora_cache(env)
    candidates = [lora_cache / filename]
    for cache in (lora_cache, hf_hub_cache(env)):
        snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
        try:
            candidates += [snapshot / filename for snapshot in sorted(snapshots.iterdir())]
        except OSError:
            continue
    for path in candidates:
        try:
            if path.is_file() and path.stat().st_size > 0:
                return path
        except OSError:
            continue
    return None


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
                    if getattr(target, "id", None) == "PINNED" and node.value is not None:
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


def _model_repo_present(repo: str, cache: Path) -> tuple[bool, str | None]:
    """(the pinned, complete snapshot of `repo` is in the cache, the pin)."""
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    pin = pinned_revisions().get(repo)
    try:
        candidates = [snapshots / pin] if pin else sorted(snapshots.iterdir())
    except OSError:
        candidates = []
    return any(s.is_dir() and _snapshot_complete(s) for s in candidates), pin


def missing_pieces(model: str, env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(what is missing, the command that fetches it) for every piece mflux loads to train
    `model` that is not on this machine (pure file look-ups)."""
    repo, size_gb = MODEL_WEIGHTS[model]
    cache = hf_hub_cache(env)
    missing = []
    present, pin = _model_repo_present(repo, cache)
    if not present:
        where = f"no complete {repo}{' at ' + pin[:7] if pin else ''} in {cache}"
        revision = f" --revision {pin}" if pin else ""
        missing.append(
            (f"the model weights, about {size_gb} GB ({where})", f"uv run hf download {repo}{revision}")
        )
    for extra_repo, filename in TRAINING_EXTRAS.get(model, ()):
        if find_extra(extra_repo, filename, env) is None:
            missing.append(
                (
                    f"mflux's training adapter {extra_repo} ({filename}), loaded by every {model} training "
                    f"run (not in {cache} nor {mflux_lora_cache(env)})",
                    f"uv run hf download {extra_repo} {filename}",
                )
            )
    return missing


def weights_check(model: str, env: Mapping[str, str] | None = None) -> Check:
    """Is everything mflux loads to train this model on this machine (the model's pinned
    snapshot, and its training adapter)? Never downloads. The detail of a missing piece names
    it and the command that fetches it; `lorad run`, `lorad doctor`, intake and a job all show it."""
    if model == "tiny-z-image":
        return Check("model", CheckStatus.OK, "tiny-z-image is generated locally on first use (no download)")
    if model not in MODEL_WEIGHTS:
        return Check(
            "model",
            CheckStatus.FAIL,
            f"unknown model {model!r}; known: {', '.join([*MODEL_WEIGHTS, 'tiny-z-image'])}",
        )
    repo = MODEL_WEIGHTS[model][0]
    missing = missing_pieces(model, env)
    if not missing:
        extras = " and its training adapter" if model in TRAINING_EXTRAS else ""
        return Check(
            "model", CheckStatus.OK, f"{model} weights present ({repo}{extras}, {hf_hub_cache(env)})"
        )
    what = "; ".join(piece for piece, _ in missing)
    fetch = " ; ".join(command for _, command in missing)
    head = (
        f"{model} weights are not on this machine"
        if missing[0][0].startswith("the model weights")
        else f"{model} weights are incomplete on this machine"
    )
    return Check(
        "model",
        CheckStatus.WARN,
        f"{head}: missing {what}; jobs fail until they are there (nothing is downloaded unasked). "
        f"Fetch with: {fetch} ; to try the pipeline first without them: LORAD_MODEL=tiny-z-image uv run lorad run",
    )
