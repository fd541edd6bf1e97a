"""A result download bounded by what the result declares and by an absolute cap: a 200 MB junk
answer is refused at its Content-Length or at the first byte past the bound, not after it is all
on disk (issue 19)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lorad_base.fsutil import temp_beside

MAX_RESULT_BYTES = 2 * 1024**3  # no LoRA lorad trains is near this; anything larger is refused


class TooLarge(Exception):
    pass


class WrongSize(Exception):
    pass


def size_bound(declared: int | None, cap: int) -> int:
    """The most bytes a download may bring (pure): the declared size when there is one (never
    above the cap), else the cap. TooLarge when the declared size itself is above the cap."""
    if declared is not None and declared > cap:
        raise TooLarge(f"the result declares {declared} bytes, above the cap of {cap}")
    return cap if declared is None else declared


def fetch_capped(url: str, dest: Path, declared: int | None, cap: int, timeout_s: float) -> tuple[int, str]:
    """Stream `url` to dest atomically; (bytes, sha256). TooLarge/WrongSize (nothing kept) when the
    body is above the bound or not the size announced (a truncated or swapped file)."""
    import httpx

    bound = size_bound(declared, cap)
    digest, size = hashlib.sha256(), 0
    fd, tmp = temp_beside(dest)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response,
        ):
            response.raise_for_status()
            announced = response.headers.get("content-length")
            if announced is not None and announced.isdigit() and int(announced) > bound:
                raise TooLarge(f"the download announces {announced} bytes, above {bound} allowed")
            for chunk in response.iter_bytes(1 << 20):
                size += len(chunk)
                if size > bound:
                    raise TooLarge(f"the download passed {bound} bytes, the most allowed; stopped")
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if announced is not None and announced.isdigit() and int(announced) != size:
            raise WrongSize(f"the LoRA download is {size} bytes, the server announced {announced}")
        if declared is not None and declared != size:
            raise WrongSize(f"the LoRA download is {size} bytes, the result says {declared}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size, digest.hexdigest()
