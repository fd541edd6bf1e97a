"""The LoRA registry (config.json, key "loras"): read-modify-write under a lock, atomically.

Every other key is preserved as it was (order included). A registry that is not valid JSON, or
whose "loras" is not an object, is never overwritten: the caller fails the job with the reason.
The write is split in two (prepare a temp file, then commit by rename) so publishing can do
every write that may fail (disk full) before it changes anything the user sees.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from daemon.fsutil import temp_beside


class RegistryError(Exception):
    pass


def load(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"registry {path} cannot be read ({exc}); fix or move it, then lorad retry") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"registry {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"lorad left it untouched. Fix it, then run lorad retry"
        ) from None
    if not isinstance(data, dict):
        raise RegistryError(f"registry {path} holds a JSON {type(data).__name__}, not an object; lorad left it untouched")
    if "loras" in data and not isinstance(data["loras"], dict):
        raise RegistryError(f'registry {path}: "loras" is not an object; lorad left it untouched')
    return data


class Transaction:
    """Hold the registry lock; `prepare` writes the new file aside, `commit` renames it in."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_fd: int | None = None
        self.tmp: str | None = None

    def __enter__(self) -> "Transaction":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        return self

    def read(self) -> dict:
        return load(self.path)

    def prepare(self, updates: dict[str, dict]) -> None:
        """Write the registry with these "loras" entries set, every other key kept, aside."""
        data = load(self.path)
        loras = data.setdefault("loras", {})
        loras.update(updates)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        fd, self.tmp = temp_beside(self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            if self.path.exists():
                os.chmod(self.tmp, self.path.stat().st_mode & 0o777)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        assert self.tmp is not None
        os.replace(self.tmp, self.path)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None

    def __exit__(self, *exc) -> None:
        self.abort()
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
            self.lock_fd = None
