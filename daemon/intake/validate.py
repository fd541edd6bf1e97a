"""Validate a dataset folder: every image fully decoded (in parallel), every caption read.

Read-only: nothing in the user's folder is opened for writing. Pillow is imported here, not on
the CLI's start-up path. Decoding runs on a thread pool: Pillow releases the GIL while it
decodes, so threads scale across cores without the cost of worker processes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from daemon.fsutil import NotARegularFile, file_kind, open_regular, read_capped
from daemon.intake import contract, metadata
from daemon.intake.findings import Finding
from daemon.intake.options import merge, parse_options
from daemon.settings import FIELDS as _SETTINGS

DEFAULT_MAX_IMAGE_BYTES = int(_SETTINGS["max_image_bytes"][1])  # type: ignore[call-overload]
DEFAULT_MAX_CAPTION_BYTES = int(_SETTINGS["max_caption_bytes"][1])  # type: ignore[call-overload]

# Above this many pixels an image is refused before decoding (a 1-bit 40000x40000 PNG is tiny
# on disk and 1.6 G pixels in memory).
MAX_PIXELS = 64_000_000
OK_MODES = frozenset({"RGB", "RGBA", "L", "LA", "1", "P"})
# Images whose stems start with this are preview images to mflux (edit training only).
PREVIEW_PREFIX = "preview"


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


@dataclass
class Report:
    folder: Path
    trigger: str | None = None
    name: str | None = None
    options: dict = field(default_factory=dict)
    images: list[ImageInfo] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)  # image name -> normalised caption
    previews: dict[str, str] = field(default_factory=dict)  # preview*.txt name -> prompt
    # image name -> where its caption came from: file | metadata.jsonl | trigger (model: later, by the captioner)
    caption_sources: dict[str, str] = field(default_factory=dict)
    uncaptioned: list[str] = field(
        default_factory=list
    )  # images left for the captioner (missing_captions = "vlm")
    findings: list[Finding] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "valid": self.valid,
            "trigger": self.trigger,
            "name": self.name,
            "options": self.options,
            "images": len(self.images),
            "uncaptioned": list(self.uncaptioned),
            "errors": [f.to_dict() for f in self.errors],
            "warnings": [f.to_dict() for f in self.warnings],
        }


def _orientation_swaps(im) -> bool:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return False
    return orientation in (5, 6, 7, 8)


def _conversion_reason(im) -> str | None:
    mode = im.mode
    if mode == "CMYK":
        return "CMYK converted to RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return f"{mode} (16-bit/float) converted to 8-bit RGB"
    if mode == "P" and "transparency" in im.info:
        return "palette with transparency converted to RGB on white"
    if mode not in OK_MODES:
        return f"{mode} converted to RGB"
    return None


def limits(settings) -> dict:
    """validate_dataset's caps: sizes from the settings, the caption length from the engine that
    will train (its `intake_limits`; a bad engine setting is reported elsewhere, the default used)."""
    from daemon.engine_host import make_engine
    from daemon.settings import SettingsError

    try:
        tokens = make_engine(settings).intake_limits().max_caption_tokens
    except SettingsError:
        tokens = contract.DEFAULT_CAPTION_TOKENS
    return {
        "max_image_bytes": settings.max_image_bytes,
        "max_caption_bytes": settings.max_caption_bytes,
        "max_caption_tokens": tokens,
        "missing_captions": settings.missing_captions,
        "caption_model": settings.caption_model,
    }


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
        return Finding.error(
            rel, f"cannot be read: {exc.strerror}", "check its permissions", code="image.unreadable"
        )
    with fh:
        return _inspect_open_image(fh, rel, max_bytes)


def _inspect_open_image(fh, rel: str, max_bytes: int) -> ImageInfo | Finding:
    from PIL import Image, UnidentifiedImageError

    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        return Finding.error(rel, "is an empty file (0 bytes)", "re-export or remove it", code="image.empty")
    if size > max_bytes:
        return image_too_big(rel, size, max_bytes)
    try:
        digest = hash_file(fh)
    except OSError as exc:
        return Finding.error(
            rel, f"cannot be read: {exc.strerror}", "check its permissions", code="image.unreadable"
        )
    try:
        with Image.open(fh) as im:
            fmt = im.format or "?"
            if fmt not in ("JPEG", "PNG", "WEBP", "MPO"):
                return Finding.error(
                    rel,
                    f"is a {fmt} image; only JPEG, PNG and WebP are trained",
                    "convert it to PNG or JPEG",
                    code="image.format",
                )
            width, height = im.size
            if width * height > MAX_PIXELS:
                return Finding.error(
                    rel,
                    f"is {width}x{height} ({width * height / 1e6:.0f} megapixels): refused as a decompression bomb",
                    f"downscale it below {MAX_PIXELS // 1_000_000} megapixels",
                    code="image.bomb",
                )
            im.load()
            if _orientation_swaps(im):
                width, height = height, width
            reason = _conversion_reason(im)
            mode = im.mode
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
    return ImageInfo(rel, width, height, mode, fmt, digest, size, reason)


def _fs_limits(folder: Path) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the file system holding `folder` (its nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    limits = []
    for key, fallback in (("PC_NAME_MAX", contract.NAME_MAX), ("PC_PATH_MAX", contract.PATH_MAX)):
        try:
            limits.append(os.pathconf(probe, key) or fallback)
        except (OSError, ValueError):
            limits.append(fallback)
    return min(limits[0], contract.NAME_MAX), limits[1]


def name_findings(folder: Path, name: str, where: str) -> list[Finding]:
    """A LoRA name that would clash with another LoRA's files, or whose files could not be
    written (too many bytes). The loras folder is <assets>/loras beside <assets>/training_data."""
    folder = folder.absolute()
    loras = folder.parent.parent / "loras"
    name_max, path_max = _fs_limits(loras)
    try:
        entries = os.listdir(loras)
    except OSError:
        entries = []
    return (
        contract.check_lora_name(name, where)
        + contract.check_name_lengths(
            name, where, loras_dir=str(loras), dataset_dir=str(folder), name_max=name_max, path_max=path_max
        )
        + contract.check_name_spelling(name, where, entries)
    )


def _read_small(path: Path, limit: int) -> bytes:
    with open_regular(path) as fh:
        return fh.read(limit + 1)


def read_options_file(
    path: Path, rel: str, limit: int = contract.MAX_OPTIONS_BYTES
) -> tuple[bytes | None, Finding | None]:
    """READY or lora.toml: (its bytes, None), (None, None) when absent, or (None, the finding) for
    a special file, an oversize file (refused, not cut) or one that cannot be read."""
    try:
        raw, size = read_capped(path, limit)
    except FileNotFoundError:
        return None, None
    except NotARegularFile as exc:
        if exc.kind == "a folder":
            return None, Finding.error(rel, "is a folder, not a file", "remove it", code="option.toml")
        return None, contract.special_file(rel, exc.kind)
    except OSError as exc:
        return None, Finding.error(
            rel, f"cannot be read: {exc.strerror}", "check its permissions", code="option.unreadable"
        )
    if size > limit or len(raw) > limit:
        return None, contract.oversize_options(rel, max(size, len(raw)), limit)
    return raw, None


def _special_kind(entry: os.DirEntry) -> str | None:
    """The kind of a FIFO, socket or device entry (or of a symlink's target), else None.
    Folders and broken links are left to the checks that name them."""
    try:
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(entry.path)
            prefix = "a symlink to "
        else:
            prefix = ""
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    return prefix + file_kind(st.st_mode)


def validate_dataset(
    folder: Path,
    *,
    ready_text: bytes | None = None,
    read_ready: bool = True,
    workers: int | None = None,
    default_policy: str = "prepend",
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    max_caption_tokens: int | None = contract.DEFAULT_CAPTION_TOKENS,
    missing_captions: str = "refuse",
    caption_model: str = str(_SETTINGS["caption_model"][1]),
) -> Report:
    """Check a dataset folder against the contract. Never writes into it."""
    folder = Path(folder)
    report = Report(folder=folder)
    add = report.findings.append
    try:
        st = folder.lstat()
    except FileNotFoundError:
        add(
            Finding.error(
                ".", f"dataset folder {folder} does not exist", "check the path", code="folder.missing"
            )
        )
        return report
    if stat.S_ISLNK(st.st_mode):
        add(
            Finding.error(
                ".",
                f"dataset folder {folder.name} is a symlink ({os.readlink(folder)}); lorad does not follow it",
                "move the real folder into training_data",
                code="folder.symlink",
            )
        )
        return report
    if not stat.S_ISDIR(st.st_mode):
        add(Finding.error(".", f"{folder} is not a folder", "pass a dataset folder", code="folder.notdir"))
        return report

    parsed, problem = contract.parse_folder_name(folder.name)
    if problem:
        add(problem)
    if contract.has_control_chars(folder.name):
        add(
            Finding.error(
                ".", "folder name contains control characters", "rename the folder", code="folder.name"
            )
        )
    if not contract.is_utf8(folder.name):
        add(
            Finding.error(
                ".",
                f"folder name '{contract.printable_name(folder.name)}' is not valid UTF-8 (undecodable bytes shown as \\xNN)",
                "rename the folder with plain UTF-8 characters",
                code="folder.encoding",
            )
        )

    # Options: lora.toml, then READY (READY wins).
    toml_opts: dict = {}
    options_path = folder / contract.OPTIONS_FILE
    toml_text, problem = read_options_file(options_path, contract.OPTIONS_FILE)
    if problem:
        add(problem)
    elif toml_text is not None:
        toml_opts, problems = parse_options(toml_text, contract.OPTIONS_FILE, allow_force=False)
        report.findings.extend(problems)
    if ready_text is None and read_ready:
        ready_path = folder / contract.READY
        if not ready_path.is_symlink():
            ready_text, problem = read_options_file(ready_path, contract.READY)
            if problem:
                add(problem)
    ready_opts: dict = {}
    if ready_text is not None:
        ready_opts, problems = parse_options(ready_text, contract.READY, allow_force=True)
        report.findings.extend(problems)
    report.options = merge(toml_opts, ready_opts)
    trigger = report.options.get("trigger") or (parsed.trigger if parsed else None)
    report.trigger = trigger
    report.name = report.options.get("name") or (parsed.name if parsed else None)
    if report.name:
        where = "READY" if "name" in ready_opts else contract.OPTIONS_FILE if "name" in toml_opts else "."
        report.findings.extend(name_findings(folder, report.name, where))
    policy = report.options.get("caption_policy", default_policy)
    missing = report.options.get("missing_captions", missing_captions)

    # Entries.
    images: list[tuple[str, Path]] = []
    captions: dict[str, Path] = {}
    previews: list[tuple[str, Path]] = []
    real_folder = folder.resolve()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except PermissionError:
        add(
            Finding.error(
                ".",
                "folder cannot be listed (permission denied)",
                "fix its permissions",
                code="folder.unreadable",
            )
        )
        return report
    unsupported: list[str] = []
    for entry in entries:
        name = entry.name
        kind = contract.classify(name)
        if kind == "ignored":
            continue
        if not contract.is_utf8(name):
            add(
                Finding.error(
                    contract.printable_name(name),
                    "file name is not valid UTF-8 (undecodable bytes shown as \\xNN)",
                    "rename the file with plain UTF-8 characters (e.g. convmv -f latin1 -t utf-8 --notest <file>)",
                    code="name.encoding",
                )
            )
            continue
        if contract.has_control_chars(name):
            add(
                Finding.error(
                    repr(name),
                    "file name contains control characters",
                    "rename the file",
                    code="name.control",
                )
            )
            continue
        path = Path(entry.path)
        special = _special_kind(entry)
        if special:
            add(contract.special_file(name, special))
            continue
        if kind == "unsupported":
            unsupported.append(name)
            continue
        if entry.is_symlink():
            target = os.path.realpath(path)
            if not Path(target).is_relative_to(real_folder):
                add(
                    Finding.error(
                        name,
                        f"is a symlink to {target}, outside the dataset folder (not followed)",
                        "copy the file into the folder instead of linking it",
                        code="name.symlink",
                    )
                )
                continue
            if not os.path.exists(target):
                add(Finding.error(name, "is a broken symlink", "remove it", code="name.symlink"))
                continue
        if kind == "image":
            stem, _ = contract.split_suffix(name)
            if stem.lower().startswith(PREVIEW_PREFIX):
                add(
                    Finding.error(
                        name,
                        "images named preview* are refused by mflux outside edit training",
                        "rename the image (and its caption)",
                        code="name.preview",
                    )
                )
                continue
            images.append((name, path))
        elif kind == "caption":
            if entry.is_dir():
                add(
                    Finding.error(
                        name,
                        "is a folder, not a caption file",
                        "move or rename the folder",
                        code="caption.directory",
                    )
                )
                continue
            captions[contract.split_suffix(name)[0]] = path
        else:
            if entry.is_dir():
                add(
                    Finding.error(
                        name, "is a folder, not a prompt file", "move or rename it", code="caption.directory"
                    )
                )
                continue
            previews.append((name, path))

    # Same stem twice (a.png + a.jpg): mflux pairs each image with <stem>.txt, so one caption serves two.
    stems: dict[str, str] = {}
    unique_images = []
    for name, path in images:
        stem = contract.split_suffix(name)[0]
        if stem in stems:
            add(
                Finding.error(
                    name,
                    f"has the same stem as {stems[stem]}; each image needs its own <stem>.txt",
                    "rename one of them",
                    code="name.samestem",
                )
            )
            continue
        stems[stem] = name
        unique_images.append((name, path))

    # Decode every image, in parallel.
    # One more thread than cores: while two threads decode (GIL released), a third does the
    # Python-side bookkeeping of the next image.
    max_workers = workers or min(8, (os.cpu_count() or 1) + 1)
    if unique_images:
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            results = list(
                pool.map(lambda item: inspect_image(item[1], item[0], max_image_bytes), unique_images)
            )
    else:
        results = []
    seen_hashes: dict[str, str] = {}
    for result in results:
        if isinstance(result, Finding):
            add(result)
            continue
        report.findings.extend(contract.check_geometry(result.name, result.width, result.height))
        if result.convert:
            add(
                Finding.warning(
                    result.name,
                    f"image mode {result.convert} in the snapshot",
                    "nothing to do (your file is untouched)",
                    code="image.convert",
                )
            )
        if result.sha256 in seen_hashes:
            add(
                Finding.warning(
                    result.name,
                    f"is an exact duplicate of {seen_hashes[result.sha256]}",
                    "remove one copy",
                    code="image.duplicate",
                )
            )
        seen_hashes.setdefault(result.sha256, result.name)
        report.images.append(result)

    # Captions: <stem>.txt, else a metadata.jsonl line, else missing_captions decides.
    if trigger:
        by_image = _metadata_captions(folder, unique_images, unsupported, captions, add, max_caption_bytes)
        for name, _path in unique_images:
            stem = contract.split_suffix(name)[0]
            if stem in captions:
                read = _read_sidecar(captions[stem], add, max_caption_bytes)
                if read is None:
                    continue
                rel, raw, size, source = captions[stem].name, read[0], read[1], "file"
            elif name in by_image:
                line = by_image[name]
                raw = line.text.encode("utf-8")
                rel, size, source = line.where, len(raw), metadata.METADATA_FILE
            else:
                _no_caption(report, name, stem, trigger, missing)
                continue
            text, problems = contract.check_caption(
                rel,
                raw,
                trigger,
                policy,
                size=size,
                max_bytes=max_caption_bytes,
                max_tokens=max_caption_tokens,
            )
            report.findings.extend(problems)
            if text is not None:
                report.captions[name] = text
                report.caption_sources[name] = source
    if report.uncaptioned:
        _check_captioner(report, report.options.get("caption_model", caption_model))
    image_stems = {contract.split_suffix(n)[0] for n, _ in images}
    unsupported_by_stem = {contract.split_suffix(n)[0]: n for n in unsupported}
    for stem, path in captions.items():
        if stem in image_stems:
            continue
        if stem in unsupported_by_stem:
            add(
                Finding.warning(
                    path.name,
                    f"is the caption of {unsupported_by_stem[stem]}, an image format lorad does not train",
                    f"convert {unsupported_by_stem[stem]} (see its message); this caption is used once the image is a JPEG/PNG/WebP",
                    code="caption.unsupported_image",
                )
            )
            continue
        add(
            Finding.warning(
                path.name, "caption has no image", "remove it or add the image", code="caption.orphan"
            )
        )
    for name in unsupported:
        add(contract.unsupported_image(name, only_images=not images))
    for name, path in previews:
        try:
            raw = _read_small(path, max_caption_bytes)
            text = raw.decode("utf-8-sig").strip()
        except NotARegularFile as exc:
            add(contract.special_file(name, exc.kind))
            continue
        except (OSError, UnicodeDecodeError):
            add(
                Finding.error(
                    name,
                    "preview prompt is not readable UTF-8 text",
                    "re-save it as UTF-8",
                    code="preview.encoding",
                )
            )
            continue
        if text:
            report.previews[name] = " ".join(text.split())

    if not images:
        found = f"; {len(unsupported)} in formats lorad does not train (see above)" if unsupported else ""
        add(
            Finding.error(
                ".",
                f"no images found (.jpg .jpeg .png .webp){found}",
                "add images with same-name .txt captions"
                + (", or convert the others to JPEG/PNG" if unsupported else ""),
                code="folder.noimages",
            )
        )
    else:
        advice = image_count_advice(len(images), str(report.options.get("kind", "character")))
        if advice is not None:
            add(Finding.warning(".", advice[0], advice[1], code="folder.few"))
    return report


def _read_sidecar(path: Path, add, max_bytes: int) -> tuple[bytes, int] | None:
    """A caption file's first bytes and real size, or None (the finding added)."""
    try:
        return read_capped(path, max_bytes)
    except NotARegularFile as exc:
        add(contract.special_file(path.name, exc.kind))
    except OSError as exc:
        add(
            Finding.error(
                path.name,
                f"cannot be read: {exc.strerror}",
                "check its permissions",
                code="caption.unreadable",
            )
        )
    return None


def _metadata_captions(
    folder: Path,
    images: list[tuple[str, Path]],
    unsupported: list[str],
    sidecars: dict,
    add,
    max_caption_bytes: int,
) -> dict[str, metadata.MetadataLine]:
    """metadata.jsonl's lines by image name (none when the file is absent). Bad lines, lines
    naming no image, and lines shadowed by a .txt sidecar are findings naming the line."""
    raw, problem = read_options_file(
        folder / metadata.METADATA_FILE, metadata.METADATA_FILE, metadata.MAX_METADATA_BYTES
    )
    if problem is not None:
        add(problem)
    if raw is None:
        return {}
    lines, findings = metadata.parse_metadata(raw)
    for finding in findings:
        add(finding)
    names = {name for name, _ in images}
    by_image: dict[str, metadata.MetadataLine] = {}
    for entry in lines:
        if entry.file_name not in names:
            add(metadata.unmatched_line(entry, entry.file_name in unsupported))
            continue
        stem = contract.split_suffix(entry.file_name)[0]
        if stem in sidecars:
            add(metadata.sidecar_wins(entry, sidecars[stem].name))
            continue
        by_image[entry.file_name] = entry
    return by_image


def _no_caption(report: Report, name: str, stem: str, trigger: str, missing: str) -> None:
    """An image with neither a sidecar nor a metadata.jsonl line: refused, captioned by the
    trigger word alone, or left for the captioner, as missing_captions says."""
    if missing == "trigger":
        report.captions[name] = trigger
        report.caption_sources[name] = "trigger"
        report.findings.append(
            Finding.warning(
                name,
                f'has no caption; trained with the trigger word alone ({trigger!r}, missing_captions = "trigger")',
                f"write {stem}.txt describing the image for a LoRA that follows prompts better",
                code="caption.trigger_only",
            )
        )
        return
    if missing == "vlm":
        report.uncaptioned.append(name)
        return
    report.findings.append(
        Finding.error(
            name,
            f"has no caption ({stem}.txt is missing and no {metadata.METADATA_FILE} line names it; "
            'missing_captions = "refuse")',
            f"write {stem}.txt describing the image, or set missing_captions in lora.toml: "
            '"refuse" (default), "trigger" (the trigger word alone) or "vlm" (a local model captions it)',
            code="caption.missing",
        )
    )


def _check_captioner(report: Report, model: str) -> None:
    """missing_captions = "vlm" with a captioner that is not on this machine: refused here, with
    how to fetch it (lorad never downloads it unasked), rather than failing the job later."""
    from daemon.caption_model import model_problem

    problem = model_problem(model)
    if problem is not None:
        report.findings.append(
            Finding.error(
                contract.OPTIONS_FILE if "caption_model" in report.options else ".",
                f'{len(report.uncaptioned)} images need captions (missing_captions = "vlm"), but {problem}',
                'fetch the model, then create READY again; or write captions, or set missing_captions = "trigger"',
                code="caption.model",
            )
        )


# kind -> (fewest images before the advice, what to say). A style is learned from many varied
# pictures in that look; a character from 10-30 of the same subject.
FEW_FOR_KIND = {
    "character": (contract.FEW_IMAGES, "10-30 give a more reliable character LoRA", "add more varied images of the subject"),
    "style": (20, "a style LoRA learns the look more reliably from 20-50 varied images in that style",
              "add more images in the style, with different subjects"),
}  # fmt: skip


def image_count_advice(count: int, kind: str) -> tuple[str, str] | None:
    """(message, what to do) when a dataset of this kind has few images, else None (pure)."""
    fewest, message, todo = FEW_FOR_KIND.get(kind, FEW_FOR_KIND["character"])
    if count >= fewest:
        return None
    return f"only {count} images; {message}", todo
