"""The dataset contract's steps, one table each (pure: small files under tmp_path at most, no
subprocess, no daemon, no sleep).

validate_dataset (daemon/intake/validate.py) composes these steps; the texts pinned here are what a
user reads in FAILED.txt, QUEUED and `lorad check`, so a changed word fails here first.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from daemon.intake import caption_sources as cs
from daemon.intake import contract, metadata
from daemon.intake import images as img
from daemon.intake import options as opts
from daemon.intake import validate as v
from daemon.intake.contract import FolderName
from daemon.intake.findings import Finding
from daemon.intake.take import ready_refusal

# -- the folder and its name -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, trigger, lora, codes",
    [
        ("ohwx_alice", "ohwx", "alice", []),
        ("a_b_c", "a", "b_c", []),  # the trigger ends at the first '_'
        ("nounderscore", None, None, ["folder.name"]),
        ("_alice", None, None, ["folder.name"]),
        ("ohwx_", None, None, ["folder.name"]),
        ("ohwx_.hidden", None, None, ["folder.name"]),
        ("oh\x07wx_alice", "oh\x07wx", "alice", ["folder.name"]),  # parsed, and refused for the control char
        ("ohwx_\udcffa", "ohwx", "\udcffa", ["folder.encoding"]),
    ],
)
def test_folder_name_findings(name, trigger, lora, codes):
    parsed, findings = v.folder_name_findings(name)
    assert (parsed.trigger if parsed else None, parsed.name if parsed else None) == (trigger, lora)
    assert [f.code for f in findings] == codes
    assert all(f.level == "error" and f.file == "." for f in findings)


def test_folder_name_encoding_shows_the_bad_byte():
    (finding,) = v.folder_name_findings("ohwx_\udcffa")[1]
    assert (
        finding.message == "folder name 'ohwx_\\xffa' is not valid UTF-8 (undecodable bytes shown as \\xNN)"
    )


@pytest.mark.parametrize(
    "kind, code", [(None, "folder.missing"), ("file", "folder.notdir"), ("link", "folder.symlink")]
)
def test_folder_findings_end_validation(tmp_path, kind, code):
    target = tmp_path / "ohwx_a"
    if kind == "file":
        target.write_text("x")
    elif kind == "link":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    (finding,) = v.folder_findings(target)
    assert (finding.level, finding.file, finding.code) == ("error", ".", code)


def test_a_real_folder_has_no_folder_findings(tmp_path):
    assert v.folder_findings(tmp_path) == []


# -- entry names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, code, file",
    [
        ("a.png", None, None),
        ("é 1.png", None, None),
        ("日本.txt", None, None),
        ("a\x07b.png", "name.control", "'a\\x07b.png'"),
        ("a\x7f.png", "name.control", "'a\\x7f.png'"),
        ("\udcffa.png", "name.encoding", "\\xffa.png"),  # undecodable bytes shown, not the surrogate
    ],
)
def test_name_finding(name, code, file):
    finding = v.name_finding(name)
    assert (finding.code if finding else None, finding.file if finding else None) == (code, file)


@pytest.mark.parametrize(
    "name, prefixes, refused",
    [
        ("preview.png", v.RESERVED_IMAGE_PREFIXES, True),
        ("preview_1.jpg", v.RESERVED_IMAGE_PREFIXES, True),
        ("Preview_x.PNG", v.RESERVED_IMAGE_PREFIXES, True),  # compared in lower case
        ("mypreview.png", v.RESERVED_IMAGE_PREFIXES, False),
        ("a.png", v.RESERVED_IMAGE_PREFIXES, False),
        ("preview.png", (), False),  # an engine that reserves nothing
        ("ctrl_1.png", ("ctrl",), True),
    ],
)
def test_reserved_image_finding(name, prefixes, refused):
    finding = v.reserved_image_finding(name, prefixes)
    assert (finding is not None) is refused
    if finding is not None:
        assert (finding.level, finding.file, finding.code) == ("error", name, "name.preview")


def test_reserved_preview_text_is_unchanged():
    finding = v.reserved_image_finding("preview.png")
    assert finding is not None
    assert finding.message == "images named preview* are refused by mflux outside edit training"
    assert finding.hint == "rename the image (and its caption)"


@pytest.mark.parametrize(
    "engine, reserved, tokens",
    [("mflux", ("preview",), 512), ("scripted", ("preview",), None)],
)
def test_limits_take_the_engines_rules(tmp_path, engine, reserved, tokens):
    from daemon.settings import Settings

    got = v.limits(Settings(assets=tmp_path / "assets", engine=engine))
    assert (got["reserved_image_prefixes"], got["max_caption_tokens"]) == (reserved, tokens)


def test_limits_read_the_reserved_names_from_the_engine(tmp_path, monkeypatch):
    """validate_dataset gets the training engine's reserved names, not a constant of intake."""
    import daemon.engine_host
    from daemon.settings import Settings
    from engines.base import IntakeLimits

    class Engine:
        def intake_limits(self):
            return IntakeLimits(max_caption_tokens=77, reserved_image_prefixes=("ctrl",))

    monkeypatch.setattr(daemon.engine_host, "make_engine", lambda settings: Engine())
    got = v.limits(Settings(assets=tmp_path / "assets"))
    assert (got["reserved_image_prefixes"], got["max_caption_tokens"]) == (("ctrl",), 77)
    folder = _folder(tmp_path, {"ctrl_1.png": b"x", "preview.png": b"x"})
    entries, findings = v.sort_entries(folder, v.list_entries(folder)[0], got["reserved_image_prefixes"])
    assert [f.file for f in findings] == ["ctrl_1.png"] and [n for n, _ in entries.images] == ["preview.png"]


@pytest.mark.parametrize(
    "names, kept, refused",
    [
        (["a.png", "b.png"], ["a.png", "b.png"], []),
        (["a.jpg", "a.png"], ["a.jpg"], ["a.png"]),
        (["a.jpg", "a.png", "a.webp", "b.png"], ["a.jpg", "b.png"], ["a.png", "a.webp"]),
        (["x.y.png", "x.y.jpg", "x.png"], ["x.y.png", "x.png"], ["x.y.jpg"]),
        ([], [], []),
    ],
)
def test_unique_stems(names, kept, refused):
    unique, findings = v.unique_stems([(n, Path(n)) for n in names])
    assert [n for n, _ in unique] == kept
    assert [f.file for f in findings] == refused
    assert all(f.code == "name.samestem" for f in findings)


def test_same_stem_text_names_the_first():
    (finding,) = v.unique_stems([("a.jpg", Path("a.jpg")), ("a.png", Path("a.png"))])[1]
    assert finding.message == "has the same stem as a.jpg; each image needs its own <stem>.txt"


def _folder(root: Path, files: dict) -> Path:
    folder = root / "ohwx_a"
    folder.mkdir()
    for name, content in files.items():
        if content is None:
            (folder / name).mkdir()
        elif isinstance(content, tuple):
            os.symlink(content[1], folder / name)
        else:
            (folder / name).write_bytes(content)
    return folder


def test_sort_entries_files_every_kind(tmp_path):
    folder = _folder(
        tmp_path,
        {
            "a.png": b"x",
            "a.txt": b"c",
            "b.heic": b"x",
            "preview_1.txt": b"p",
            "notes.md": b"x",
            ".DS_Store": b"x",
            "READY": b"",
            "lora.toml": b"",
            "c.png": ("link", "a.png"),
        },
    )
    entries, findings = v.sort_entries(folder, v.list_entries(folder)[0])
    assert findings == []
    assert [n for n, _ in entries.images] == ["a.png", "c.png"]
    assert list(entries.captions) == ["a"]
    assert [n for n, _ in entries.previews] == ["preview_1.txt"]
    assert entries.unsupported == ["b.heic"]


@pytest.mark.parametrize(
    "files, code, file",
    [
        ({"a.png": ("link", "/etc/hostname")}, "name.symlink", "a.png"),
        ({"a.png": ("link", "missing.png")}, "name.symlink", "a.png"),
        ({"a.txt": None}, "caption.directory", "a.txt"),
        ({"preview_1.txt": None}, "caption.directory", "preview_1.txt"),
        ({"preview.png": b"x"}, "name.preview", "preview.png"),
    ],
)
def test_sort_entries_refuses(tmp_path, files, code, file):
    folder = _folder(tmp_path, files)
    entries, findings = v.sort_entries(folder, v.list_entries(folder)[0])
    assert [(f.code, f.file) for f in findings] == [(code, file)]
    assert not entries.images and not entries.captions and not entries.previews


def test_sort_entries_refuses_a_fifo_without_opening_it(tmp_path):
    folder = _folder(tmp_path, {})
    os.mkfifo(folder / "a.txt")
    _, findings = v.sort_entries(folder, v.list_entries(folder)[0])
    assert [(f.code, f.file, f.message) for f in findings] == [
        ("file.special", "a.txt", "is a FIFO (named pipe), not a file")
    ]


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files, ready_text, read_ready, merged, codes",
    [
        ({}, None, True, {}, []),
        ({"lora.toml": b"rank = 8\n"}, None, True, {"rank": 8}, []),
        ({"lora.toml": b"rank = 8\n", "READY": b"rank = 4\n"}, None, True, {"rank": 4}, []),  # READY wins
        ({"lora.toml": b"rank = 8\n", "READY": b"rank = 4\n"}, None, False, {"rank": 8}, []),
        ({"READY": b"rank = 4\n"}, b"rank = 2\n", True, {"rank": 2}, []),  # the text given wins over the file
        ({"lora.toml": b"force = true\n"}, None, True, {}, ["option.unknown"]),  # force: READY only
        ({"READY": b"force = true\n"}, None, True, {"force": True}, []),
        ({"lora.toml": None}, None, True, {}, ["option.toml"]),
        ({"lora.toml": b"x" * (64 * 1024 + 1)}, None, True, {}, ["option.huge"]),
        ({"READY": ("link", "lora.toml"), "lora.toml": b"rank = 8\n"}, None, True, {"rank": 8}, []),
    ],
)
def test_read_dataset_options(tmp_path, files, ready_text, read_ready, merged, codes):
    options = v.read_dataset_options(_folder(tmp_path, files), ready_text, read_ready)
    assert {k: options.merged[k] for k in merged} == merged
    assert not set(options.merged) - set(merged)
    assert [f.code for f in options.findings] == codes


@pytest.mark.parametrize(
    "text, value, code",
    [
        ("rank = 16", 16, None),
        ("alpha = 8", 8.0, None),  # an int where a float is wanted is that float
        ("rank = true", None, "option.type"),  # a bool is not an int here
        ('rank = "16"', None, "option.type"),
        ("rank = 0", None, "option.range"),
        ("rank = 257", None, "option.range"),
        ("learning_rate = 2.0", None, "option.range"),
        ('caption_policy = "require"', "require", None),
        ('caption_policy = "sometimes"', None, "option.value"),
        ('missing_captions = "vlm"', "vlm", None),
        ('missing_captions = "ask"', None, "option.value"),
        ('kind = "style"', "style", None),
        ('kind = "scene"', None, "option.value"),
        ('engine = "mflux"', "mflux", None),
        ('engine = "nope"', None, "option.value"),
        ('name = "  alice  "', "alice", None),  # text is stripped
        ('name = "   "', None, "option.value"),
        ('name = "../evil"', None, "option.value"),
        ('name = ".hidden"', None, "option.value"),
        ('trigger = "a\\u0007b"', None, "option.value"),  # a control character
        ('preview_prompts = ["a", " b "]', ["a", "b"], None),
        ("preview_prompts = []", None, "option.range"),
        ("preview_prompts = [1]", None, "option.type"),
        ("write_captions = 1", None, "option.type"),
    ],
)
def test_option_values(text, value, code):
    key = text.split(" = ")[0]
    parsed, findings = opts.parse_options(text + "\n", "lora.toml", allow_force=False)
    assert parsed.get(key) == value
    assert [f.code for f in findings] == ([code] if code else [])


@pytest.mark.parametrize(
    "text, code",
    [
        (b"rank = = 3", "option.toml"),
        (b"rank = 1\x00", "option.toml"),
        (b"\xff\xfe", "option.toml"),
        (b"colour = 1", "option.unknown"),
        (b"epochs = 3\nsteps = 100", "option.conflict"),
    ],
)
def test_option_files(text, code):
    assert [f.code for f in opts.parse_options(text, "READY", allow_force=True)[1]] == [code]


def test_choice_text_is_unchanged():
    (finding,) = opts.parse_options('caption_policy = "sometimes"', "lora.toml", allow_force=False)[1]
    assert finding.message == "key 'caption_policy' must be one of prepend, require, got 'sometimes'"
    assert finding.hint == 'write caption_policy = "prepend" (default) or "require"'


@pytest.mark.parametrize(
    "toml, ready, parsed, want",
    [
        ({}, {}, FolderName("ohwx", "alice"), ("ohwx", "alice", ".")),
        ({"name": "bob"}, {}, FolderName("ohwx", "alice"), ("ohwx", "bob", "lora.toml")),
        ({"name": "bob"}, {"name": "carol"}, FolderName("ohwx", "alice"), ("ohwx", "carol", "READY")),
        ({"trigger": "sks"}, {}, FolderName("ohwx", "alice"), ("sks", "alice", ".")),
        ({}, {}, None, (None, None, ".")),
        ({"trigger": "sks", "name": "n"}, {}, None, ("sks", "n", "lora.toml")),
    ],
)
def test_identity(toml, ready, parsed, want):
    assert v.identity(v.DatasetOptions(toml=toml, ready=ready), parsed) == want


# -- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, limit, code",
    [(0, 100, "image.empty"), (1, 100, None), (100, 100, None), (101, 100, "image.huge")],
)
def test_size_finding(size, limit, code):
    finding = img.size_finding("a.png", size, limit)
    assert (finding.code if finding else None) == code


def test_image_too_big_text():
    assert img.image_too_big("a.png", 123_000_000, 100_000_000).message == (
        "is 123.0 MB; images larger than 100 MB are refused before decoding (setting max_image_bytes)"
    )


@pytest.mark.parametrize(
    "fmt, w, h, code",
    [
        ("PNG", 1024, 1024, None),
        ("JPEG", 8000, 8000, None),  # exactly MAX_PIXELS
        ("MPO", 300, 300, None),
        ("WEBP", 300, 300, None),
        ("GIF", 300, 300, "image.format"),
        ("TIFF", 300, 300, "image.format"),
        ("PNG", 8001, 8000, "image.bomb"),
        ("PNG", 40000, 40000, "image.bomb"),
    ],
)
def test_format_finding(fmt, w, h, code):
    finding = img.format_finding("a.png", fmt, w, h)
    assert (finding.code if finding else None) == code


@pytest.mark.parametrize(
    "mode, transparency, reason",
    [
        ("RGB", False, None),
        ("RGBA", False, None),
        ("L", False, None),
        ("P", False, None),
        ("P", True, "palette with transparency converted to RGB on white"),
        ("CMYK", False, "CMYK converted to RGB"),
        ("I;16", False, "I;16 (16-bit/float) converted to 8-bit RGB"),
        ("F", False, "F (16-bit/float) converted to 8-bit RGB"),
        ("YCbCr", False, "YCbCr converted to RGB"),
    ],
)
def test_conversion_reason(mode, transparency, reason):
    assert img.conversion_reason(mode, transparency) == reason


def _info(name, w=1024, h=1024, sha="s1", convert=None):
    return img.ImageInfo(name, w, h, "RGB", "PNG", sha, 1000, convert)


@pytest.mark.parametrize(
    "results, kept, codes",
    [
        ([_info("a.png")], ["a.png"], []),
        ([_info("a.png", 300, 300)], ["a.png"], ["image.lowres"]),
        ([_info("a.png", 100, 1000)], ["a.png"], ["image.small"]),
        ([_info("a.png", 600, 2000)], ["a.png"], ["image.aspect"]),
        ([_info("a.png", convert="CMYK converted to RGB")], ["a.png"], ["image.convert"]),
        ([_info("a.png"), _info("b.png")], ["a.png", "b.png"], ["image.duplicate"]),
        ([_info("a.png"), _info("b.png", sha="s2")], ["a.png", "b.png"], []),
        (
            [Finding.error("a.png", "m", "h", code="image.corrupt"), _info("b.png")],
            ["b.png"],
            ["image.corrupt"],
        ),
    ],
)
def test_image_findings(results, kept, codes):
    infos, findings = img.image_findings(results)
    assert [i.name for i in infos] == kept
    assert [f.code for f in findings] == codes


def test_duplicate_names_the_first_copy():
    _, (finding,) = img.image_findings([_info("a.png"), _info("b.png"), _info("c.png", sha="s2")])
    assert (finding.file, finding.message) == ("b.png", "is an exact duplicate of a.png")


def _png(size=(600, 600)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "content, code",
    [
        (_png(), None),
        (b"", "image.empty"),
        (b"not an image", "image.notimage"),
        (_png()[:-30], "image.corrupt"),
        (None, "image.directory"),
    ],
)
def test_inspect_image(tmp_path, content, code):
    path = tmp_path / "a.png"
    path.mkdir() if content is None else path.write_bytes(content)
    result = img.inspect_image(path, "a.png")
    if code is None:
        assert isinstance(result, img.ImageInfo) and (result.width, result.height, result.format) == (
            600,
            600,
            "PNG",
        )
    else:
        assert isinstance(result, Finding) and result.code == code


# -- captions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, size, result",
    [
        (b"ohwx,  a\n photo ", None, "ohwx, a photo"),
        (b"\xef\xbb\xbfohwx", None, "ohwx"),  # a BOM is dropped
        (b"ohwx", 70_000, "caption.huge"),  # the real size, when only the start was read
        (b"ohwx\x00", None, "caption.nul"),
        ("caf\xe9".encode("latin-1"), None, "caption.encoding"),
        (b" \t\n", None, "caption.empty"),
    ],
)
def test_decode_caption(raw, size, result):
    got = contract.decode_caption("a.txt", raw, len(raw) if size is None else size, 64 * 1024)
    assert (got.code if isinstance(got, Finding) else got) == result


@pytest.mark.parametrize(
    "text, policy, want, codes",
    [
        ("ohwx, a photo", "prepend", "ohwx, a photo", []),
        ("OHWX in a park", "require", "OHWX in a park", []),  # found without regard to case
        ("ohwxy in a park", "prepend", "ohwx, ohwxy in a park", ["caption.prepended"]),  # a whole word only
        ("a photo", "prepend", "ohwx, a photo", ["caption.prepended"]),
        ("a photo", "require", None, ["caption.trigger"]),
    ],
)
def test_apply_trigger(text, policy, want, codes):
    got, findings = contract.apply_trigger("a.txt", text, "ohwx", policy)
    assert got == want
    assert [f.code for f in findings] == codes


@pytest.mark.parametrize(
    "length, tokens, warned", [(1792, 512, False), (1793, 512, True), (10**5, None, False)]
)
def test_length_finding(length, tokens, warned):
    assert (contract.length_finding("a.txt", "x" * length, tokens) is not None) is warned


def _line(n, name, text="ohwx, x"):
    return metadata.MetadataLine(n, name, text)


@pytest.mark.parametrize(
    "lines, images, unsupported, sidecars, paired, codes",
    [
        ([_line(1, "a.png")], {"a.png"}, [], {}, ["a.png"], []),
        ([_line(1, "z.png")], {"a.png"}, [], {}, [], ["metadata.missing"]),
        ([_line(1, "b.heic")], {"a.png"}, ["b.heic"], {}, [], ["metadata.unsupported_image"]),
        ([_line(1, "a.png")], {"a.png"}, [], {"a": Path("a.txt")}, [], ["metadata.shadowed"]),
        (
            [_line(1, "a.png"), _line(2, "b.png")],
            {"a.png", "b.png"},
            [],
            {"b": Path("b.txt")},
            ["a.png"],
            ["metadata.shadowed"],
        ),
    ],
)
def test_pair_metadata(lines, images, unsupported, sidecars, paired, codes):
    by_image, findings = cs.pair_metadata(lines, images, unsupported, sidecars)
    assert sorted(by_image) == paired
    assert [f.code for f in findings] == codes


@pytest.mark.parametrize(
    "missing, caption, uncaptioned, code",
    [
        ("refuse", None, [], "caption.missing"),
        ("trigger", "ohwx", [], "caption.trigger_only"),
        ("vlm", None, ["a.png"], None),
    ],
)
def test_no_caption(missing, caption, uncaptioned, code):
    out = cs.Captions()
    cs.no_caption("a.png", "ohwx", missing, out)
    assert out.texts.get("a.png") == caption
    assert out.uncaptioned == uncaptioned
    assert [f.code for f in out.findings] == ([code] if code else [])


def test_missing_caption_text_is_unchanged():
    out = cs.Captions()
    cs.no_caption("a.png", "ohwx", "refuse", out)
    assert out.findings[0].message == (
        'has no caption (a.txt is missing and no metadata.jsonl line names it; missing_captions = "refuse")'
    )


@pytest.mark.parametrize(
    "sidecar, line, policy, text, source, codes",
    [
        (b"ohwx, a photo", None, "prepend", "ohwx, a photo", "file", []),
        (b"a photo", None, "prepend", "ohwx, a photo", "file", ["caption.prepended"]),
        (b"a photo", None, "require", None, None, ["caption.trigger"]),
        (b"  ", None, "prepend", None, None, ["caption.empty"]),
        (b"ohwx \x00", None, "prepend", None, None, ["caption.nul"]),
        (b"ohwx, from file", "ohwx, from line", "prepend", "ohwx, from file", "file", []),  # sidecar first
        (None, "ohwx,   from  line", "prepend", "ohwx, from line", "metadata.jsonl", []),
        (None, None, "prepend", None, None, ["caption.missing"]),
    ],
)
def test_caption_images(tmp_path, sidecar, line, policy, text, source, codes):
    sidecars = {}
    if sidecar is not None:
        (tmp_path / "a.txt").write_bytes(sidecar)
        sidecars["a"] = tmp_path / "a.txt"
    by_image = {"a.png": _line(1, "a.png", line)} if line is not None else {}
    out = cs.caption_images(["a.png"], sidecars, by_image, cs.CaptionRules(trigger="ohwx", policy=policy))
    assert (out.texts.get("a.png"), out.sources.get("a.png")) == (text, source)
    assert [f.code for f in out.findings] == codes


def test_caption_finding_names_the_metadata_line(tmp_path):
    out = cs.caption_images(["a.png"], {}, {"a.png": _line(7, "a.png", "")}, cs.CaptionRules(trigger="ohwx"))
    assert [(f.file, f.code) for f in out.findings] == [("metadata.jsonl line 7", "caption.empty")]


@pytest.mark.parametrize("tokens, warned", [(None, False), (512, True), (10_000, False)])
def test_caption_length_uses_the_engines_tokens(tmp_path, tokens, warned):
    (tmp_path / "a.txt").write_text("ohwx " + "x" * 2000)
    rules = cs.CaptionRules(trigger="ohwx", max_tokens=tokens)
    out = cs.caption_images(["a.png"], {"a": tmp_path / "a.txt"}, {}, rules)
    assert ("caption.long" in [f.code for f in out.findings]) is warned


@pytest.mark.parametrize("problem, where", [(None, None), ("the captioner 'x' is not here", "lora.toml")])
def test_captioner_finding(problem, where):
    finding = cs.captioner_finding(3, problem, "lora.toml")
    assert (finding.file if finding else None) == where
    if finding is not None:
        assert (
            finding.message
            == "3 images need captions (missing_captions = \"vlm\"), but the captioner 'x' is not here"
        )


@pytest.mark.parametrize(
    "sidecars, stems, unsupported, want",
    [
        ({"a": "a.txt"}, {"a"}, [], []),
        ({"c": "c.txt"}, {"a"}, [], [("c.txt", "caption.orphan")]),
        ({"b": "b.txt"}, {"a"}, ["b.heic"], [("b.txt", "caption.unsupported_image")]),
        (
            {"b": "b.txt", "c": "c.txt"},
            set(),
            ["b.gif"],
            [("b.txt", "caption.unsupported_image"), ("c.txt", "caption.orphan")],
        ),
    ],
)
def test_orphan_findings(sidecars, stems, unsupported, want):
    findings = cs.orphan_findings({k: Path(p) for k, p in sidecars.items()}, stems, unsupported)
    assert [(f.file, f.code) for f in findings] == want
    assert all(f.level == "warning" for f in findings)


@pytest.mark.parametrize(
    "content, prompt, code",
    [
        (b"ohwx,  smiling\n", "ohwx, smiling", None),
        (b"\xef\xbb\xbfohwx", "ohwx", None),  # a BOM is not part of the prompt
        (b"   ", None, None),  # empty: left out, not an error
        (b"\xff\xfe", None, "preview.encoding"),
    ],
)
def test_read_previews(tmp_path, content, prompt, code):
    (tmp_path / "preview_1.txt").write_bytes(content)
    prompts, findings = cs.read_previews([("preview_1.txt", tmp_path / "preview_1.txt")], 1000)
    assert prompts.get("preview_1.txt") == prompt
    assert [f.code for f in findings] == ([code] if code else [])


# -- counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, unsupported, kind, codes",
    [
        (0, 0, "character", ["folder.noimages"]),
        (0, 2, "character", ["folder.noimages"]),
        (1, 0, "character", ["folder.few"]),
        (9, 0, "character", ["folder.few"]),
        (10, 0, "character", []),
        (19, 0, "style", ["folder.few"]),
        (20, 0, "style", []),
        (5, 0, "something-else", ["folder.few"]),  # an unknown kind gets the character advice
        (12, 3, "character", []),
    ],
)
def test_count_findings(images, unsupported, kind, codes):
    assert [f.code for f in v.count_findings(images, unsupported, kind)] == codes


@pytest.mark.parametrize(
    "unsupported, message, hint",
    [
        (0, "no images found (.jpg .jpeg .png .webp)", "add images with same-name .txt captions"),
        (
            2,
            "no images found (.jpg .jpeg .png .webp); 2 in formats lorad does not train (see above)",
            "add images with same-name .txt captions, or convert the others to JPEG/PNG",
        ),
    ],
)
def test_no_images_text(unsupported, message, hint):
    (finding,) = v.count_findings(0, unsupported, "character")
    assert (finding.message, finding.hint) == (message, hint)


@pytest.mark.parametrize(
    "count, kind, want",
    [
        (
            3,
            "character",
            (
                "only 3 images; 10-30 give a more reliable character LoRA",
                "add more varied images of the subject",
            ),
        ),
        (10, "character", None),
        (
            3,
            "style",
            (
                "only 3 images; a style LoRA learns the look more reliably from 20-50 varied images in that style",
                "add more images in the style, with different subjects",
            ),
        ),
    ],
)
def test_image_count_advice(count, kind, want):
    assert v.image_count_advice(count, kind) == want


# -- taking READY ----------------------------------------------------------------------------

DIR, REG, LNK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777


@pytest.mark.parametrize(
    "folder_mode, ready_mode, says",
    [
        (DIR, REG, None),
        (
            LNK,
            REG,
            "the dataset folder is a symlink to /elsewhere/ohwx_a; lorad only trains real folders inside /td",
        ),
        (DIR, DIR, "READY is a folder; create READY as a plain empty file (touch READY)"),
        (DIR, LNK, "READY is a symlink; create READY as a plain empty file (touch READY)"),
        (DIR, stat.S_IFIFO | 0o644, "READY is a FIFO (named pipe), not a file: remove it"),
        (DIR, stat.S_IFSOCK | 0o644, "READY is a socket, not a file"),
    ],
)
def test_ready_refusal(folder_mode, ready_mode, says):
    link = "/elsewhere/ohwx_a" if stat.S_ISLNK(folder_mode) else None
    reason = ready_refusal(folder_mode, ready_mode, link, Path("/td"))
    if says is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(says), reason
