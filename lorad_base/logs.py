"""Structured logs: one JSON object per line in <state>/logs/lorad.jsonl, rotated by size.

structlog and stdlib loggers (huey, watchdog) share one pipeline: structlog renders through
`ProcessorFormatter`, so a huey warning and a lorad event both come out with ts/level/event.
Tracebacks become dicts without local variables (locals can hold user data).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

# A flood of one repeated line (asyncio's "socket.accept() out of system resource" wrote 4,000 a
# second) would rotate the job history out of the log: past REPEAT_BURST lines of one event in
# REPEAT_WINDOW_S, the rest are counted, and one `log.repeated` line says how many.
REPEAT_WINDOW_S = 10.0
REPEAT_BURST = 50
_monotonic = time.monotonic

_dict_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)

SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    structlog.processors.StackInfoRenderer(),
]


def _drop_noise(_, __, event_dict):
    event_dict.pop("_from_structlog", None)
    event_dict.pop("_record", None)
    if event_dict.get("logger") == "lorad":
        event_dict.pop("logger")
    return event_dict


def _repeat_key(record: logging.LogRecord) -> tuple[str, int, str, str, str]:
    """What makes two log lines "the same event": its logger, level and event (or message
    template), and the job or dataset it is about (100 jobs queued at once are not a flood)."""
    msg = record.msg
    if isinstance(msg, dict):  # a structlog event dict
        return (record.name, record.levelno, str(msg.get("event")), str(msg.get("job_id", "")),
                str(msg.get("dataset", "")))  # fmt: skip
    return (record.name, record.levelno, str(msg)[:500], "", "")


class RepeatCollapser(logging.Filter):
    """Handler filter: lets REPEAT_BURST lines of one event through per REPEAT_WINDOW_S, counts
    the rest, and logs one `log.repeated` line when that window ends (at the next line logged).
    One instance serves all of lorad's handlers; a record's verdict is decided once."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._windows: dict[tuple, list] = {}  # key -> [window start, lines, suppressed]
        self._last_sweep = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        verdict = getattr(record, "_lorad_keep", None)
        if verdict is not None:
            return bool(verdict)
        now = _monotonic()
        due: list[tuple[tuple, int]] = []
        key = _repeat_key(record)
        with self._lock:
            if now - self._last_sweep >= 1.0:
                self._last_sweep = now
                for other in list(self._windows):
                    self._expire(other, now, due)
            self._expire(key, now, due)
            window = self._windows.setdefault(key, [now, 0, 0])
            window[1] += 1
            keep = window[1] <= REPEAT_BURST
            if not keep:
                window[2] += 1
        record._lorad_keep = keep
        for repeated, count in due:
            _summarise(repeated, count)
        return keep

    def _expire(self, key: tuple, now: float, due: list) -> None:
        window = self._windows.get(key)
        if window is not None and now - window[0] >= REPEAT_WINDOW_S:
            del self._windows[key]
            if window[2]:
                due.append((key, window[2]))


def _summarise(key: tuple, count: int) -> None:
    source, _level, event, job_id, dataset = key
    context = {k: v for k, v in (("job_id", job_id), ("dataset", dataset)) if v}
    get_logger().warning("log.repeated", repeated_event=event, source=source, count=count,
                         message=f"… repeated {count} times", **context)  # fmt: skip


# -- secrets: scrubbed from every event, whatever logged it (issue 20) -----------------------------
# Every configured secret (FAL_KEY and its ID/SECRET pair, the queue URL's password, notification
# URLs, ui_token) is registered here when logging is configured; `_redact` replaces each with
# [redacted] in every string of every event (tracebacks included), and a filter on the loggers of
# the HTTP clients (fal_client, httpx, httpcore) does the same to their records before anything
# else sees them.
_SECRETS: set[str] = set()
REDACTED = "[redacted]"
SECRET_ENV = ("FAL_KEY", "FAL_KEY_SECRET", "REPLICATE_API_TOKEN")


def register_secrets(*values: object) -> None:
    """Scrub these from every log event from now on (short or empty values are ignored: they
    would scrub ordinary words)."""
    for value in values:
        if isinstance(value, str) and len(value.strip()) >= 6:
            _SECRETS.add(value)
            if value.strip() != value:
                _SECRETS.add(value.strip())


def secrets_of(settings: Any) -> list[str]:
    """The secrets a Settings and the environment hold (pure but for the environment)."""
    import os
    from urllib.parse import urlsplit

    found = [os.environ.get(name, "") for name in SECRET_ENV]
    if os.environ.get("FAL_KEY_ID") and os.environ.get("FAL_KEY_SECRET"):
        found.append(f"{os.environ['FAL_KEY_ID'].strip()}:{os.environ['FAL_KEY_SECRET'].strip()}")
    found.append(getattr(settings, "ui_token", None) or "")
    for url in [getattr(settings, "queue", "") or "", *(getattr(settings, "notify", ()) or ())]:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        found += [password or ""] + ([url] if url in (getattr(settings, "notify", ()) or ()) else [])
    return [f for f in found if f]


def scrub(value: Any) -> Any:
    """`value` with every registered secret replaced, through dicts, lists and tuples."""
    if isinstance(value, str):
        for secret in sorted(_SECRETS, key=len, reverse=True):
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v) for v in value)
    return value


def _redact(_, __, event_dict):
    if not _SECRETS:
        return event_dict
    return {k: scrub(v) for k, v in event_dict.items()}


class _RedactFilter(logging.Filter):
    """On the HTTP clients' loggers: their messages may quote a header or a URL with a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg, record.args = scrub(record.getMessage()), None
        return True


_REDACT_FILTER = _RedactFilter()


def _json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_noise,
            _dict_tracebacks,
            _redact,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
    )


def _console_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_noise,
            structlog.processors.format_exc_info,
            _redact,
            structlog.dev.ConsoleRenderer(colors=True, timestamp_key="ts"),
        ],
    )


def configure(
    *,
    level: str = "INFO",
    log_file: Path | None = None,
    max_bytes: int = 10_000_000,
    backups: int = 5,
    console: bool = True,
    stream=None,
    secrets: tuple[str, ...] | list[str] = (),
) -> None:
    """Install the handlers on the root logger; safe to call again (replaces lorad's handlers).
    `secrets` (and the FAL_KEY family from the environment) are scrubbed from every event."""
    import os

    register_secrets(*secrets, *(os.environ.get(name, "") for name in SECRET_ENV))
    for name in ("fal_client", "replicate", "httpx", "httpcore"):
        if _REDACT_FILTER not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_REDACT_FILTER)
    structlog.configure(
        processors=[*SHARED_PROCESSORS, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_lorad", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    collapser = RepeatCollapser()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        file_handler.setFormatter(_json_formatter())
        file_handler._lorad = True  # type: ignore[attr-defined]
        file_handler.addFilter(collapser)
        root.addHandler(file_handler)
    if console:
        stream = stream or sys.stderr
        console_handler = logging.StreamHandler(stream)
        is_tty = hasattr(stream, "isatty") and stream.isatty()
        console_handler.setFormatter(_console_formatter() if is_tty else _json_formatter())
        console_handler._lorad = True  # type: ignore[attr-defined]
        console_handler.addFilter(collapser)
        root.addHandler(console_handler)
    # huey logs every task at INFO; keep its chatter at WARNING unless debugging.
    logging.getLogger("huey").setLevel(level if level == "DEBUG" else "WARNING")
    logging.getLogger("watchdog").setLevel("WARNING")
    logging.getLogger("PIL").setLevel("WARNING")  # its DEBUG lines are per PNG chunk
    # HTTP and Redis clients (fal's status polls, apprise, redis-py) log every request at INFO/DEBUG:
    # a cloud job polled for an hour would bury the job's own lines.
    for name in ("httpx", "httpcore", "redis", "urllib3"):
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")


def get_logger(**context):
    """A lazy logger: it picks up the configuration in force when it first logs."""
    return structlog.get_logger("lorad", **context)
