"""Dataset intake: a generated corpus of bad datasets, good ones, snapshot and markers."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from conftest import tree_hash
from PIL import Image

from daemon.intake import contract, markers
from daemon.intake.options import merge, parse_options
from daemon.intake.snapshot import choose_preview_prompt, fingerprint, take_snapshot
from daemon.intake.validate import validate_dataset
from daemon.sample import make_dataset


def png_bytes(size=(300, 300), mode="RGB", color=(200, 100, 50), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bytes(size=(300, 300), mode="RGB", color=(10, 120, 200), exif=None) -> bytes:
    buf = io.BytesIO()
    image = Image.new(mode, size, color)
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def webp_bytes(size=(300, 300)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="WEBP")
    return buf.getvalue()


def bomb_png(width=40000, height=40000) -> bytes:
    """A 1-bit PNG of width x height: a few KB on disk, 1.6 G pixels decoded."""
    raw_row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(raw_row) for _ in range(height)) + compressor.flush()

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def build(root: Path, name: str, files: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for rel, content in files.items():
        path = folder / rel
        if content is None:
            path.mkdir()
        elif isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(content[1], path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


CAP = b"ohwx, a photo"
GOOD = {"a.png": png_bytes(), "a.txt": CAP}


def exif_rotated_portrait() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored landscape 600x300, shown portrait 300x600
    return jpeg_bytes(size=(600, 300), exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(mode="CMYK", color=(0, 50, 100, 0))


def png16() -> bytes:
    buf = io.BytesIO()
    Image.new("I;16", (300, 300), 40000).save(buf, format="PNG")
    return buf.getvalue()


def palette_transparent() -> bytes:
    image = Image.new("P", (300, 300), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


# (folder name, files, expected error code, file the finding names)
BAD_CASES = [
    ("ohwx_truncjpeg", {"a.jpg": jpeg_bytes()[:-400], "a.txt": CAP}, "image.corrupt", "a.jpg"),
    ("ohwx_truncwebp", {"a.webp": webp_bytes()[: len(webp_bytes()) // 2], "a.txt": CAP}, "image.", "a.webp"),
    ("ohwx_truncpng", {"a.png": png_bytes()[:-30], "a.txt": CAP}, "image.corrupt", "a.png"),
    (
        "ohwx_corruptpng",
        {"a.png": png_bytes()[:60] + b"\xff" * 200 + png_bytes()[260:], "a.txt": CAP},
        "image.",
        "a.png",
    ),
    ("ohwx_zeropng", {"a.png": b"", "a.txt": CAP}, "image.empty", "a.png"),
    ("ohwx_textpng", {"a.png": b"this is not an image", "a.txt": CAP}, "image.notimage", "a.png"),
    (
        "ohwx_gifpng",
        {
            "a.png": (
                lambda: (b := io.BytesIO(), Image.new("RGB", (300, 300)).save(b, "GIF"), b.getvalue())[2]
            )(),
            "a.txt": CAP,
        },
        "image.format",
        "a.png",
    ),
    ("ohwx_tiny", {"a.png": png_bytes(size=(10, 10)), "a.txt": CAP}, "image.small", "a.png"),
    ("ohwx_short", {"a.png": png_bytes(size=(1000, 200)), "a.txt": CAP}, "image.small", "a.png"),
    ("ohwx_bomb", {"a.png": bomb_png(), "a.txt": CAP}, "image.bomb", "a.png"),
    ("ohwx_imgdir", {"a.png": None, "b.png": png_bytes(), "b.txt": CAP}, "image.directory", "a.png"),
    ("ohwx_capdir", {"a.png": png_bytes(), "a.txt": None}, "caption.directory", "a.txt"),
    ("ohwx_nocap", {"a.png": png_bytes()}, "caption.missing", "a.png"),
    ("ohwx_emptycap", {"a.png": png_bytes(), "a.txt": b"  \n\t "}, "caption.empty", "a.txt"),
    (
        "ohwx_latin1",
        {"a.png": png_bytes(), "a.txt": "ohwx, caf\xe9 au lait".encode("latin-1")},
        "caption.encoding",
        "a.txt",
    ),
    ("ohwx_nul", {"a.png": png_bytes(), "a.txt": b"ohwx\x00 photo"}, "caption.nul", "a.txt"),
    ("ohwx_hugecap", {"a.png": png_bytes(), "a.txt": b"ohwx " * 20000}, "caption.huge", "a.txt"),
    (
        "ohwx_require",
        {"a.png": png_bytes(), "a.txt": b"a photo", "lora.toml": 'caption_policy = "require"\n'},
        "caption.trigger",
        "a.txt",
    ),
    ("ohwx_preview", {"preview.png": png_bytes(), "preview.txt": CAP, **GOOD}, "name.preview", "preview.png"),
    ("ohwx_samestem", {"a.png": png_bytes(), "a.jpg": jpeg_bytes(), "a.txt": CAP}, "name.samestem", "a.png"),
    (
        "ohwx_symlinkout",
        {"a.png": ("symlink", "/etc/hostname"), "b.png": png_bytes(), "b.txt": CAP, "a.txt": CAP},
        "name.symlink",
        "a.png",
    ),
    (
        "ohwx_broken",
        {"a.png": ("symlink", "missing.png"), "b.png": png_bytes(), "b.txt": CAP, "a.txt": CAP},
        "name.symlink",
        "a.png",
    ),
    (
        "ohwx_ctrl",
        {"a\x07b.png": png_bytes(), "b.png": png_bytes(), "b.txt": CAP},
        "name.control",
        "'a\\x07b.png'",
    ),
    ("ohwx_empty", {}, "folder.noimages", "."),
    (
        "ohwx_hiddenonly",
        {".DS_Store": b"x", "._a.png": b"junk", ".b.png": png_bytes(), "c.png.icloud": b"x"},
        "folder.noimages",
        ".",
    ),
    ("nounderscore", GOOD, "folder.name", "."),
    ("_noname", GOOD, "folder.name", "."),
    ("ohwx_.hidden", GOOD, "folder.name", "."),
    ("ohwx_badtoml", {**GOOD, "lora.toml": "rank = \n"}, "option.toml", "lora.toml"),
    ("ohwx_unknownkey", {**GOOD, "lora.toml": "rnak = 16\n"}, "option.unknown", "lora.toml"),
    ("ohwx_wrongtype", {**GOOD, "lora.toml": 'rank = "sixteen"\n'}, "option.type", "lora.toml"),
    ("ohwx_range", {**GOOD, "lora.toml": "rank = 100000\n"}, "option.range", "lora.toml"),
    ("ohwx_lr", {**GOOD, "lora.toml": "learning_rate = 5.0\n"}, "option.range", "lora.toml"),
    ("ohwx_policy", {**GOOD, "lora.toml": 'caption_policy = "sometimes"\n'}, "option.value", "lora.toml"),
    ("ohwx_both", {**GOOD, "lora.toml": "epochs = 3\nsteps = 100\n"}, "option.conflict", "lora.toml"),
    ("ohwx_badname", {**GOOD, "lora.toml": 'name = "../../evil"\n'}, "option.value", "lora.toml"),
    ("ohwx_tomldir", {**GOOD, "lora.toml": None}, "option.toml", "lora.toml"),
    ("ohwx_forceintoml", {**GOOD, "lora.toml": "force = true\n"}, "option.unknown", "lora.toml"),
    ("ohwx_badready", {**GOOD, "READY": "rank = = 3\n"}, "option.toml", "READY"),
    ("ohwx_readykey", {**GOOD, "READY": "colour = 1\n"}, "option.unknown", "READY"),
    ("ohwx_readytype", {**GOOD, "READY": "force = 1\n"}, "option.type", "READY"),
]


@pytest.mark.parametrize("name, files, code, file", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_dataset_gives_specific_error(tmp_path, name, files, code, file):
    folder = build(tmp_path, name, files)
    report = validate_dataset(folder)
    assert not report.valid
    matching = [f for f in report.errors if f.code.startswith(code) and f.file == file]
    assert matching, f"expected {code} on {file}, got {[f.line() for f in report.errors]}"
    finding = matching[0]
    assert finding.message and finding.hint  # what is wrong, what to do


def test_corpus_is_large_enough():
    assert len(BAD_CASES) >= 30


GOOD_CASES = [
    ("ohwx_plain", {"a.png": png_bytes(), "a.txt": CAP}),
    ("ohwx_jpeg", {"a.jpeg": jpeg_bytes(), "a.txt": CAP, "b.JPG": jpeg_bytes(color=(9, 9, 9)), "b.txt": CAP}),
    ("ohwx_webp", {"a.webp": webp_bytes(), "a.txt": CAP}),
    ("ohwx_cmyk", {"a.jpg": cmyk_jpeg(), "a.txt": CAP}),
    ("ohwx_png16", {"a.png": png16(), "a.txt": CAP}),
    ("ohwx_palette", {"a.png": palette_transparent(), "a.txt": CAP}),
    ("ohwx_exif", {"a.jpg": exif_rotated_portrait(), "a.txt": CAP}),
    ("ohwx_prepend", {"a.png": png_bytes(), "a.txt": b"a photo of her"}),
    (
        "ohwx_unicode names",
        {"é 1.png": png_bytes(), "é 1.txt": CAP, "日本.png": png_bytes(color=(1, 1, 1)), "日本.txt": CAP},
    ),
    (
        "ohwx_ignored",
        {**GOOD, ".DS_Store": b"x", "._a.png": b"x", "notes.md": b"x", "b.png.icloud": b"", "DONE": b"x"},
    ),
    (
        "ohwx_options",
        {**GOOD, "lora.toml": 'rank = 8\nalpha = 8\nepochs = 3\npreview_prompt = "ohwx, smiling"\n'},
    ),
    ("ohwx_symlinkin", {**GOOD, "b.png": ("symlink", "a.png"), "b.txt": CAP}),
    ("ohwx_orphan", {**GOOD, "c.txt": CAP}),
    ("ohwx_dupes", {**GOOD, "b.png": png_bytes(), "b.txt": CAP}),
]


@pytest.mark.parametrize("name, files", GOOD_CASES, ids=[c[0] for c in GOOD_CASES])
def test_good_dataset_passes_and_snapshots(tmp_path, name, files):
    root = tmp_path / "training_data"
    folder = build(root, name, files)
    before = tree_hash(folder)
    report = validate_dataset(folder)
    assert report.valid, [f.line() for f in report.errors]
    effective = {"model": "tiny-z-image"}
    manifest = take_snapshot(
        report, tmp_path / "job", preview_prompt=choose_preview_prompt(report), effective=effective
    )
    assert tree_hash(folder) == before  # validate + snapshot modified nothing
    data = tmp_path / "job" / "data"
    images = [p for p in data.iterdir() if p.suffix in contract.IMAGE_EXTS]
    assert len(images) == len(report.images) == len(manifest["images"])
    for image in images:
        caption = (data / (image.stem + ".txt")).read_text(encoding="utf-8")
        assert contract.trigger_in(caption, "ohwx")
        with Image.open(image) as im:
            assert im.mode in ("RGB", "RGBA", "L", "P", "1", "LA")
    assert (data / "preview.txt").read_text().strip()


def test_warnings_for_good_but_imperfect(tmp_path):
    folder = build(
        tmp_path,
        "ohwx_warn",
        {
            "a.png": png_bytes(size=(300, 900)),  # aspect 3:1 and below 512
            "a.txt": b"a photo",
            "b.png": png_bytes(size=(300, 900)),
            "b.txt": ("ohwx " + "word " * 500).encode(),
            "c.jpg": cmyk_jpeg(),
            "c.txt": CAP,
            "orphan.txt": CAP,
        },
    )
    report = validate_dataset(folder)
    assert report.valid
    codes = {(f.code, f.file) for f in report.warnings}
    for expected in [
        ("image.aspect", "a.png"),
        ("image.lowres", "a.png"),
        ("caption.prepended", "a.txt"),
        ("caption.long", "b.txt"),
        ("image.duplicate", "b.png"),
        ("image.convert", "c.jpg"),
        ("caption.orphan", "orphan.txt"),
        ("folder.few", "."),
    ]:
        assert expected in codes, (expected, codes)
    assert report.captions["a.png"] == "ohwx, a photo"


def test_exif_orientation_is_applied_to_geometry(tmp_path):
    folder = build(tmp_path, "ohwx_rot", {"a.jpg": exif_rotated_portrait(), "a.txt": CAP})
    report = validate_dataset(folder)
    assert (report.images[0].width, report.images[0].height) == (300, 600)


def test_conversions_in_snapshot(tmp_path):
    folder = build(
        tmp_path,
        "ohwx_conv",
        {
            "a.jpg": cmyk_jpeg(),
            "a.txt": CAP,
            "b.png": png16(),
            "b.txt": CAP,
            "c.png": palette_transparent(),
            "c.txt": CAP,
        },
    )
    report = validate_dataset(folder)
    manifest = take_snapshot(report, tmp_path / "job", preview_prompt="p", effective={})
    for entry in manifest["images"]:
        assert entry["converted"]
        with Image.open(tmp_path / "job" / "data" / entry["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
    b = next(e for e in manifest["images"] if e["source"] == "b.png")
    with Image.open(tmp_path / "job" / "data" / b["image"]) as im:
        assert im.getpixel((5, 5))[0] == 40000 * 255 // 65535  # 16-bit scaled, not clipped to white


def test_snapshot_is_immune_to_in_place_edits(tmp_path):
    folder = make_dataset(tmp_path / "ohwx_edit", images=2)
    report = validate_dataset(folder)
    take_snapshot(report, tmp_path / "job", preview_prompt="p", effective={})
    snap = tmp_path / "job" / "data" / "0001.png"
    before = snap.read_bytes()
    with (folder / "img_000.png").open("r+b") as fh:  # in-place edit of the original
        fh.seek(100)
        fh.write(b"\x00" * 50)
    (folder / "img_001.png").unlink()
    assert snap.read_bytes() == before
    assert (tmp_path / "job" / "data" / "0002.png").exists()


def test_fingerprint_depends_on_names_contents_and_settings(tmp_path):
    folder = make_dataset(tmp_path / "ohwx_fp", images=2)
    base = fingerprint(validate_dataset(folder), {"rank": 16})
    assert base == fingerprint(validate_dataset(folder), {"rank": 16})
    assert base != fingerprint(validate_dataset(folder), {"rank": 8})
    (folder / "img_000.txt").write_text("ohwx, another caption")
    assert base != fingerprint(validate_dataset(folder), {"rank": 16})


def test_snapshot_passes_mflux_config_validation(tmp_path):
    """Every valid snapshot resolves with mflux's own TrainingSpec (the --dry-run path)."""
    from mflux.models.common.training.state.training_spec import TrainingSpec

    from engines.mflux.config import build_config
    from engines.mflux.memory_plan import plan_memory

    for index, (name, files) in enumerate(GOOD_CASES):
        folder = build(tmp_path / "td", name, files)
        report = validate_dataset(folder)
        job = tmp_path / f"job{index}"
        take_snapshot(report, job, preview_prompt=choose_preview_prompt(report), effective={})
        for model in ("z-image-turbo", "tiny-z-image"):
            memory = plan_memory(
                model=model, total_gb=32, available_gb=30, image_count=len(report.images), max_side=1024
            )
            config, total = build_config(
                model=model,
                memory=memory,
                options=report.options,
                image_count=len(report.images),
                data_dir=job / "data",
                output_dir=job / "train",
                model_path=None,
            )
            config_path = job / f"train-{model}.json"
            config_path.write_text(json.dumps(config))
            spec = TrainingSpec.resolve(
                config_path=str(config_path), resume_path=None, create_output_dir=False
            )
            assert len(spec.data) == len(report.images)
            assert not spec.is_edit
            assert spec.monitoring.preview_prompts == [choose_preview_prompt(report)]
            assert total >= 1


# -- options --------------------------------------------------------------------------------


def test_ready_wins_over_lora_toml():
    toml, problems = parse_options("rank = 8\nepochs = 4\n", "lora.toml", allow_force=False)
    ready, more = parse_options(b"rank = 32\nsteps = 100\nforce = true\n", "READY", allow_force=True)
    assert not problems and not more
    assert merge(toml, ready) == {"rank": 32, "steps": 100, "force": True}
    assert parse_options(b"", "READY", allow_force=True) == ({}, [])


def test_preview_prompt_choice(tmp_path):
    folder = build(tmp_path, "ohwx_p", {**GOOD, "preview_2.txt": "second", "preview_1.txt": "first"})
    assert choose_preview_prompt(validate_dataset(folder)) == "first"
    folder = build(
        tmp_path, "ohwx_q", {**GOOD, "preview_1.txt": "first", "lora.toml": 'preview_prompt = "opt"\n'}
    )
    assert choose_preview_prompt(validate_dataset(folder)) == "opt"
    folder = build(tmp_path, "ohwx_r", GOOD)
    assert choose_preview_prompt(validate_dataset(folder)) == "ohwx, portrait photo"


# -- markers --------------------------------------------------------------------------------

MARKER_TABLE = [
    ("queued", "QUEUED"),
    ("preparing", "TRAINING"),
    ("training", "TRAINING"),
    ("rendering", "TRAINING"),
    ("publishing", "TRAINING"),
    ("interrupted", "QUEUED"),
    ("done", "DONE"),
    ("failed", "FAILED.txt"),
    ("cancelled", "CANCELLED"),
]


@pytest.mark.parametrize("state, marker", MARKER_TABLE)
def test_marker_state_machine(state, marker):
    name, remove = markers.marker_plan(state)
    assert name == marker
    assert set(remove) == set(markers.STATE_MARKERS) - {marker}
    assert "READY" not in remove


def test_one_marker_at_a_time_and_user_files_untouched(tmp_path):
    folder = make_dataset(tmp_path / "ohwx_m", images=1)
    (folder / "READY").write_text("")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for state, marker in MARKER_TABLE:
        assert markers.write_marker(folder, state, f"text for {state}")
        present = {p.name for p in folder.iterdir()} & set(markers.STATE_MARKERS)
        assert present == {marker}
        assert (folder / marker).read_text() == f"text for {state}\n"
    for name, data in before.items():
        assert (folder / name).read_bytes() == data
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_marker_not_written_into_a_vanished_folder(tmp_path):
    assert markers.write_marker(tmp_path / "gone", "queued", "x") is False
    assert not (tmp_path / "gone").exists()


def test_validate_cli_exit_codes(tmp_path):
    import subprocess
    import sys

    good = make_dataset(tmp_path / "ohwx_good", images=2)
    bad = build(tmp_path, "ohwx_bad", {"a.png": b"nope", "a.txt": CAP})

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "validate", *a], capture_output=True, text=True
        )

    ok = run(str(good))
    assert ok.returncode == 0 and "valid" in ok.stdout
    result = run(str(bad))
    assert result.returncode == 1 and "a.png" in result.stdout and "ERROR" in result.stdout
    as_json = json.loads(run(str(bad), "--json").stdout)
    assert as_json["valid"] is False and as_json["errors"][0]["file"] == "a.png"
    assert run(str(tmp_path / "missing")).returncode == 2
