"""The dataset contract as pure rules: what each file name means, folder names, captions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.intake.findings import Finding

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Image formats people drop in that mflux does not train: named, with how to convert them.
UNSUPPORTED_IMAGE_FORMATS = {
    ".heic": "HEIC", ".heif": "HEIF", ".hif": "HEIF", ".avif": "AVIF", ".gif": "GIF", ".tif": "TIFF",
    ".tiff": "TIFF", ".bmp": "BMP", ".jxl": "JPEG XL", ".jp2": "JPEG 2000", ".j2k": "JPEG 2000",
    ".psd": "Photoshop", ".svg": "SVG", ".ico": "ICO", ".tga": "TGA", ".exr": "OpenEXR", ".hdr": "HDR",
    ".dng": "DNG (raw)", ".cr2": "Canon raw", ".cr3": "Canon raw", ".nef": "Nikon raw", ".arw": "Sony raw",
    ".raf": "Fujifilm raw", ".orf": "Olympus raw", ".rw2": "Panasonic raw",
}
MARKER_FILES = frozenset({"READY", "QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED"})
OPTIONS_FILE = "lora.toml"
READY = "READY"
# mflux pads prompts to 512 tokens; roughly 4 characters a token for English captions.
LONG_CAPTION_CHARS = 1800
MAX_CAPTION_BYTES = 64 * 1024
# READY and lora.toml hold a few options; anything larger is not an options file.
MAX_OPTIONS_BYTES = 64 * 1024
MIN_SIDE, SMALL_SIDE, MAX_ASPECT = 256, 512, 2.5
FEW_IMAGES = 10


def split_suffix(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:].lower()


def classify(name: str) -> str:
    """image | unsupported | caption | preview | ignored — from the name alone (kind of entry is
    checked later). `unsupported`: an image format that is not trained (HEIC, GIF, TIFF, ...)."""
    if name.startswith(".") or name.startswith("._") or name == "Icon\r":
        return "ignored"  # hidden, AppleDouble, .DS_Store, iCloud placeholders (.x.icloud)
    if name.endswith(".icloud") or name in MARKER_FILES or name == OPTIONS_FILE:
        return "ignored"
    stem, suffix = split_suffix(name)
    if suffix in IMAGE_EXTS:
        return "image"
    if suffix in UNSUPPORTED_IMAGE_FORMATS:
        return "unsupported"
    if suffix == ".txt":
        return "preview" if stem.startswith("preview") else "caption"
    return "ignored"


def has_control_chars(name: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in name)


def is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """A name as text that can be shown and stored: undecodable bytes as \\xNN (pure)."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def convert_hint(name: str) -> str:
    """How to turn an unsupported image into one lorad trains (pure)."""
    import shlex

    stem, suffix = split_suffix(name)
    fmt = UNSUPPORTED_IMAGE_FORMATS.get(suffix, suffix.lstrip(".").upper())
    if fmt in ("HEIC", "HEIF"):
        out = shlex.quote(stem + ".jpg")
        return (
            f"iPhone photos are HEIC: convert it to JPEG, e.g. on macOS `sips -s format jpeg {shlex.quote(name)} --out {out}` "
            "(or Preview > Export > JPEG; iPhone: Settings > Camera > Formats > Most Compatible takes JPEGs)"
        )
    out = shlex.quote(stem + ".png")
    source = shlex.quote(name + "[0]") if fmt == "GIF" else shlex.quote(name)
    return (
        f"convert it to PNG or JPEG, e.g. on macOS `sips -s format png {shlex.quote(name)} --out {out}` "
        f"or with ImageMagick `magick {source} {out}`"
    )


def unsupported_image(rel: str, *, only_images: bool) -> Finding:
    """An image format mflux does not train: a warning when other images train, an error when it
    would leave the dataset empty."""
    fmt = UNSUPPORTED_IMAGE_FORMATS.get(split_suffix(rel)[1], "this")
    message = f"{fmt} images are not supported (lorad trains JPEG, PNG and WebP)"
    if only_images:
        return Finding.error(rel, message, convert_hint(rel), code="image.unsupported")
    return Finding.warning(rel, message + ": this image is left out of training", convert_hint(rel), code="image.unsupported")


def special_file(rel: str, kind: str) -> Finding:
    """A FIFO, socket or device where a file belongs: never opened (a FIFO blocks a reader forever)."""
    return Finding.error(rel, f"is {kind}, not a file", "remove it: lorad reads only regular files", code="file.special")


def oversize_options(rel: str, size: int, limit: int = MAX_OPTIONS_BYTES) -> Finding:
    return Finding.error(
        rel,
        f"is {size:,} bytes; an options file may be at most {limit:,} bytes ({limit // 1024} KB)",
        "keep only `key = value` option lines in it (see the README's dataset contract)",
        code="option.huge",
    )


@dataclass(frozen=True)
class FolderName:
    trigger: str
    name: str


def parse_folder_name(folder: str) -> tuple[FolderName | None, Finding | None]:
    """`<trigger>_<name>`: the trigger is the text before the first underscore."""
    if "_" not in folder:
        return None, Finding.error(
            ".",
            f"folder name {folder!r} has no '_': datasets are named <trigger>_<name>",
            f"rename it, e.g. ohwx_{folder}",
            code="folder.name",
        )
    trigger, name = folder.split("_", 1)
    if not trigger.strip() or not name.strip():
        return None, Finding.error(
            ".",
            f"folder name {folder!r} needs text on both sides of the first '_' (<trigger>_<name>)",
            "rename it, e.g. ohwx_alice",
            code="folder.name",
        )
    if name.startswith("."):
        return None, Finding.error(
            ".",
            f"folder name {folder!r} gives the LoRA name {name!r}, a hidden file name",
            "rename the folder so the part after the first '_' does not start with '.'",
            code="folder.name",
        )
    return FolderName(trigger=trigger, name=name), None


def trigger_in(caption: str, trigger: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", caption, flags=re.IGNORECASE) is not None


def _size_text(n: int) -> str:
    return f"{n / 1024:,.0f} KB" if n >= 10 * 1024 else f"{n:,} bytes"


def check_caption(
    rel: str, raw: bytes, trigger: str, policy: str, size: int | None = None, max_bytes: int = MAX_CAPTION_BYTES
) -> tuple[str | None, list[Finding]]:
    """Decode and normalise one caption; returns (text for the snapshot, findings).
    `size` is the file's real size when only its first bytes were read."""
    size = len(raw) if size is None else size
    if size > max_bytes:
        return None, [
            Finding.error(
                rel,
                f"caption is {_size_text(size)} (limit {_size_text(max_bytes)}, setting max_caption_bytes); "
                "mflux reads at most 512 tokens (a few KB)",
                "shorten the caption to a sentence or two",
                code="caption.huge",
            )
        ]
    if b"\x00" in raw:
        return None, [
            Finding.error(rel, "caption contains NUL bytes (binary data?)", "save it as plain UTF-8 text", code="caption.nul")
        ]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, [
            Finding.error(
                rel,
                f"caption is not UTF-8 (bad byte at offset {exc.start})",
                "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                code="caption.encoding",
            )
        ]
    text = " ".join(text.split())
    if not text:
        return None, [
            Finding.error(rel, "caption is empty", "describe the image in a sentence, with the trigger word", code="caption.empty")
        ]
    findings: list[Finding] = []
    if not trigger_in(text, trigger):
        if policy == "require":
            return None, [
                Finding.error(
                    rel,
                    f"caption does not contain the trigger word {trigger!r} (caption_policy = \"require\")",
                    f"add {trigger!r} to the caption, or set caption_policy = \"prepend\"",
                    code="caption.trigger",
                )
            ]
        text = f"{trigger}, {text}"
        findings.append(
            Finding.warning(
                rel,
                f"caption lacks the trigger word; training uses \"{trigger}, ...\"",
                "add the trigger word yourself to control where it goes",
                code="caption.prepended",
            )
        )
    if len(text) > LONG_CAPTION_CHARS:
        findings.append(
            Finding.warning(
                rel,
                f"caption is {len(text)} characters; mflux truncates prompts at 512 tokens",
                "shorten it: text past the limit is ignored",
                code="caption.long",
            )
        )
    return text, findings


def check_geometry(rel: str, width: int, height: int) -> list[Finding]:
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        return [
            Finding.error(
                rel,
                f"image is {width}x{height}; the shortest side must be at least {MIN_SIDE} px",
                "use a larger image (1024 px is ideal) or remove it",
                code="image.small",
            )
        ]
    out = []
    if short < SMALL_SIDE:
        out.append(
            Finding.warning(
                rel, f"image is {width}x{height}; below {SMALL_SIDE} px training quality suffers", "use 1024 px if you can", code="image.lowres"
            )
        )
    if long / short > MAX_ASPECT:
        out.append(
            Finding.warning(
                rel,
                f"aspect ratio {long / short:.1f}:1 is extreme (beyond {MAX_ASPECT}:1)",
                "crop closer to the subject",
                code="image.aspect",
            )
        )
    return out
