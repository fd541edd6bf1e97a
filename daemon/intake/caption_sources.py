"""Where each image's caption comes from: its `<stem>.txt`, else a metadata.jsonl line, else
missing_captions decides (refuse, the trigger word alone, or the captioner later). Also the
captions that pair with no image, and the preview prompt files.

Steps of validate_dataset (daemon/intake/validate.py); each returns its findings in the order the
user reads them. Only regular files are read, each with a size cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daemon.fsutil import NotARegularFile, open_regular, read_capped
from daemon.intake import contract, metadata
from daemon.intake.findings import Finding


@dataclass
class Captions:
    """The captions step's result: what the snapshot trains with, and what it found."""

    texts: dict[str, str] = field(default_factory=dict)  # image name -> normalised caption
    sources: dict[str, str] = field(default_factory=dict)  # image name -> file | metadata.jsonl | trigger
    uncaptioned: list[str] = field(default_factory=list)  # left for the captioner (missing_captions = "vlm")
    findings: list[Finding] = field(default_factory=list)


def read_sidecar(path: Path, max_bytes: int) -> tuple[bytes, int] | Finding:
    """A caption file's first bytes and real size, or the finding that says why it cannot be read."""
    try:
        return read_capped(path, max_bytes)
    except NotARegularFile as exc:
        return contract.special_file(path.name, exc.kind)
    except OSError as exc:
        return Finding.error(
            path.name, f"cannot be read: {exc.strerror}", "check its permissions", code="caption.unreadable"
        )


def pair_metadata(
    lines: list[metadata.MetadataLine], image_names: set[str], unsupported: list[str], sidecars: dict
) -> tuple[dict[str, metadata.MetadataLine], list[Finding]]:
    """metadata.jsonl's lines by image name. A line naming no image, or an image that has a .txt
    sidecar (the sidecar wins), is a finding naming the line (pure)."""
    by_image: dict[str, metadata.MetadataLine] = {}
    findings: list[Finding] = []
    for entry in lines:
        if entry.file_name not in image_names:
            findings.append(metadata.unmatched_line(entry, entry.file_name in unsupported))
            continue
        stem = contract.split_suffix(entry.file_name)[0]
        if stem in sidecars:
            findings.append(metadata.sidecar_wins(entry, Path(sidecars[stem]).name))
            continue
        by_image[entry.file_name] = entry
    return by_image, findings


def no_caption(name: str, trigger: str, missing: str, out: Captions) -> None:
    """An image with neither a sidecar nor a metadata.jsonl line: refused, captioned by the
    trigger word alone, or left for the captioner, as missing_captions says."""
    stem = contract.split_suffix(name)[0]
    if missing == "trigger":
        out.texts[name], out.sources[name] = trigger, "trigger"
        out.findings.append(
            Finding.warning(
                name,
                f'has no caption; trained with the trigger word alone ({trigger!r}, missing_captions = "trigger")',
                f"write {stem}.txt describing the image for a LoRA that follows prompts better",
                code="caption.trigger_only",
            )
        )
    elif missing == "vlm":
        out.uncaptioned.append(name)
    else:
        out.findings.append(
            Finding.error(
                name,
                f"has no caption ({stem}.txt is missing and no {metadata.METADATA_FILE} line names it; "
                'missing_captions = "refuse")',
                f"write {stem}.txt describing the image, or set missing_captions in lora.toml: "
                '"refuse" (default), "trigger" (the trigger word alone) or "vlm" (a local model captions it)',
                code="caption.missing",
            )
        )


@dataclass(frozen=True)
class CaptionRules:
    """How captions are judged: the trigger word, caption_policy, missing_captions, the caps."""

    trigger: str
    policy: str = "prepend"
    missing: str = "refuse"
    max_bytes: int = contract.MAX_CAPTION_BYTES
    max_tokens: int | None = contract.DEFAULT_CAPTION_TOKENS


def caption_images(
    names: list[str],
    sidecars: dict[str, Path],
    by_image: dict[str, metadata.MetadataLine],
    rules: CaptionRules,
) -> Captions:
    """Each image's caption from its sidecar, else its metadata.jsonl line, else missing_captions;
    every caption decoded and checked (contract.check_caption), findings in image order."""
    out = Captions()
    for name in names:
        stem = contract.split_suffix(name)[0]
        if stem in sidecars:
            read = read_sidecar(sidecars[stem], rules.max_bytes)
            if isinstance(read, Finding):
                out.findings.append(read)
                continue
            rel, (raw, size), source = sidecars[stem].name, read, "file"
        elif name in by_image:
            line = by_image[name]
            raw = line.text.encode("utf-8")
            rel, size, source = line.where, len(raw), metadata.METADATA_FILE
        else:
            no_caption(name, rules.trigger, rules.missing, out)
            continue
        text, problems = contract.check_caption(
            rel,
            raw,
            rules.trigger,
            rules.policy,
            size=size,
            max_bytes=rules.max_bytes,
            max_tokens=rules.max_tokens,
        )
        out.findings.extend(problems)
        if text is not None:
            out.texts[name], out.sources[name] = text, source
    return out


def captioner_finding(count: int, problem: str | None, where: str) -> Finding | None:
    """missing_captions = "vlm" with a captioner that is not on this machine (`problem` says why):
    refused at intake, with how to fetch it (lorad never downloads it unasked), rather than
    failing the job later (pure)."""
    if problem is None:
        return None
    return Finding.error(
        where,
        f'{count} images need captions (missing_captions = "vlm"), but {problem}',
        'fetch the model, then create READY again; or write captions, or set missing_captions = "trigger"',
        code="caption.model",
    )


def orphan_findings(
    sidecars: dict[str, Path], image_stems: set[str], unsupported: list[str]
) -> list[Finding]:
    """Captions whose image is missing, or is in a format lorad does not train (then the caption
    is kept for when the image is converted) (pure)."""
    unsupported_by_stem = {contract.split_suffix(n)[0]: n for n in unsupported}
    findings: list[Finding] = []
    for stem, path in sidecars.items():
        if stem in image_stems:
            continue
        name = Path(path).name
        image = unsupported_by_stem.get(stem)
        if image is not None:
            findings.append(
                Finding.warning(
                    name,
                    f"is the caption of {image}, an image format lorad does not train",
                    f"convert {image} (see its message); this caption is used once the image is a JPEG/PNG/WebP",
                    code="caption.unsupported_image",
                )
            )
            continue
        findings.append(
            Finding.warning(name, "caption has no image", "remove it or add the image", code="caption.orphan")
        )
    return findings


def _read_small(path: Path, limit: int) -> bytes:
    with open_regular(path) as fh:
        return fh.read(limit + 1)


def read_previews(previews: list[tuple[str, Path]], max_bytes: int) -> tuple[dict[str, str], list[Finding]]:
    """preview*.txt prompts (whitespace normalised; empty ones left out), and the files that
    cannot be read as UTF-8 text."""
    prompts: dict[str, str] = {}
    findings: list[Finding] = []
    for name, path in previews:
        try:
            text = _read_small(path, max_bytes).decode("utf-8-sig").strip()
        except NotARegularFile as exc:
            findings.append(contract.special_file(name, exc.kind))
            continue
        except (OSError, UnicodeDecodeError):
            findings.append(
                Finding.error(
                    name,
                    "preview prompt is not readable UTF-8 text",
                    "re-save it as UTF-8",
                    code="preview.encoding",
                )
            )
            continue
        if text:
            prompts[name] = " ".join(text.split())
    return prompts, findings
