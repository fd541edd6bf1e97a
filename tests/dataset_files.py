"""Dataset folders for tests: `build(root, name, files)` writes one from a {relative path: content}
table (bytes, text, None for a folder, ("symlink", target)); GOOD is the smallest valid dataset."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image


def png_bytes(size=(300, 300), mode="RGB", color=(200, 100, 50), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG", **save)
    return buf.getvalue()


def build(root: Path, name: str, files: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for rel, content in files.items():
        path = folder / rel
        if content is None:
            path.mkdir()
        elif isinstance(content, tuple) and content[0] == "symlink":
            os.symlink(content[1], path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return folder


CAP = b"ohwx, a photo"
GOOD = {"a.png": png_bytes(), "a.txt": CAP}
