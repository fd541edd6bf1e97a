"""safetensors at the byte level: read the header, write a copy with a new header and extra tensors.

No torch, mlx or numpy: the daemon rewrites LoRA files without an ML stack, and the tensor bytes
it does not change are copied untouched (bf16 included). One writer serves the provenance header
(daemon/publish.py), the mflux export's alpha scalars and the fal conversion's renamed keys.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from lorad_base.fsutil import temp_beside

MAX_HEADER_BYTES = 100 * 1024 * 1024


class NotSafetensors(ValueError):
    """The file is not a safetensors file (or its data is shorter than its header says)."""


def read_header(path: Path, file_size: int | None = None) -> tuple[dict, int]:
    """(header dict, data offset), checked against the file's size."""
    size = Path(path).stat().st_size if file_size is None else file_size
    with Path(path).open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise NotSafetensors(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise NotSafetensors(
                f"{path} is not a safetensors file (header length {length} does not fit a {size}-byte file)"
            )
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise NotSafetensors(f"{path} is not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise NotSafetensors(f"{path} is not a safetensors file (header is not a JSON object)")
    return header, 8 + length


def data_length(header: dict) -> int:
    """Where the last tensor's bytes end (the data the header accounts for)."""
    return max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)


def scalar_tensors(start: int, scalars: dict[str, float]) -> tuple[dict[str, dict], bytes]:
    """Header entries and bytes for F32 scalars placed after `start` bytes of data (pure)."""
    entries, extra = {}, b""
    for name, value in sorted(scalars.items()):
        entries[name] = {
            "dtype": "F32",
            "shape": [],
            "data_offsets": [start + len(extra), start + len(extra) + 4],
        }
        extra += struct.pack("<f", value)
    return entries, extra


def header_bytes(header: dict) -> bytes:
    """The 8-byte length and the JSON header, padded so the data section stays 8-byte aligned (pure)."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def f32_file(tensors: Mapping[str, tuple[tuple[int, ...], list[float]]], metadata: dict[str, str]) -> bytes:
    """A whole safetensors file of F32 tensors (name -> (shape, values)), in memory (pure): a small
    adapter written without numpy (the scripted engine's child)."""
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    return header_bytes(header) + b"".join(blobs)


def write(src: Path, dest: Path, header: dict, *, offset: int, data_len: int, extra: bytes = b"") -> None:
    """dest (atomically, fsynced) = `header`, then `data_len` bytes of src's data from `offset`,
    then `extra`. dest may be src: the copy is made beside it and renamed over it."""
    fd, tmp = temp_beside(Path(dest))
    try:
        with Path(src).open("rb") as fin, os.fdopen(fd, "wb") as fout:
            fout.write(header_bytes(header))
            fin.seek(offset)
            remaining = data_len
            while remaining:
                chunk = fin.read(min(remaining, 1 << 20))
                if not chunk:
                    raise NotSafetensors(f"{src}: its tensor data is shorter than its header says")
                fout.write(chunk)
                remaining -= len(chunk)
            fout.write(extra)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
