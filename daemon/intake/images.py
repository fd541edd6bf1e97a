"""Inspect a dataset's images: every one fully decoded (in parallel), hashed, its geometry checked.

Read-only: only regular files are opened, never for writing. Pillow is imported here, not on the
CLI's start-up path. Decoding runs on a thread pool: Pillow releases the GIL while it decodes, so
threads scale across cores without the cost of worker processes. A step of validate_dataset
(daemon/intake/validate.py), which re-exports these names.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from daemon.fsutil import NotARegularFile, open_regular
from daemon.intake import contract
from daemon.intake.findings import Finding
from daemon.settings import FIELDS as _SETTINGS

DEFAULT_MAX_IMAGE_BYTES = int(_SETTINGS["max_image_bytes"][1])  # type: ignore[call-overload]

# Above this many pixels an image is refused before decoding (a 1-bit 40000x40000 PNG is tiny
# on disk and 1.6 G pixels in memory).
MAX_PIXELS = 64_000_000
OK_MODES = frozenset({"RGB", "RGBA", "L", "LA", "1", "P"})
# Pillow's names of the formats the snapshot copies as they are (MPO: a phone's multi-picture JPEG).
TRAINED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "MPO"})


@dataclass
class ImageInfo:
    name: str
    width: int  # after EXIF orientation
    height: int
    mode: str
    format: str
    sha256: str
    size_bytes: int
    convert: str | None = None  # why the snapshot converts it (None: copied as is)


def _orientation_swaps(im) -> bool:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return False
    return orientation in (5, 6, 7, 8)


def conversion_reason(mode: str, has_transparency: bool = False) -> str | None:
    """Why the snapshot converts an image of this Pillow mode to RGB (None: copied as is) (pure)."""
    if mode == "CMYK":
        return "CMYK converted to RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return f"{mode} (16-bit/float) converted to 8-bit RGB"
    if mode == "P" and has_transparency:
        return "palette with transparency converted to RGB on white"
    if mode not in OK_MODES:
        return f"{mode} converted to RGB"
    return None


def _conversion_reason(im) -> str | None:
    return conversion_reason(im.mode, "transparency" in im.info)


def hash_file(fh, chunk: int = 1 << 20) -> str:
    """sha256 of an open file from its start, streamed (never the whole file in memory)."""
    h = hashlib.sha256()
    fh.seek(0)
    while block := fh.read(chunk):
        h.update(block)
    fh.seek(0)
    return h.hexdigest()


def image_too_big(rel: str, size: int, limit: int) -> Finding:
    return Finding.error(
        rel,
        f"is {size / 1e6:,.1f} MB; images larger than {limit / 1e6:,.0f} MB are refused before decoding "
        "(setting max_image_bytes)",
        "downscale or re-export it (a training image needs no more than a few MB)",
        code="image.huge",
    )


def size_finding(rel: str, size: int, max_bytes: int) -> Finding | None:
    """An empty or oversize file, judged from its size before a byte is read (pure)."""
    if size == 0:
        return Finding.error(rel, "is an empty file (0 bytes)", "re-export or remove it", code="image.empty")
    if size > max_bytes:
        return image_too_big(rel, size, max_bytes)
    return None


def format_finding(rel: str, fmt: str, width: int, height: int) -> Finding | None:
    """A format the snapshot does not copy, or a pixel count that is a decompression bomb:
    judged from the header alone, before decoding (pure)."""
    if fmt not in TRAINED_FORMATS:
        return Finding.error(
            rel,
            f"is a {fmt} image; only JPEG, PNG and WebP are trained",
            "convert it to PNG or JPEG",
            code="image.format",
        )
    if width * height > MAX_PIXELS:
        return Finding.error(
            rel,
            f"is {width}x{height} ({width * height / 1e6:.0f} megapixels): refused as a decompression bomb",
            f"downscale it below {MAX_PIXELS // 1_000_000} megapixels",
            code="image.bomb",
        )
    return None


def inspect_image(path: Path, rel: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageInfo | Finding:
    """Fully decode one image; return its facts or the one error that disqualifies it.
    Only regular files are opened; the size cap is checked before a byte is read; the file is
    hashed in chunks and decoded from the file, so memory stays bounded by the decoded pixels."""
    try:
        fh = open_regular(path)
    except NotARegularFile as exc:
        if exc.kind == "a folder":
            return Finding.error(
                rel, "is a folder, not an image", "move or rename the folder", code="image.directory"
            )
        return contract.special_file(rel, exc.kind)
    except OSError as exc:
        return _unreadable(rel, exc)
    with fh:
        return _inspect_open_image(fh, rel, max_bytes)


def _unreadable(rel: str, exc: OSError) -> Finding:
    return Finding.error(
        rel, f"cannot be read: {exc.strerror}", "check its permissions", code="image.unreadable"
    )


def _inspect_open_image(fh, rel: str, max_bytes: int) -> ImageInfo | Finding:
    """Size, hash, then decode: each stage refuses before the next, costlier one runs."""
    size = os.fstat(fh.fileno()).st_size
    problem = size_finding(rel, size, max_bytes)
    if problem is not None:
        return problem
    try:
        digest = hash_file(fh)
    except OSError as exc:
        return _unreadable(rel, exc)
    decoded = _decode(fh, rel)
    if isinstance(decoded, Finding):
        return decoded
    fmt, width, height, mode, reason = decoded
    return ImageInfo(rel, width, height, mode, fmt, digest, size, reason)


def _decode(fh, rel: str) -> tuple[str, int, int, str, str | None] | Finding:
    """(format, width, height after EXIF orientation, mode, conversion) of a fully decoded image,
    or the finding that says why it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(fh) as im:
            fmt = im.format or "?"
            width, height = im.size
            problem = format_finding(rel, fmt, width, height)
            if problem is not None:
                return problem
            im.load()
            if _orientation_swaps(im):
                width, height = height, width
            return fmt, width, height, im.mode, _conversion_reason(im)
    except Image.DecompressionBombError as exc:
        return Finding.error(
            rel, f"refused as a decompression bomb ({exc})", "downscale it", code="image.bomb"
        )
    except UnidentifiedImageError:
        return Finding.error(
            rel,
            "is not an image (Pillow cannot identify it)",
            "remove it or export a real PNG/JPEG",
            code="image.notimage",
        )
    except (OSError, SyntaxError, ValueError) as exc:
        return Finding.error(
            rel,
            f"does not decode fully ({exc}): truncated or corrupted",
            "re-export or re-download it",
            code="image.corrupt",
        )


def inspect_all(
    images: list[tuple[str, Path]], max_bytes: int, workers: int | None = None
) -> list[ImageInfo | Finding]:
    """inspect_image over every (name, path), in parallel, results in the input's order.
    One more thread than cores: while two threads decode (GIL released), a third does the
    Python-side bookkeeping of the next image."""
    if not images:
        return []
    max_workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda item: inspect_image(item[1], item[0], max_bytes), images))


def image_findings(results: list[ImageInfo | Finding]) -> tuple[list[ImageInfo], list[Finding]]:
    """The images that decoded, and every finding about them in order: an image's refusal, or its
    geometry, its conversion and whether it duplicates an earlier one (pure)."""
    infos: list[ImageInfo] = []
    findings: list[Finding] = []
    seen_hashes: dict[str, str] = {}
    for result in results:
        if isinstance(result, Finding):
            findings.append(result)
            continue
        findings.extend(contract.check_geometry(result.name, result.width, result.height))
        if result.convert:
            findings.append(
                Finding.warning(
                    result.name,
                    f"image mode {result.convert} in the snapshot",
                    "nothing to do (your file is untouched)",
                    code="image.convert",
                )
            )
        if result.sha256 in seen_hashes:
            findings.append(
                Finding.warning(
                    result.name,
                    f"is an exact duplicate of {seen_hashes[result.sha256]}",
                    "remove one copy",
                    code="image.duplicate",
                )
            )
        seen_hashes.setdefault(result.sha256, result.name)
        infos.append(result)
    return infos, findings
