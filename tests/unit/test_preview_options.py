"""Samples during training: the `preview_prompts` / `sample_every` keys (lora.toml, READY and
the settings), the preview files they become, and mflux's preview interval (pure parts)."""

from __future__ import annotations

import json

import pytest
from dataset_files import GOOD, build

from daemon.intake.options import parse_options, render_ready
from daemon.intake.snapshot import choose_preview_prompt, choose_preview_prompts, take_snapshot
from daemon.intake.validate import validate_dataset
from daemon.settings import SettingsError, resolve
from engines.mflux.config import sample_interval


@pytest.mark.parametrize(
    "text, options, code",
    [
        ('preview_prompts = ["a", "b, c"]\n', {"preview_prompts": ["a", "b, c"]}, None),
        ("sample_every = 50\n", {"sample_every": 50}, None),
        ('preview_prompts = "one"\n', {}, "option.type"),
        ("preview_prompts = [1, 2]\n", {}, "option.type"),
        ("preview_prompts = []\n", {}, "option.range"),
        (f"preview_prompts = {json.dumps(['p'] * 9)}\n", {}, "option.range"),
        ('preview_prompts = ["ok", "  "]\n', {}, "option.value"),
        ("sample_every = 0\n", {}, "option.range"),
    ],
)
def test_sample_keys_table(text, options, code):
    got, findings = parse_options(text, "lora.toml", allow_force=False)
    assert got == options
    assert [f.code for f in findings] == ([code] if code else [])
    if code:
        assert "lora.toml" in findings[0].line() and (
            "preview_prompts" in findings[0].line() or "sample_every" in findings[0].line()
        )


def test_render_ready_round_trips_a_prompt_list():
    options = {"preview_prompts": ['ohwx, "quoted"', "ohwx, ünïcode"], "sample_every": 10}
    assert parse_options(render_ready(options), "READY", allow_force=True) == (options, [])


def test_preview_prompts_choice(tmp_path):
    both = {**GOOD, "lora.toml": 'preview_prompts = ["a", "b"]\npreview_prompt = "one"\n'}
    assert choose_preview_prompts(validate_dataset(build(tmp_path, "ohwx_a", both)), ("s",)) == ["a", "b"]
    one = {**GOOD, "lora.toml": 'preview_prompt = "one"\n'}
    assert choose_preview_prompts(validate_dataset(build(tmp_path, "ohwx_b", one)), ("s",)) == ["one"]
    plain = validate_dataset(build(tmp_path, "ohwx_c", {**GOOD, "preview_1.txt": "from file"}))
    assert choose_preview_prompts(plain, ("s1", "s2")) == ["s1", "s2"]  # the setting
    assert choose_preview_prompts(plain) == ["from file"]  # the dataset's preview prompt


def test_snapshot_writes_one_preview_file_per_prompt(tmp_path):
    report = validate_dataset(build(tmp_path, "ohwx_d", GOOD))
    manifest = take_snapshot(
        report,
        tmp_path / "job",
        preview_prompt=choose_preview_prompt(report),
        effective={},
        preview_prompts=["first", "second"],
        sample_every=25,
    )
    data = tmp_path / "job" / "data"
    assert (data / "preview.txt").read_text() == "first\n"
    assert (data / "preview_2.txt").read_text() == "second\n"
    assert manifest["preview_prompts"] == ["first", "second"] and manifest["sample_every"] == 25
    assert manifest["preview_prompt"] == "ohwx, portrait photo"  # the final render's prompt stays


@pytest.mark.parametrize(
    "options, total, expected",
    [
        ({}, 120, 30),
        ({}, 4, 1),
        ({}, 1, 1),
        ({}, 1000, 250),
        ({"sample_every": 40}, 120, 40),
        ({"sample_every": 0}, 8, 2),
    ],
)
def test_sample_interval(options, total, expected):
    assert sample_interval(options, total) == expected


def test_settings_keys():
    s = resolve(
        env={"LORAD_SAMPLE_EVERY": "100", "LORAD_PREVIEW_PROMPTS": "ohwx, a portrait|ohwx, on a beach"}
    )
    assert s.sample_every == 100 and s.preview_prompts == ("ohwx, a portrait", "ohwx, on a beach")
    defaults = resolve(env={})
    assert defaults.sample_every is None and defaults.preview_prompts == ()
    with pytest.raises(SettingsError, match="sample_every"):
        resolve(env={"LORAD_SAMPLE_EVERY": "0"})


def test_fal_upload_leaves_out_every_preview_prompt_file(tmp_path):
    import zipfile

    from engines.fal.engine import zip_snapshot

    data = tmp_path / "data"
    data.mkdir()
    (data / "0001.png").write_bytes(b"\x89PNG")
    (data / "0001.txt").write_text("ohwx, a caption")
    (data / "preview.txt").write_text("first")
    (data / "preview_2.txt").write_text("second")
    zip_snapshot(data, tmp_path / "up.zip")
    assert sorted(zipfile.ZipFile(tmp_path / "up.zip").namelist()) == ["0001.png", "0001.txt"]


@pytest.mark.parametrize(
    "model, images, steps, every, ticks",
    [
        ("tiny-z-image", 8, 40, 8, 5),  # batch 2: 40 steps; was a tick every 2 steps
        ("tiny-z-image", 2, 4, 1, 4),  # a 4-step run: a tick a step (each one forward over 2 samples)
        ("tiny-z-image", 8, 120, 24, 5),
        ("z-image-turbo", 20, 1000, 200, 5),  # was 50: 20 ticks of 10 forwards each
        ("z-image-turbo", 20, 2002, 404, 5),  # whole epochs: 2020 steps
    ],
)
def test_mflux_pays_for_about_five_batch_loss_points_a_run(tmp_path, model, images, steps, every, ticks):
    from engines.mflux.config import BATCH_LOSS_POINTS, build_config
    from engines.mflux.memory_plan import plan_memory

    memory = plan_memory(model=model, total_gb=128, available_gb=120, image_count=images, max_side=1024)
    config, total = build_config(
        model=model, memory=memory, options={"steps": steps}, image_count=images,
        data_dir=tmp_path, output_dir=tmp_path / "out",
    )  # fmt: skip
    assert total >= steps and config["monitoring"]["plot_frequency"] == every
    assert total // every == ticks <= BATCH_LOSS_POINTS
