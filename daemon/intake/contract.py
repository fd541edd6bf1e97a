"""The dataset contract as pure rules: what each file name means, folder names, captions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.intake.findings import Finding

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MARKER_FILES = frozenset({"READY", "QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED"})
OPTIONS_FILE = "lora.toml"
READY = "READY"
# mflux pads prompts to 512 tokens; roughly 4 characters a token for English captions.
LONG_CAPTION_CHARS = 1800
MAX_CAPTION_BYTES = 64 * 1024
MIN_SIDE, SMALL_SIDE, MAX_ASPECT = 256, 512, 2.5
FEW_IMAGES = 10


def split_suffix(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:].lower()


def classify(name: str) -> str:
    """image | caption | preview | ignored — from the name alone (kind of entry is checked later)."""
    if name.startswith(".") or name.startswith("._") or name == "Icon\r":
        return "ignored"  # hidden, AppleDouble, .DS_Store, iCloud placeholders (.x.icloud)
    if name.endswith(".icloud") or name in MARKER_FILES or name == OPTIONS_FILE:
        return "ignored"
    stem, suffix = split_suffix(name)
    if suffix in IMAGE_EXTS:
        return "image"
    if suffix == ".txt":
        return "preview" if stem.startswith("preview") else "caption"
    return "ignored"


def has_control_chars(name: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in name)


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


def check_caption(
    rel: str, raw: bytes, trigger: str, policy: str, size: int | None = None
) -> tuple[str | None, list[Finding]]:
    """Decode and normalise one caption; returns (text for the snapshot, findings).
    `size` is the file's real size when only its first bytes were read."""
    size = len(raw) if size is None else size
    if size > MAX_CAPTION_BYTES:
        return None, [
            Finding.error(
                rel,
                f"caption is {size / 1024:,.0f} KB; mflux reads at most 512 tokens (a few KB)",
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
