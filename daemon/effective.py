"""The running daemon's effective settings, for every other command (`lorad status`, `plan`, `ui`, ...).

`lorad run` writes <state>/daemon-settings.json (mode 0600: it holds real values, e.g. the queue
password `lorad workers` needs and the token `lorad ui` needs) with the source of each value, and,
when its state dir is not the default one, a pointer to it in the default state dir, so a plain
`lorad status` finds a daemon started with another `assets` or `state_dir`. A command reads them only
while that daemon still holds its lock (daemon/lock.py); a stale file is ignored. Values are masked
only when shown (`lorad config`, `mask_value`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SETTINGS_FILE = "daemon-settings.json"
POINTER_FILE = "daemon-pointer.json"
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def jsonable(value: object) -> object:
    """A setting's value as JSON (paths as strings, tuples as lists; `ui` off as false)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _write_private(path: Path, data: dict) -> None:
    from daemon.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str), mode=0o600)


def write(settings, default_state: Path | None, log=None, *, data: dict) -> list[Path]:
    """At daemon start: the settings file, and the pointer when the default state dir (lorad's own
    folder, `./assets/.lorad` unless lorad.toml says otherwise) is elsewhere. A pointer that cannot
    be written (read-only folder) is logged; the settings file is still there."""
    written = [settings.state / SETTINGS_FILE]
    _write_private(written[0], data)
    if default_state is not None and _differs(default_state, settings.state):
        pointer = default_state / POINTER_FILE
        try:
            _write_private(pointer, {"pid": data["pid"], "state": data["state"]})
            written.append(pointer)
        except OSError as exc:
            if log is not None:
                log.warning("daemon.pointer_unwritten", path=str(pointer), reason=str(exc))
    return written


def remove(paths: list[Path]) -> None:
    """At daemon stop: remove what `write` wrote, if it is still ours (another daemon may have
    replaced the pointer since)."""
    for path in paths:
        record = _read(path)
        if record is not None and record.get("pid") == os.getpid():
            try:
                path.unlink()
            except OSError:
                pass


def _differs(a: Path, b: Path) -> bool:
    try:
        return a.resolve() != b.resolve()
    except OSError:
        return True


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def running_record(state: Path) -> dict | None:
    """The settings file of the daemon running on `state`, or None (no daemon, or a stale file)."""
    from daemon.lock import running_daemon_pid

    pid = running_daemon_pid(state)
    if not pid:
        return None
    record = _read(Path(state) / SETTINGS_FILE)
    if record is None or record.get("pid") != pid or not isinstance(record.get("settings"), dict):
        return None
    return record


def find_record(state: Path, default_state: Path | None) -> dict | None:
    """The running daemon's record: on this state dir, else through the default dir's pointer."""
    record = running_record(state)
    if record is None and default_state is not None:
        pointer = _read(Path(default_state) / POINTER_FILE)
        if pointer and isinstance(pointer.get("state"), str):
            record = running_record(Path(pointer["state"]))
    return record


def daemon_values(state: Path, default_state: Path | None) -> dict[str, tuple[object, str]]:
    """{key: (value, the daemon's source)} for settings.resolve; empty when no daemon runs."""
    record = find_record(state, default_state)
    if record is None:
        return {}
    sources = record.get("sources")
    if not isinstance(sources, dict):
        sources = {}
    return {key: (value, str(sources.get(key, "default"))) for key, value in record["settings"].items()}


def is_secret_name(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


def mask_url_password(text: str) -> str:
    """scheme://user:password@host -> scheme://user:***@host (pure; any URL in the text)."""
    import re

    return re.sub(r"(://[^/\s:@]*:)[^@\s/]+@", r"\1***@", text)


def mask_value(name: str, value: object) -> str:
    """How a setting or variable is shown: secrets as ***, passwords inside URLs masked (pure)."""
    if value is None:
        return "-"
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if is_secret_name(name) and text:
        return "***"
    if name.lower() == "notify":  # apprise URLs hold tokens in their paths: show the schemes only
        return (
            ", ".join(u.split("://", 1)[0] + "://***" for u in value)
            if isinstance(value, (list, tuple))
            else "***"
        )
    return mask_url_password(text)
