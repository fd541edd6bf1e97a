"""`metadata.jsonl` captions (the Hugging Face ImageFolder convention), as pure functions.

One JSON object per line: `{"file_name": "a.png", "text": "ohwx, a woman ..."}`, `file_name`
relative to the dataset folder. Every problem is a Finding naming the line number, so the user
can go straight to it. The caption text itself is checked by contract.check_caption like a
`.txt` sidecar's (limits, trigger rules); the snapshot writes ordinary sidecars from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from daemon.intake.findings import Finding

METADATA_FILE = "metadata.jsonl"
# The whole file: far more than any dataset's captions need, small enough to read at once.
MAX_METADATA_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class MetadataLine:
    line: int  # 1-based
    file_name: str
    text: str

    @property
    def where(self) -> str:
        return f"{METADATA_FILE} line {self.line}"


def _line_error(line: int, message: str, hint: str, code: str) -> Finding:
    return Finding.error(f"{METADATA_FILE} line {line}", message, hint, code=code)


def _parse_line(number: int, raw: str) -> MetadataLine | Finding:
    """One non-blank line as a MetadataLine, or the error that names what is wrong with it."""
    example = '{"file_name": "0001.png", "text": "ohwx, a photo of ..."}'
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return _line_error(
            number,
            f"is not valid JSON ({exc.msg} at column {exc.colno})",
            f"write it as {example}",
            "metadata.json",
        )
    if not isinstance(obj, dict):
        return _line_error(
            number,
            f"is a JSON {type(obj).__name__}, not an object",
            f"write it as {example}",
            "metadata.json",
        )
    missing = [key for key in ("file_name", "text") if key not in obj]
    if missing:
        return _line_error(
            number,
            f"has no {' and no '.join(repr(k) for k in missing)} field",
            f"write it as {example}",
            "metadata.field",
        )
    for key in ("file_name", "text"):
        if not isinstance(obj[key], str):
            return _line_error(
                number,
                f"field {key!r} must be a string, got {type(obj[key]).__name__}",
                f"write it as {example}",
                "metadata.field",
            )
    name = obj["file_name"].strip()
    if name.startswith("./"):
        name = name[2:]
    if not name or "/" in name or "\\" in name:
        return _line_error(
            number,
            f"file_name {obj['file_name']!r} is not a file directly in the dataset folder",
            "lorad reads only files at the top of the dataset folder: name the file itself (e.g. 0001.png)",
            "metadata.path",
        )
    return MetadataLine(number, name, obj["text"])


def parse_metadata(raw: bytes) -> tuple[list[MetadataLine], list[Finding]]:
    """Every line of metadata.jsonl: the good ones and an error per bad line (pure). Blank
    lines are skipped; a file_name seen on an earlier line is an error on the later one."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return [], [
            _line_error(line, "is not UTF-8 text", "save metadata.jsonl as UTF-8", "metadata.encoding")
        ]
    lines: list[MetadataLine] = []
    findings: list[Finding] = []
    seen: dict[str, int] = {}
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if not raw_line.strip():
            continue
        parsed = _parse_line(number, raw_line)
        if isinstance(parsed, Finding):
            findings.append(parsed)
            continue
        if parsed.file_name in seen:
            findings.append(
                _line_error(
                    number,
                    f"names {parsed.file_name} again (line {seen[parsed.file_name]} already captions it)",
                    "keep one line per image",
                    "metadata.duplicate",
                )
            )
            continue
        seen[parsed.file_name] = number
        lines.append(parsed)
    return lines, findings


def unmatched_line(entry: MetadataLine, unsupported: bool) -> Finding:
    """A line whose file is not a trainable image in the folder: an error (a typo'd or deleted
    file), a warning when it names an image in a format lorad does not train (named elsewhere)."""
    if unsupported:
        return Finding.warning(
            entry.where,
            f"captions {entry.file_name}, an image format lorad does not train",
            f"convert {entry.file_name} (see its message); this line is used once it is a JPEG/PNG/WebP",
            code="metadata.unsupported_image",
        )
    return _line_error(
        entry.line,
        f"names {entry.file_name}, which is not an image in the dataset folder",
        "fix the file_name (it is case-sensitive and relative to the folder) or remove the line",
        "metadata.missing",
    )


def sidecar_wins(entry: MetadataLine, sidecar: str) -> Finding:
    return Finding.warning(
        entry.where,
        f"captions {entry.file_name}, which also has {sidecar}: the .txt sidecar is used",
        f"remove the line or {sidecar} so the caption has one source",
        code="metadata.shadowed",
    )
