"""`lorad logs`: a readable tail of lorad.jsonl (level colours, job id, event, key fields)."""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, TextIO

_COLOURS = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[31m",
    "critical": "\x1b[41m",
}
_RESET = "\x1b[0m"
_SKIP = {"ts", "level", "event", "job_id", "dataset", "logger", "exception"}


def parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def matches(record: dict, job: str | None) -> bool:
    return job is None or str(record.get("job_id", "")).startswith(job)


def format_record(record: dict, *, colour: bool) -> str:
    level = str(record.get("level", "info")).lower()
    ts = str(record.get("ts", ""))[:19].replace("T", " ")
    job = record.get("job_id")
    fields = " ".join(f"{k}={v}" for k, v in record.items() if k not in _SKIP)
    head = f"{level.upper():<7}"
    if colour:
        head = f"{_COLOURS.get(level, '')}{head}{_RESET}"
    text = f"{ts} {head} {('[' + str(job) + '] ') if job else ''}{record.get('event', '')}"
    if record.get("dataset"):
        text += f" dataset={record['dataset']}"
    if fields:
        text += f"  {fields}"
    exc = record.get("exception")
    if exc:
        if isinstance(exc, list) and exc and isinstance(exc[0], dict):
            text += f"\n    {exc[0].get('exc_type')}: {exc[0].get('exc_value')}"
        else:
            text += f"\n    {exc}"
    return text


def _tail_lines(path: Path, n: int) -> list[str]:
    if not path.exists():
        return []
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        return list(deque(fh, maxlen=max(n, 0) or None)) if n else []


def _last_matching(path: Path, n: int, job: str) -> list[str]:
    """The last n lines of the log that belong to `job` (memory: n lines)."""
    if n <= 0 or not path.exists():
        return []
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        return list(
            deque((line for line in fh if (r := parse(line)) is not None and matches(r, job)), maxlen=n)
        )


def _follow(path: Path, poll_s: float = 0.5) -> Iterator[str]:
    while not path.exists():
        time.sleep(poll_s)
    fh = path.open("r", encoding="utf-8", errors="replace")
    fh.seek(0, 2)
    inode = path.stat().st_ino
    while True:
        line = fh.readline()
        if line:
            yield line
            continue
        time.sleep(poll_s)
        try:
            if path.stat().st_ino != inode:  # rotated
                fh.close()
                fh = path.open("r", encoding="utf-8", errors="replace")
                inode = path.stat().st_ino
        except FileNotFoundError:
            pass


def show(
    path: Path, *, lines: int, follow: bool, job: str | None, raw: bool, out: TextIO = sys.stdout
) -> int:
    colour = out.isatty() and not raw

    def emit(source: Iterable[str]) -> None:
        for line in source:
            record = parse(line)
            if record is None or not matches(record, job):
                continue
            out.write((line.rstrip("\n") if raw else format_record(record, colour=colour)) + "\n")
            out.flush()

    if not path.exists() and not follow:
        print(f"no log yet at {path} (the daemon writes it once it runs)", file=sys.stderr)
        return 0
    # With --job: the last N lines *of that job* (the whole file streams through an N-line window).
    emit(_last_matching(path, lines, job) if job else _tail_lines(path, lines))
    if follow:
        emit(_follow(path))
    return 0
