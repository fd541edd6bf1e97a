"""The model-weights check finds a snapshot in the Hugging Face cache as mflux does (complete or not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TURBO_PIN = "f332072aa78be7aecdf3ee76d5c247082da564a6"


def _fake_snapshot(cache: Path, repo: str, revision: str, *, complete: bool = True) -> Path:
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    for folder in ("transformer", "text_encoder", "vae"):
        (snapshot / folder).mkdir(parents=True)
        (snapshot / folder / "model-00001-of-00002.safetensors").write_bytes(b"x")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "transformer" / "model.safetensors.index.json").write_text(json.dumps(index))
    if complete:
        (snapshot / "transformer" / "model-00002-of-00002.safetensors").write_bytes(b"x")
    return snapshot


def test_weights_check_finds_the_hf_cache_like_mflux(tmp_path):
    from engines.mflux.weights import hf_hub_cache, weights_check

    home = tmp_path / "hf"
    env = {"HF_HOME": str(home)}
    assert hf_hub_cache(env) == home / "hub"
    assert hf_hub_cache({"HF_HUB_CACHE": str(tmp_path / "c"), "HF_HOME": str(home)}) == tmp_path / "c"
    assert hf_hub_cache({"XDG_CACHE_HOME": str(tmp_path / "x")}) == tmp_path / "x" / "huggingface" / "hub"

    missing = weights_check("z-image-turbo", env)
    assert missing.status.value == "warn"
    for words in (
        "not on this machine",
        "about 31 GB",
        f"hf download Tongyi-MAI/Z-Image-Turbo --revision {TURBO_PIN}",
        "LORAD_MODEL=tiny-z-image",
    ):
        assert words in missing.detail, missing.detail
    _fake_snapshot(
        home / "hub", "Tongyi-MAI/Z-Image-Turbo", "0" * 40
    )  # another revision: mflux would not use it
    assert weights_check("z-image-turbo", env).status.value == "warn"
    _fake_snapshot(home / "hub", "Tongyi-MAI/Z-Image-Turbo", TURBO_PIN, complete=False)  # a shard missing
    assert weights_check("z-image-turbo", env).status.value == "warn"
    shutil.rmtree(home / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / TURBO_PIN)
    _fake_snapshot(home / "hub", "Tongyi-MAI/Z-Image-Turbo", TURBO_PIN)
    # Issue 24: the training adapter mflux loads for every z-image-turbo run is part of the weights.
    env["MFLUX_CACHE_DIR"] = str(tmp_path / "mflux")
    assert weights_check("z-image-turbo", env).status.value == "warn"
    adapter = home / "hub" / "models--ostris--zimage_turbo_training_adapter" / "snapshots" / ("1" * 40)
    adapter.mkdir(parents=True)
    (adapter / "zimage_turbo_training_adapter_v2.safetensors").write_bytes(b"x")
    assert weights_check("z-image-turbo", env).status.value == "ok"
    assert weights_check("tiny-z-image", env).status.value == "ok"
    assert weights_check("sdxl", env).status.value == "fail"
