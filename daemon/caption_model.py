"""Where the captioner's model is on this machine (offline lookups, never a download).

Apart from daemon/captions.py so that intake's validation can ask "can the captioner run here?"
without importing the captioning phase (which imports the snapshot, which imports validation:
the import circle tests/unit/test_layers.py forbids).
"""

from __future__ import annotations

from pathlib import Path

TINY_VLM = "tiny-vlm"

__all__ = ["TINY_VLM", "fetch_hint", "model_folder", "model_problem"]


def fetch_hint(model: str) -> str:
    return (
        f"lorad never downloads a model unasked: fetch it once with `hf download {model}` "
        '(or set caption_model to a model folder, or "tiny-vlm" for a test); `lorad doctor` checks it'
    )


def model_problem(model: str) -> str | None:
    """Why the captioner cannot run here (None: it can): a folder without a config.json, or a
    Hugging Face repo id that is not in the local cache. Looked up offline, never fetched."""
    if model == TINY_VLM:
        return None
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith("."):
        if (path / "config.json").is_file():
            return None
        return f"caption_model {model!r} is not a model folder (no config.json in it)"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return f"caption_model {model!r} cannot be looked up (huggingface_hub is missing)"
    try:
        found = try_to_load_from_cache(model, "config.json")
    except Exception as exc:  # a malformed repo id
        return f"caption_model {model!r} is not a Hugging Face repo id ({exc})"
    if isinstance(found, str):
        return None
    return f"the captioner {model!r} (caption_model) is not on this machine. {fetch_hint(model)}"


def model_folder(model: str, state_dir: Path) -> Path | None:
    """Where caption_model's files are on this machine (offline lookup), None if unknown."""
    if model == TINY_VLM:
        return state_dir / "models" / TINY_VLM
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith("."):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None
