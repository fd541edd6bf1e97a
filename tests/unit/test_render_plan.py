"""The test render's memory plan (a cloud-trained LoRA rendered here): sized for inference, by what is
free now, not by the training tiers' RAM rules of thumb (pure table tests, no mlx)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.base import EngineContext, JobInput, Machine
from engines.mflux.device import Device
from engines.mflux.engine import MFluxEngine
from engines.mflux.memory_plan import (
    InsufficientMemory,
    plan_memory,
    plan_render_memory,
    tier_budget_gb,
)


@pytest.mark.parametrize(
    "model, total, free, quantize",
    [
        (
            "z-image-turbo",
            128,
            100,
            None,
        ),  # bf16 (its training tier there is q8: 96+ GB trains bf16 only uncheckpointed)
        ("z-image-turbo", 64, 50, None),
        ("z-image-turbo", 64, 30, 8),
        ("z-image-turbo", 32, 26, 8),
        ("z-image-turbo", 24, 16, 4),
        ("z-image-turbo", 16, 11, 4),
        ("flux2-klein-9b", 128, 120, 8),  # never bf16 (PortOS issue 1321)
        ("flux-dev", 64, 50, 8),  # rendered here, trained only on a cloud
        ("flux-dev", 128, 100, None),
        ("tiny-z-image", 24, 18, None),  # the miniature model: bf16 on any machine that can run it
        ("tiny-z-image", 8, 2, None),
    ],
)
def test_a_render_gets_the_best_quantization_whose_budget_fits_what_is_free(model, total, free, quantize):
    plan = plan_render_memory(model=model, total_gb=total, available_gb=free)
    assert plan.quantize == quantize
    assert plan.tier == ("render-bf16" if quantize is None else f"render-q{quantize}")
    assert plan.batch_size == 1 and not plan.gradient_checkpointing
    assert f"{free:.0f} GB free" in plan.reason


def test_a_render_never_plans_a_lower_quantization_than_training_on_the_same_machine():
    compared = 0
    for total in (16, 24, 32, 48, 64, 96, 128, 192):
        for free in (total * 0.6, total * 0.8, total):
            try:
                train = plan_memory(
                    model="z-image-turbo", total_gb=total, available_gb=free, image_count=20, max_side=1024
                )
            except InsufficientMemory:
                continue
            render = plan_render_memory(model="z-image-turbo", total_gb=total, available_gb=free)
            assert (render.quantize or 16) >= (train.quantize or 16), (total, free, train.tier, render.tier)
            compared += 1
    assert compared >= 20


def test_a_bf16_or_q8_render_is_sized_by_a_checkpointed_training_budget_at_1024_px():
    assert (
        plan_render_memory(
            model="z-image-turbo", total_gb=64, available_gb=tier_budget_gb("bf16-checkpointed")
        ).quantize
        is None
    )
    just_under = tier_budget_gb("bf16-checkpointed") - 0.1
    assert plan_render_memory(model="z-image-turbo", total_gb=64, available_gb=just_under).quantize == 8


def test_too_little_free_memory_names_what_a_render_needs():
    with pytest.raises(InsufficientMemory) as refused:
        plan_render_memory(model="z-image-turbo", total_gb=16, available_gb=9)
    words = str(refused.value)
    assert (
        "rendering z-image-turbo needs at least 11 GB free, have 9" in words and "close other apps" in words
    )


def test_the_mflux_engine_plans_a_cloud_loras_render_for_inference(tmp_path):
    """On a 96 GB Mac the training plan is q8 (bf16 training needs ~162 GB); the render is bf16."""
    engine = MFluxEngine(EngineContext(state_dir=tmp_path / "state"))
    engine.device = Device("metal", "Apple M3 Max", total_gb=96)
    job = JobInput(
        "j1", "alice", "ohwx", "z-image-turbo", 20, 1024, {}, Path(tmp_path / "data"), "ohwx, portrait"
    )
    mac = Machine(total_gb=96, available_gb=80, platform="darwin", apple_silicon=True)
    assert engine.plan(job=job, machine=mac).config["quantize"] == 8
    render = engine.render_plan(job, mac)
    assert render.config["quantize"] is None and render.tier == "render-bf16", render.reason
