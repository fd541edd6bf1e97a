"""The published LoRA applies the delta it was trained with, in mflux and in diffusers.

mflux trains `W x + (alpha/rank) B A x` and saves only A and B; loaders apply alpha/rank only
when a `<module>.alpha` tensor is in the file (engines/mflux/lora_export.py). These tests train
at alpha = rank/2, where a missing alpha shows as a delta twice too large.
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon.publish import read_header
from engines.mflux.config import build_config
from engines.mflux.lora_export import append_scalars, module_alphas
from engines.mflux.memory_plan import plan_memory

RANK, ALPHA = 8, 4.0  # alpha = rank / 2


def _lorad_config(tmp_path: Path) -> dict:
    memory = plan_memory(model="tiny-z-image", total_gb=128, available_gb=100, image_count=1, max_side=64)
    config, _ = build_config(
        model="tiny-z-image",
        memory=memory,
        options={"rank": RANK, "alpha": ALPHA},
        image_count=1,
        data_dir=tmp_path,
        output_dir=tmp_path / "out",
    )
    return config


# -- the alpha tensors (pure) --------------------------------------------------------------------

TARGETS = [
    {"module_path": "layers.{block}.attention.to_q", "rank": 8, "alpha": 4.0},
    {"module_path": "layers.{block}.feed_forward.w1", "rank": 8, "alpha": None},
]


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        (
            "diffusion_model.layers.0.attention.to_q.lora_A.weight",
            [8, 192],
            {"diffusion_model.layers.0.attention.to_q.alpha": 4.0},
        ),
        (
            "diffusion_model.layers.11.attention.to_q.lora_A.weight",
            [8, 192],
            {"diffusion_model.layers.11.attention.to_q.alpha": 4.0},
        ),
        (
            "diffusion_model.layers.1.feed_forward.w1.lora_A.weight",
            [8, 192],
            {"diffusion_model.layers.1.feed_forward.w1.alpha": 8.0},
        ),  # no alpha: scale 1
        ("diffusion_model.layers.1.attention.to_q.lora_B.weight", [192, 8], {}),  # only lora_A names a pair
        ("diffusion_model.layers.1.attention.to_k.lora_A.weight", [8, 192], {}),  # no target names it
        ("diffusion_model.layers.x.attention.to_q.lora_A.weight", [8, 192], {}),  # {block} is a number
    ],
)
def test_module_alphas_table(key, shape, expected):
    assert (
        module_alphas({key: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}}, TARGETS) == expected
    )


def test_module_alphas_keeps_an_alpha_already_there():
    header = {"m.lora_A.weight": {"shape": [8, 4]}, "m.alpha": {"shape": []}}
    assert module_alphas(header, [{"module_path": "m", "rank": 8, "alpha": 2}]) == {}


def test_append_scalars_keeps_bf16_tensors_byte_identical(tmp_path):
    import json

    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src = tmp_path / "a.safetensors"
    save_file(
        {"x.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(src), metadata={"k": "v"}
    )
    header, offset = read_header(src)
    header["x.lora_A.weight"].update(
        dtype="BF16", shape=[2, 6]
    )  # numpy has no bf16: the same 24 bytes relabelled
    raw = src.read_bytes()[offset:]
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    src.write_bytes(struct.pack("<Q", len(blob)) + blob + raw)
    dest = tmp_path / "b.safetensors"
    append_scalars(src, dest, {"x.alpha": 4.0})
    new_header, new_offset = read_header(dest)
    assert new_header["__metadata__"] == {"k": "v"}
    assert new_header["x.alpha"] == {"dtype": "F32", "shape": [], "data_offsets": [24, 28]}
    assert dest.read_bytes()[new_offset : new_offset + 24] == raw  # the trained tensor untouched
    with safe_open(str(dest), "np") as fh:  # the library accepts the file
        assert float(fh.get_tensor("x.alpha")) == 4.0
    append_scalars(src, src, {"x.alpha": 2.0})  # in place, as export_adapter does
    assert read_header(src)[0]["x.alpha"]["data_offsets"] == [24, 28]


# -- mflux: train-time delta == load-time delta ---------------------------------------------------


def test_mflux_loads_the_delta_it_trained_with_alpha_half_the_rank(tmp_path):
    """mflux's own injector (as in training), saver and loader, on the miniature model."""
    mx = pytest.importorskip("mlx.core")
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.common.training.lora.path_util import expand_module_paths_from_targets
    from mflux.models.common.training.lora.target_injector import inject_lora_targets
    from mflux.models.common.training.state.training_spec import BlockRange, LoraLayersSpec, LoraTargetSpec
    from mflux.models.z_image.training_adapter.z_image_training_adapter import ZImageTrainingAdapter
    from mflux.models.z_image.weights.z_image_lora_mapping import ZImageLoRAMapping

    from daemon.safetensors_file import read_header as _read_header
    from engines.mflux import tiny_model

    config = _lorad_config(tmp_path)
    targets = [
        LoraTargetSpec(
            module_path=t["module_path"], rank=t["rank"], blocks=BlockRange(**t["blocks"]), alpha=t["alpha"]
        )
        for t in config["lora_layers"]["targets"]
    ]
    assert {(t.rank, t.alpha) for t in targets} == {(RANK, ALPHA)}

    def fresh_transformer():
        mx.random.seed(7)
        return tiny_model.build_modules(tiny_model.SPEC)[1]

    trained = fresh_transformer()
    inject_lora_targets(trained, targets)  # exactly as mflux's TrainingRunner does
    paths = [p for p, _, _ in expand_module_paths_from_targets(targets)]
    mx.random.seed(11)
    for path in paths:  # "training": lora_B moves away from its zero init
        lora = _module(trained, path)
        lora.lora_B = mx.random.normal(lora.lora_B.shape) * 0.1
    saved = tmp_path / "adapter.safetensors"
    fake = SimpleNamespace(_z=SimpleNamespace(transformer=trained))
    ZImageTrainingAdapter.save_lora_adapter(  # mflux's own writer
        fake,
        path=saved,
        training_spec=SimpleNamespace(lora_layers=LoraLayersSpec(targets=targets), model="z-image"),
    )

    exported = tmp_path / "published.safetensors"
    header, _ = _read_header(saved)
    append_scalars(saved, exported, module_alphas(header, config["lora_layers"]["targets"]))

    def loaded(path: Path):
        transformer = fresh_transformer()
        LoRALoader.load_and_apply_lora(
            lora_mapping=ZImageLoRAMapping.get_mapping(),
            transformer=transformer,
            lora_paths=[str(path)],
            lora_scales=[1.0],
        )
        return transformer

    x = mx.random.normal((1, 5, tiny_model.SPEC["transformer"]["dim"]))
    with_alpha, without_alpha = loaded(exported), loaded(saved)
    worst_with, worst_without = 0.0, 0.0
    for path in paths:
        if path.endswith("feed_forward.w2"):  # its input is the feed-forward width, not dim
            inp = mx.random.normal((1, 5, _module(trained, path).linear.weight.shape[1]))
        else:
            inp = x
        base = _module(fresh_transformer(), path)(inp)
        trained_delta = _module(trained, path)(inp) - base
        worst_with = max(worst_with, _rel(_module(with_alpha, path)(inp) - base, trained_delta, mx))
        worst_without = max(worst_without, _rel(_module(without_alpha, path)(inp) - base, trained_delta, mx))
    assert worst_with < 1e-3, f"published file: delta off by {worst_with:.3f}"
    assert worst_without > 0.5  # the file as mflux saves it: delta x rank/alpha = 2x


def _module(transformer, path: str):
    from mflux.models.common.training.lora.path_util import get_at_path

    return get_at_path(transformer, path)


def _rel(delta, reference, mx) -> float:
    return float(mx.abs(delta - reference).max() / (mx.abs(reference).max() + 1e-12))


# -- diffusers (optional) ----------------------------------------------------------------------


def test_diffusers_applies_the_alpha_tensors(tmp_path):
    """diffusers' Z-Image converter (what `ZImagePipeline.load_lora_weights` runs on
    `diffusion_model.*` keys) folds alpha/rank into the weights. Needs torch + diffusers, which
    lorad does not install (see README, "LoRA files"): skipped without them."""
    torch = pytest.importorskip(
        "torch", reason="optional interop check: torch (CPU) + diffusers not installed"
    )
    pytest.importorskip("diffusers", reason="optional interop check: diffusers not installed")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers
    from safetensors.torch import load_file, save_file

    a = torch.randn(RANK, 192)
    b = torch.randn(192, RANK)
    src = tmp_path / "lorad.safetensors"
    save_file(
        {
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": a,
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": b,
        },
        str(src),
    )
    header, _ = read_header(src)
    dest = tmp_path / "published.safetensors"
    append_scalars(
        src, dest, module_alphas(header, [{"module_path": "layers.{block}.attention.to_q", "alpha": ALPHA}])
    )
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(load_file(str(dest)))
    delta = (
        converted["transformer.layers.0.attention.to_q.lora_B.weight"]
        @ converted["transformer.layers.0.attention.to_q.lora_A.weight"]
    )
    assert torch.allclose(delta, (ALPHA / RANK) * (b @ a), rtol=1e-4, atol=1e-5)
