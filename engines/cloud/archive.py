"""The LoRA inside a cloud's result archive (Replicate's trainers return a .tar), taken out under
the rules for any untrusted input: no member is extracted by its own name; a member whose name is
absolute or climbs out (`..`), a link, a device or anything but a plain file is never read; only
one `*.safetensors` is taken (the LoRA), copied to a path lorad chose, bounded in size."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from engines.cloud.download import TooLarge
from lorad_base.fsutil import temp_beside


class BadArchive(Exception):
    pass


def member_problem(name: str) -> str | None:
    """Why a member name is unsafe (pure): absolute, climbing out, or with a drive/backslash."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name.split("/")[0]:
        return f"the archive holds an unsafe path {name[:120]!r}"
    return None


def pick_lora(names: list[str]) -> str:
    """The one LoRA member (pure): `lora.safetensors` if present, else the only `*.safetensors`."""
    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    named = [n for n in candidates if PurePosixPath(n).name == "lora.safetensors"]
    if len(named) == 1:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BadArchive(
            f"the archive holds no .safetensors file (it holds {', '.join(names[:8]) or 'nothing'})"
        )
    raise BadArchive(f"the archive holds {len(candidates)} .safetensors files and none is lora.safetensors")


def extract_lora(archive: Path, dest: Path, cap: int) -> str:
    """Copy the archive's LoRA to `dest` (atomically); the member's name. BadArchive / TooLarge."""
    if tarfile.is_tarfile(archive):
        return _from_tar(archive, dest, cap)
    if zipfile.is_zipfile(archive):
        return _from_zip(archive, dest, cap)
    if archive.read_bytes()[:8] and _is_safetensors(archive):
        _copy(archive.open("rb"), dest, cap)
        return archive.name
    raise BadArchive("the result is neither a tar, a zip nor a .safetensors file")


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _from_tar(archive: Path, dest: Path, cap: int) -> str:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            problem = member_problem(m.name)
            if problem:
                raise BadArchive(problem)
        files = {m.name: m for m in members if m.isfile()}
        name = pick_lora(sorted(files))
        member = files[name]
        if member.size > cap:
            raise TooLarge(f"{name} is {member.size} bytes, above the cap of {cap}")
        source = tar.extractfile(member)
        if source is None:
            raise BadArchive(f"{name} cannot be read")
        _copy(source, dest, cap)
        return name


def _from_zip(archive: Path, dest: Path, cap: int) -> str:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            problem = member_problem(info.filename)
            if problem:
                raise BadArchive(problem)
        files = {i.filename: i for i in infos if not i.is_dir() and (i.external_attr >> 28) != 0xA}
        name = pick_lora(sorted(files))
        if files[name].file_size > cap:
            raise TooLarge(f"{name} is {files[name].file_size} bytes, above the cap of {cap}")
        with zf.open(files[name]) as source:
            _copy(source, dest, cap)
        return name


def _copy(source, dest: Path, cap: int) -> None:
    fd, tmp = temp_beside(dest)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, source:
            while chunk := source.read(1 << 20):
                size += len(chunk)
                if size > cap:
                    raise TooLarge(f"the LoRA in the archive passed {cap} bytes; stopped")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
