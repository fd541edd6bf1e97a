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


def weights_check(model: str, env: Mapping[str, str] | None = None) -> Check:
    """Are this model's weights on this machine? Looks in the Hugging Face cache the way mflux
    does (the pinned snapshot, weight folders complete); never downloads. The detail of a
    missing model says what to do; `lorad run`, `lorad doctor` and a job all show it."""
    if model == "tiny-z-image":
        return Check("model", CheckStatus.OK, "tiny-z-image is generated locally on first use (no download)")
    if model not in MODEL_WEIGHTS:
        return Check(
            "model",
            CheckStatus.FAIL,
            f"unknown model {model!r}; known: {', '.join([*MODEL_WEIGHTS, 'tiny-z-image'])}",
        )
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
            return Check("model", CheckStatus.OK, f"{model} weights present ({repo} in {cache})")
    revision = f" --revision {pin}" if pin else ""
    return Check(
        "model",
        CheckStatus.WARN,
        f"{model} weights are not on this machine (no complete {repo}{' at ' + pin[:7] if pin else ''} in {cache}); "
        f"jobs fail until they are. Download them once (about {size_gb} GB) with: uv run hf download {repo}{revision} ; "
        f"to try the pipeline first without them: LORAD_MODEL=tiny-z-image uv run lorad run",
    )
