"""Validate a dataset folder: every image fully decoded (in parallel), every caption read.

Read-only: nothing in the user's folder is opened for writing. validate_dataset runs a pipeline of
steps, each returning its findings, in the order the user reads them (markers, FAILED.txt,
`lorad check`): the folder itself → its name → the options files → its entries (names, special
files, links) → the images (daemon/intake/images.py) → the captions
(daemon/intake/caption_sources.py) → the image count.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from daemon.fsutil import NotARegularFile, file_kind, read_capped
from daemon.intake import contract, metadata
from daemon.intake.caption_sources import (
    CaptionRules,
    caption_images,
    captioner_finding,
    orphan_findings,
    pair_metadata,
    read_previews,
)
from daemon.intake.findings import Finding
from daemon.intake.images import (  # noqa: F401  (re-exported: validate's names before the split)
    DEFAULT_MAX_IMAGE_BYTES,
    MAX_PIXELS,
    OK_MODES,
    ImageInfo,
    hash_file,
    image_findings,
    image_too_big,
    inspect_all,
    inspect_image,
)
from daemon.intake.options import merge, parse_options
from daemon.settings import FIELDS as _SETTINGS
from engines.base import IntakeLimits

DEFAULT_MAX_CAPTION_BYTES = int(_SETTINGS["max_caption_bytes"][1])  # type: ignore[call-overload]

# Image stem prefixes refused unless the engine says otherwise (its intake_limits): preview* images,
# whose captions would be read as sample prompts and which mflux reserves for edit training.
RESERVED_IMAGE_PREFIXES = IntakeLimits().reserved_image_prefixes
PREVIEW_PREFIX = "preview"


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


def limits(settings) -> dict:
    """validate_dataset's caps: sizes from the settings; the caption length and the reserved image
    names from the engine that will train (its `intake_limits`; a bad engine setting is reported
    elsewhere, the defaults used)."""
    from daemon.engine_host import make_engine
    from daemon.settings import SettingsError

    try:
        engine = make_engine(settings).intake_limits()
    except SettingsError:
        engine = IntakeLimits(max_caption_tokens=contract.DEFAULT_CAPTION_TOKENS)
    return {
        "max_image_bytes": settings.max_image_bytes,
        "max_caption_bytes": settings.max_caption_bytes,
        "max_caption_tokens": engine.max_caption_tokens,
        "missing_captions": settings.missing_captions,
        "caption_model": settings.caption_model,
        "reserved_image_prefixes": engine.reserved_image_prefixes,
    }


# -- the folder and its name -----------------------------------------------------------------


def folder_findings(folder: Path) -> list[Finding]:
    """Why the path cannot be validated at all (missing, a symlink lorad does not follow, not a
    folder); empty when it is a real folder. Any finding here ends validation."""
    try:
        st = folder.lstat()
    except FileNotFoundError:
        return [
            Finding.error(
                ".", f"dataset folder {folder} does not exist", "check the path", code="folder.missing"
            )
        ]
    if stat.S_ISLNK(st.st_mode):
        return [
            Finding.error(
                ".",
                f"dataset folder {folder.name} is a symlink ({os.readlink(folder)}); lorad does not follow it",
                "move the real folder into training_data",
                code="folder.symlink",
            )
        ]
    if not stat.S_ISDIR(st.st_mode):
        return [
            Finding.error(".", f"{folder} is not a folder", "pass a dataset folder", code="folder.notdir")
        ]
    return []


def folder_name_findings(name: str) -> tuple[contract.FolderName | None, list[Finding]]:
    """The trigger and LoRA name a folder's name gives (`<trigger>_<name>`), and what is wrong
    with the name: no '_', control characters, bytes that are not UTF-8 (pure)."""
    parsed, problem = contract.parse_folder_name(name)
    findings = [problem] if problem else []
    if contract.has_control_chars(name):
        findings.append(
            Finding.error(
                ".", "folder name contains control characters", "rename the folder", code="folder.name"
            )
        )
    if not contract.is_utf8(name):
        findings.append(
            Finding.error(
                ".",
                f"folder name '{contract.printable_name(name)}' is not valid UTF-8 (undecodable bytes shown as \\xNN)",
                "rename the folder with plain UTF-8 characters",
                code="folder.encoding",
            )
        )
    return parsed, findings


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


# -- the options files: lora.toml, then READY (READY wins) -----------------------------------


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


@dataclass
class DatasetOptions:
    """The options step's result: each file's options and what was wrong with them."""

    toml: dict = field(default_factory=dict)
    ready: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def merged(self) -> dict:
        return merge(self.toml, self.ready)


def read_dataset_options(folder: Path, ready_text: bytes | None, read_ready: bool) -> DatasetOptions:
    """lora.toml's options, then READY's (the given text, or the file unless read_ready is False;
    a symlinked READY is never read). `force` is accepted from READY only: it is one drop's wish."""
    out = DatasetOptions()
    toml_text, problem = read_options_file(folder / contract.OPTIONS_FILE, contract.OPTIONS_FILE)
    if problem:
        out.findings.append(problem)
    elif toml_text is not None:
        out.toml, problems = parse_options(toml_text, contract.OPTIONS_FILE, allow_force=False)
        out.findings.extend(problems)
    if ready_text is None and read_ready:
        ready_path = folder / contract.READY
        if not ready_path.is_symlink():
            ready_text, problem = read_options_file(ready_path, contract.READY)
            if problem:
                out.findings.append(problem)
    if ready_text is not None:
        out.ready, problems = parse_options(ready_text, contract.READY, allow_force=True)
        out.findings.extend(problems)
    return out


def identity(
    options: DatasetOptions, parsed: contract.FolderName | None
) -> tuple[str | None, str | None, str]:
    """(trigger, LoRA name, the file that set the name): an option wins over the folder's name
    (pure)."""
    merged = options.merged
    trigger = merged.get("trigger") or (parsed.trigger if parsed else None)
    name = merged.get("name") or (parsed.name if parsed else None)
    where = "READY" if "name" in options.ready else contract.OPTIONS_FILE if "name" in options.toml else "."
    return trigger, name, where


# -- the folder's entries ----------------------------------------------------------------------


@dataclass
class Entries:
    """The folder's entries sorted by what their names say they are (nothing decoded yet)."""

    images: list[tuple[str, Path]] = field(default_factory=list)
    captions: dict[str, Path] = field(default_factory=dict)  # stem -> <stem>.txt
    previews: list[tuple[str, Path]] = field(default_factory=list)  # preview*.txt prompts
    unsupported: list[str] = field(default_factory=list)  # images in formats lorad does not train


def list_entries(folder: Path) -> tuple[list[os.DirEntry] | None, list[Finding]]:
    """The folder's entries sorted by name, or None and why it cannot be listed."""
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name), []
    except PermissionError:
        return None, [
            Finding.error(
                ".",
                "folder cannot be listed (permission denied)",
                "fix its permissions",
                code="folder.unreadable",
            )
        ]


def name_finding(name: str) -> Finding | None:
    """A file name lorad cannot store or show: bytes that are not UTF-8, control characters (pure)."""
    if not contract.is_utf8(name):
        return Finding.error(
            contract.printable_name(name),
            "file name is not valid UTF-8 (undecodable bytes shown as \\xNN)",
            "rename the file with plain UTF-8 characters (e.g. convmv -f latin1 -t utf-8 --notest <file>)",
            code="name.encoding",
        )
    if contract.has_control_chars(name):
        return Finding.error(
            repr(name), "file name contains control characters", "rename the file", code="name.control"
        )
    return None


def reserved_image_finding(name: str, prefixes: tuple[str, ...] = RESERVED_IMAGE_PREFIXES) -> Finding | None:
    """An image whose stem starts with a prefix the training engine reserves (its intake_limits;
    mflux: preview*, for edit training) (pure)."""
    stem = contract.split_suffix(name)[0].lower()
    prefix = next((p for p in prefixes if stem.startswith(p.lower())), None)
    if prefix is None:
        return None
    why = (
        "are refused by mflux outside edit training"
        if prefix == PREVIEW_PREFIX
        else "are reserved by the training engine"
    )
    return Finding.error(
        name, f"images named {prefix}* {why}", "rename the image (and its caption)", code="name.preview"
    )


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


def link_finding(name: str, path: Path, real_folder: Path) -> Finding | None:
    """A symlink lorad does not follow: to outside the dataset folder, or to nothing."""
    target = os.path.realpath(path)
    if not Path(target).is_relative_to(real_folder):
        return Finding.error(
            name,
            f"is a symlink to {target}, outside the dataset folder (not followed)",
            "copy the file into the folder instead of linking it",
            code="name.symlink",
        )
    if not os.path.exists(target):
        return Finding.error(name, "is a broken symlink", "remove it", code="name.symlink")
    return None


def _sort_entry(
    entry: os.DirEntry, real_folder: Path, reserved: tuple[str, ...], out: Entries
) -> Finding | None:
    """File one entry into `out` by its name, or return why it is refused: its name, a special
    file, a link that escapes, a reserved image name, a folder where a text file belongs."""
    name = entry.name
    kind = contract.classify(name)
    if kind == "ignored":
        return None
    problem = name_finding(name)
    if problem is not None:
        return problem
    special = _special_kind(entry)
    if special:
        return contract.special_file(name, special)
    if kind == "unsupported":
        out.unsupported.append(name)
        return None
    path = Path(entry.path)
    if entry.is_symlink():
        problem = link_finding(name, path, real_folder)
        if problem is not None:
            return problem
    if kind == "image":
        problem = reserved_image_finding(name, reserved)
        if problem is None:
            out.images.append((name, path))
        return problem
    if entry.is_dir():
        if kind == "caption":
            return Finding.error(
                name, "is a folder, not a caption file", "move or rename the folder", code="caption.directory"
            )
        return Finding.error(
            name, "is a folder, not a prompt file", "move or rename it", code="caption.directory"
        )
    if kind == "caption":
        out.captions[contract.split_suffix(name)[0]] = path
    else:
        out.previews.append((name, path))
    return None


def sort_entries(
    folder: Path, entries: list[os.DirEntry], reserved: tuple[str, ...] = RESERVED_IMAGE_PREFIXES
) -> tuple[Entries, list[Finding]]:
    """Every entry filed as image, caption, preview prompt or unsupported image, with the
    findings about the ones refused, in name order."""
    out = Entries()
    real_folder = folder.resolve()
    findings = [f for entry in entries if (f := _sort_entry(entry, real_folder, reserved, out)) is not None]
    return out, findings


def unique_stems(images: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path]], list[Finding]]:
    """The images with a stem of their own. Same stem twice (a.png + a.jpg): an image is paired
    with <stem>.txt, so one caption would serve two; the later one is refused (pure)."""
    stems: dict[str, str] = {}
    unique: list[tuple[str, Path]] = []
    findings: list[Finding] = []
    for name, path in images:
        stem = contract.split_suffix(name)[0]
        if stem in stems:
            findings.append(
                Finding.error(
                    name,
                    f"has the same stem as {stems[stem]}; each image needs its own <stem>.txt",
                    "rename one of them",
                    code="name.samestem",
                )
            )
            continue
        stems[stem] = name
        unique.append((name, path))
    return unique, findings


# -- captions and counts -----------------------------------------------------------------------


def metadata_lines(folder: Path) -> tuple[list[metadata.MetadataLine], list[Finding]]:
    """metadata.jsonl's well-formed lines (none when the file is absent) and its bad ones."""
    raw, problem = read_options_file(
        folder / metadata.METADATA_FILE, metadata.METADATA_FILE, metadata.MAX_METADATA_BYTES
    )
    if raw is None:
        return [], [problem] if problem is not None else []
    return metadata.parse_metadata(raw)


def captioner_check(uncaptioned: list[str], options: dict, caption_model: str) -> list[Finding]:
    """Images left for the captioner need caption_model on this machine now (looked up offline)."""
    if not uncaptioned:
        return []
    from daemon.caption_model import model_problem

    where = contract.OPTIONS_FILE if "caption_model" in options else "."
    problem = model_problem(options.get("caption_model", caption_model))
    finding = captioner_finding(len(uncaptioned), problem, where)
    return [finding] if finding is not None else []


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


def count_findings(images: int, unsupported: int, kind: str) -> list[Finding]:
    """No trainable image at all (an error, naming the unsupported ones), or too few for the
    LoRA's kind (advice) (pure)."""
    if not images:
        found = f"; {unsupported} in formats lorad does not train (see above)" if unsupported else ""
        return [
            Finding.error(
                ".",
                f"no images found (.jpg .jpeg .png .webp){found}",
                "add images with same-name .txt captions"
                + (", or convert the others to JPEG/PNG" if unsupported else ""),
                code="folder.noimages",
            )
        ]
    advice = image_count_advice(images, kind)
    return [] if advice is None else [Finding.warning(".", advice[0], advice[1], code="folder.few")]


# -- the pipeline ------------------------------------------------------------------------------


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
    reserved_image_prefixes: tuple[str, ...] = RESERVED_IMAGE_PREFIXES,
) -> Report:
    """Check a dataset folder against the contract. Never writes into it. The steps run in the
    order their findings are shown; the folder's own problems, and an unlistable folder, end it."""
    folder = Path(folder)
    report = Report(folder=folder)
    found = report.findings.extend
    fatal = folder_findings(folder)
    if fatal:
        found(fatal)
        return report
    parsed, problems = folder_name_findings(folder.name)
    found(problems)
    options = read_dataset_options(folder, ready_text, read_ready)
    found(options.findings)
    report.options = options.merged
    report.trigger, report.name, where = identity(options, parsed)
    if report.name:
        found(name_findings(folder, report.name, where))
    listed, problems = list_entries(folder)
    found(problems)
    if listed is None:
        return report
    entries, problems = sort_entries(folder, listed, reserved_image_prefixes)
    found(problems)
    images, problems = unique_stems(entries.images)
    found(problems)
    report.images, problems = image_findings(inspect_all(images, max_image_bytes, workers))
    found(problems)
    if report.trigger:
        rules = CaptionRules(
            trigger=report.trigger,
            policy=report.options.get("caption_policy", default_policy),
            missing=report.options.get("missing_captions", missing_captions),
            max_bytes=max_caption_bytes,
            max_tokens=max_caption_tokens,
        )
        _add_captions(report, folder, images, entries, rules)
    found(captioner_check(report.uncaptioned, report.options, caption_model))
    found(_leftover_findings(report, entries, max_caption_bytes))
    return report


def _leftover_findings(report: Report, entries: Entries, max_caption_bytes: int) -> list[Finding]:
    """What the images and captions steps leave: captions without an image, the images in formats
    lorad does not train, the preview prompts (into the report), the image count."""
    stems = {contract.split_suffix(n)[0] for n, _ in entries.images}
    findings = orphan_findings(entries.captions, stems, entries.unsupported)
    findings += [contract.unsupported_image(n, only_images=not entries.images) for n in entries.unsupported]
    report.previews, problems = read_previews(entries.previews, max_caption_bytes)
    kind = str(report.options.get("kind", "character"))
    return findings + problems + count_findings(len(entries.images), len(entries.unsupported), kind)


def _add_captions(
    report: Report, folder: Path, images: list[tuple[str, Path]], entries: Entries, rules: CaptionRules
) -> None:
    """The captions step into the report: metadata.jsonl's findings first, then each image's."""
    lines, problems = metadata_lines(folder)
    report.findings.extend(problems)
    names = [name for name, _ in images]
    by_image, problems = pair_metadata(lines, set(names), entries.unsupported, entries.captions)
    report.findings.extend(problems)
    captions = caption_images(names, entries.captions, by_image, rules)
    report.findings.extend(captions.findings)
    report.captions, report.caption_sources, report.uncaptioned = (
        captions.texts,
        captions.sources,
        captions.uncaptioned,
    )
