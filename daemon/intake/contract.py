"""The dataset contract as pure rules: what each file name means, folder names, captions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.intake.findings import Finding

# The image files a snapshot holds, for every engine (the snapshot copies these, or converts an
# odd mode of them to PNG; each engine's trainer reads them from it).
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Image formats people drop in that a snapshot does not hold: named, with how to convert them.
UNSUPPORTED_IMAGE_FORMATS = {
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".hif": "HEIF",
    ".avif": "AVIF",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".jxl": "JPEG XL",
    ".jp2": "JPEG 2000",
    ".j2k": "JPEG 2000",
    ".psd": "Photoshop",
    ".svg": "SVG",
    ".ico": "ICO",
    ".tga": "TGA",
    ".exr": "OpenEXR",
    ".hdr": "HDR",
    ".dng": "DNG (raw)",
    ".cr2": "Canon raw",
    ".cr3": "Canon raw",
    ".nef": "Nikon raw",
    ".arw": "Sony raw",
    ".raf": "Fujifilm raw",
    ".orf": "Olympus raw",
    ".rw2": "Panasonic raw",
}
MARKER_FILES = frozenset({"READY", "QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED"})
OPTIONS_FILE = "lora.toml"
READY = "READY"
# An engine's tokenizer limit (Engine.intake_limits; mflux pads prompts to 512 tokens) in characters:
# English captions run about 3.5 characters a token.
CHARS_PER_TOKEN = 3.5
DEFAULT_CAPTION_TOKENS = 512
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
    """An image format the snapshot does not hold (so no engine trains it): a warning when other
    images train, an error when it would leave the dataset empty."""
    fmt = UNSUPPORTED_IMAGE_FORMATS.get(split_suffix(rel)[1], "this")
    message = f"{fmt} images are not supported (lorad trains JPEG, PNG and WebP)"
    if only_images:
        return Finding.error(rel, message, convert_hint(rel), code="image.unsupported")
    return Finding.warning(
        rel, message + ": this image is left out of training", convert_hint(rel), code="image.unsupported"
    )


def special_file(rel: str, kind: str) -> Finding:
    """A FIFO, socket or device where a file belongs: never opened (a FIFO blocks a reader forever)."""
    return Finding.error(
        rel, f"is {kind}, not a file", "remove it: lorad reads only regular files", code="file.special"
    )


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
    rel: str,
    raw: bytes,
    trigger: str,
    policy: str,
    size: int | None = None,
    max_bytes: int = MAX_CAPTION_BYTES,
    max_tokens: int | None = DEFAULT_CAPTION_TOKENS,
) -> tuple[str | None, list[Finding]]:
    """Decode and normalise one caption; returns (text for the snapshot, findings).
    `size` is the file's real size when only its first bytes were read; `max_tokens` is the
    training engine's prompt limit (None: it has none)."""
    decoded = decode_caption(rel, raw, len(raw) if size is None else size, max_bytes)
    if isinstance(decoded, Finding):
        return None, [decoded]
    text, findings = apply_trigger(rel, decoded, trigger, policy)
    if text is None:
        return None, findings
    too_long = length_finding(rel, text, max_tokens)
    return text, findings + ([too_long] if too_long is not None else [])


def decode_caption(rel: str, raw: bytes, size: int, max_bytes: int) -> str | Finding:
    """A caption's text with whitespace normalised to single spaces, or the error that refuses it:
    too large, binary (NUL), not UTF-8, or empty (pure)."""
    if size > max_bytes:
        return Finding.error(
            rel,
            f"caption is {_size_text(size)} (limit {_size_text(max_bytes)}, setting max_caption_bytes); "
            "a caption needs a few hundred bytes",
            "shorten the caption to a sentence or two",
            code="caption.huge",
        )
    if b"\x00" in raw:
        return Finding.error(
            rel,
            "caption contains NUL bytes (binary data?)",
            "save it as plain UTF-8 text",
            code="caption.nul",
        )
    try:
        text = " ".join(raw.decode("utf-8-sig").split())
    except UnicodeDecodeError as exc:
        return Finding.error(
            rel,
            f"caption is not UTF-8 (bad byte at offset {exc.start})",
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
            code="caption.encoding",
        )
    if not text:
        return Finding.error(
            rel,
            "caption is empty",
            "describe the image in a sentence, with the trigger word",
            code="caption.empty",
        )
    return text


def apply_trigger(rel: str, text: str, trigger: str, policy: str) -> tuple[str | None, list[Finding]]:
    """A caption without the trigger word: refused (caption_policy = "require") or trained as
    "<trigger>, <caption>" with a warning (pure)."""
    if trigger_in(text, trigger):
        return text, []
    if policy == "require":
        return None, [
            Finding.error(
                rel,
                f'caption does not contain the trigger word {trigger!r} (caption_policy = "require")',
                f'add {trigger!r} to the caption, or set caption_policy = "prepend"',
                code="caption.trigger",
            )
        ]
    return f"{trigger}, {text}", [
        Finding.warning(
            rel,
            f'caption lacks the trigger word; training uses "{trigger}, ..."',
            "add the trigger word yourself to control where it goes",
            code="caption.prepended",
        )
    ]


def length_finding(rel: str, text: str, max_tokens: int | None) -> Finding | None:
    """A caption longer than the training engine reads (its prompt limit in tokens, estimated in
    characters); None when it fits or the engine has no limit (pure)."""
    if max_tokens is None or len(text) <= max_tokens * CHARS_PER_TOKEN:
        return None
    return Finding.warning(
        rel,
        f"caption is {len(text)} characters; the training engine reads at most {max_tokens} tokens "
        f"(about {int(max_tokens * CHARS_PER_TOKEN)} characters)",
        "shorten it: text past the limit is ignored",
        code="caption.long",
    )


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
                rel,
                f"image is {width}x{height}; below {SMALL_SIDE} px training quality suffers",
                "use 1024 px if you can",
                code="image.lowres",
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


# -- LoRA names: unambiguous and writable ----------------------------------------------------
#
# A LoRA named N owns N.safetensors, N.png, N.compare.png, N.report/ and the same with .v<K>
# (older versions) in the loras folder. Two names can only produce the same path when one ends in
# a suffix lorad appends itself (`alice.compare` + `.png` = `alice` + `.compare.png`), so those
# endings are reserved; every other name owns its own set of paths. Compared case-insensitively
# and in NFC (macOS volumes treat `Alice.PNG` and `alice.png` as one file).

# reserved ending -> what lorad writes for the shorter name (how the clash reads to the user)
RESERVED_ENDINGS = {
    ".compare": ("{base}.compare.png", "side-by-side render"),
    ".report": ("{base}.report/", "report folder"),
    ".png": ("{base}.png", "test render"),
    ".safetensors": ("{base}.safetensors", "LoRA file"),
}
_VERSION_ENDING = re.compile(r"\.v[0-9]+$")

# Worst cases for the names lorad creates (daemon/fsutil.py temp_beside: .<target>.<pid>.<8 hex>.tmp).
PID_DIGITS = 7  # Linux pid_max is at most 2**22 (7 digits); macOS pids have 5
MAX_VERSION_DIGITS = 4  # <name>.v9999
REPORT_ENTRY_BYTES = 64  # plan.json, loss.html, mflux's last preview image inside <name>.report/
LORA_SUFFIXES = (".safetensors", ".png", ".compare.png", ".report")
LONGEST_MARKER = "FAILED.txt"
NAME_MAX, PATH_MAX = 255, 1024  # macOS's limits; validate asks the file system for its own


def name_key(name: str) -> str:
    """The identity of a LoRA name as a case- and normalisation-insensitive file system sees it
    (macOS's APFS, Windows, ext4 casefold): `Alice` = `alice`, NFC `é` = NFD `e\u0301`, `ß` =
    `ss`. Two names with one key are one LoRA for versioning, publishing and the registry (pure;
    Unicode canonical caseless matching, NFD(casefold(NFD(name))), kept in NFC)."""
    import unicodedata

    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


def _folded(name: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


def check_lora_name(name: str, where: str) -> list[Finding]:
    """The clashes a LoRA name would cause with another LoRA's files (empty list: none)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return [
            Finding.error(
                where,
                f"LoRA name {name!r} is not valid UTF-8 text",
                'rename the folder (or set name = "...") using UTF-8 text',
                code="name.encoding",
            )
        ]
    folded = _folded(name)
    version = _VERSION_ENDING.search(folded)
    if version:
        base, ending = name[: version.start()], name[version.start() :]
        clash = f"{base}{ending}.safetensors"
        return [
            Finding.error(
                where,
                f"LoRA name {name!r} ends in {ending!r}, which lorad reserves for older versions: "
                f"{clash} is where version {ending[2:]} of the LoRA {base!r} is kept",
                f"choose a name that does not end in .v<number>, e.g. {base}-{ending[2:]}",
                code="name.reserved",
            )
        ]
    for ending, (pattern, what) in RESERVED_ENDINGS.items():
        if folded.endswith(ending) and len(folded) > len(ending):
            base = name[: -len(ending)]
            return [
                Finding.error(
                    where,
                    f"LoRA name {name!r} ends in {ending!r}, which lorad reserves for its own files: "
                    f"{pattern.format(base=base)} is the {what} of the LoRA {base!r}",
                    f"choose a name that does not end in {ending}, e.g. {base}{ending.replace('.', '-')}",
                    code="name.reserved",
                )
            ]
    return []


def check_name_spelling(name: str, where: str, loras_entries: list[str]) -> list[Finding]:
    """A warning when the loras folder holds this LoRA under another spelling (same name_key:
    case or Unicode normalisation differ): it is one name, so the job publishes under that
    spelling and the current LoRA is kept as a version (pure)."""
    stems = sorted(
        e[: -len(".safetensors")]
        for e in loras_entries
        if e.endswith(".safetensors") and not e.startswith(".")
    )
    if name in stems:
        return []
    key = name_key(name)
    other = next((s for s in stems if name_key(s) == key), None)
    if other is None:
        return []
    return [
        Finding.warning(
            where,
            f"LoRA name {name!r} is the LoRA {other!r} already published (names are compared without case "
            f"or Unicode normalisation, as macOS's file system compares them): it is published as "
            f"{other}.safetensors and the current {other} is kept as {other}.v<N>",
            "to keep both as separate LoRAs, choose a name that differs in more than case",
            code="name.spelling",
        )
    ]


def created_names(name: str) -> list[str]:
    """Every file/folder name lorad may create for this LoRA in the loras folder, at its longest
    (highest pid, 4-digit version): the outputs, their versions, the outputs' temp names."""
    version = ".v" + "9" * MAX_VERSION_DIGITS
    pid = "9" * PID_DIGITS
    outputs = [f"{name}{suffix}" for suffix in LORA_SUFFIXES]
    versions = [f"{name}{version}{suffix}" for suffix in LORA_SUFFIXES]  # renamed into place, no temp
    return outputs + versions + [f".{out}.{pid}.ffffffff.tmp" for out in outputs]


def longest_created_name(name: str) -> tuple[str, int]:
    """(the longest name lorad creates for this LoRA, its length in UTF-8 bytes)."""
    longest = max(created_names(name), key=lambda n: len(n.encode("utf-8", "surrogateescape")))
    return longest, len(longest.encode("utf-8", "surrogateescape"))


def marker_temp_name() -> str:
    """The longest name lorad writes in a dataset folder (a marker's temp file)."""
    return f".{LONGEST_MARKER}.{'9' * PID_DIGITS}.ffffffff.tmp"


def check_name_lengths(
    name: str,
    where: str,
    *,
    loras_dir: str,
    dataset_dir: str,
    name_max: int = NAME_MAX,
    path_max: int = PATH_MAX,
) -> list[Finding]:
    """Refuse a name whose files could not be created: a component over name_max bytes, or a
    path (NUL included, as PATH_MAX counts it) over path_max bytes."""
    longest, size = longest_created_name(name)
    if size > name_max:
        over = size - name_max
        return [
            Finding.error(
                where,
                f"LoRA name {name!r} is {len(name.encode('utf-8', 'surrogateescape'))} bytes in UTF-8; lorad's longest "
                f"file name for it ({longest}) would be {size} bytes, over the file system's limit of {name_max} bytes",
                f"shorten the name by at least {over} bytes (non-ASCII characters take 2-4 bytes each)",
                code="name.toolong",
            )
        ]

    def path_bytes(path: str) -> int:
        return len(path.encode("utf-8", "surrogateescape")) + 1

    report_temp = f".{name}.report.{'9' * PID_DIGITS}.ffffffff.tmp"
    candidates = [
        (f"{loras_dir}/{longest}", "its longest output path"),
        (f"{loras_dir}/{report_temp}/{'x' * REPORT_ENTRY_BYTES}", "a file in its report folder"),
        (f"{dataset_dir}/{marker_temp_name()}", "a marker in the dataset folder"),
    ]
    for path, what in candidates:
        size = path_bytes(path)
        if size > path_max:
            return [
                Finding.error(
                    where,
                    f"{what} ({path[:60]}...) would be {size} bytes, over the file system's path limit of {path_max} bytes",
                    "shorten the LoRA name, or move the assets folder (or the dataset) to a shorter path",
                    code="name.pathtoolong",
                )
            ]
    return []
