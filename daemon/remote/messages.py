"""What crosses the Redis wire, as typed messages: the coordinator's `Offer` and the workers'
events. Bytes from Redis become objects ONLY through `Offer.from_dict` / `WorkerEvent.from_dict`:
anyone who can reach the Redis server can write there, so every field is hostile input.

Each `from_dict` checks every field (ids match the id grammar, paths are relative, normalised and
inside the one area that message may write, sizes are bounded, enums are enums, fencing tokens
are tokens) and raises MessageRefused naming the field. docs/RELIABILITY.md "Hostile peers" has
the trust model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from daemon.remote.transfer import FileRef, HostileEntry, TransferError, TreeRef, check_entry_path

# Job ids are `new_job_id()`'s `20260101-120000-ab12`; the grammar admits any short name of
# letters, digits, `-` and `_` (never `/`, `.` or `..`: an id becomes a folder name).
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
TOKEN = re.compile(r"^[0-9]{1,9}\.[0-9a-f]{8,64}$")  # lease.new_token: "<attempt>.<hex>"
WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENGINE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
EVENT_KINDS = (
    "declined",
    "accepted",
    "plan",
    "progress",
    "checkpoint",
    "rendering",
    "stopped",
    "failed",
    "done",
)
RESULT_KEYS = ("adapter", "render", "compare")
# The render without the LoRA (the learning metrics' lora_effect): sent by current workers, absent
# from an older worker's result.
OPTIONAL_RESULT_KEYS = ("base",)
# The one report subfolder a result may carry: the samples rendered during training.
SAMPLES_DIR = "samples"

# The areas of a work dir a worker's saved state may land in (Engine.saved_state of each engine:
# mflux and scripted `train/checkpoints/`, fal `fal/`). Never the job's record (job.json), its
# manifest, its snapshot (data/) or the verified result (result/).
STATE_AREAS = ("train/checkpoints/", "fal/")

MAX_TEXT = 2_000
MAX_ERROR = 20_000
MAX_JSON = 256 * 1024  # plans, options
MAX_STATE_FILES = 16
MAX_REPORT_FILES = 32
MAX_STEP = 10_000_000
MAX_MANIFEST_BYTES = 4 << 20  # the job's manifest.json
MAX_STATE_BYTES = 16 << 30  # one checkpoint file
MAX_ADAPTER_BYTES = 4 << 30  # a LoRA
MAX_IMAGE_BYTES = 256 << 20  # a render or a report file


class MessageRefused(ValueError):
    """A message from Redis that does not check out; `field` names what is wrong."""

    def __init__(self, field: str, why: str, *, job_id: str | None = None, token: str | None = None):
        super().__init__(f"field {field!r}: {why}")
        self.field, self.why, self.job_id, self.token = field, why, job_id, token


# -- field checks (pure) -------------------------------------------------------------------------


def _get(data: dict, name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = data.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise MessageRefused(name, f"missing or not {want}: {str(value)[:80]!r}")
    return value


def _matching(data: dict, name: str, pattern: re.Pattern[str]) -> str:
    value = _get(data, name, str)
    if not pattern.match(value):
        raise MessageRefused(name, f"{value[:80]!r} does not match {pattern.pattern}")
    return value


def _text(data: dict, name: str, limit: int = MAX_TEXT, *, optional: bool = False) -> str | None:
    value = _get(data, name, str, optional=optional)
    if value is None:
        return None
    if len(value) > limit or "\x00" in value:
        raise MessageRefused(name, f"longer than {limit} characters or holds a NUL")
    return value


def _int(data: dict, name: str, low: int, high: int, *, optional: bool = False) -> int | None:
    value = _get(data, name, int, optional=optional)
    if value is not None and not low <= value <= high:
        raise MessageRefused(name, f"{value} outside {low}..{high}")
    return value


def _number(data: dict, name: str, *, lenient: bool = False) -> float | None:
    """A finite number or None; `lenient`: a NaN/inf (a diverged loss) reads as None, not a refusal."""
    value = _get(data, name, (int, float), optional=True)
    if value is not None and not math.isfinite(value):
        if lenient:
            return None
        raise MessageRefused(name, "not a finite number")
    return value


def _json_object(data: dict, name: str, *, optional: bool = False) -> dict:
    value = _get(data, name, dict, optional=optional)
    if value is None:
        return {}
    if len(json.dumps(value, default=str)) > MAX_JSON:
        raise MessageRefused(name, f"larger than {MAX_JSON} bytes")
    return value


def _file_ref(value: Any, name: str, *, key_prefix: str, max_bytes: int) -> FileRef:
    """A transfer reference under this job's keys, no larger than the cap for what it carries."""
    try:
        ref = FileRef.from_dict(value)
    except TransferError as exc:
        raise MessageRefused(name, str(exc)) from None
    if not ref.key.startswith(key_prefix):
        raise MessageRefused(name, f"key {ref.key!r} is not under {key_prefix!r}")
    if ref.size > max_bytes:
        raise MessageRefused(name, f"declares {ref.size} bytes, more than the cap of {max_bytes}")
    return ref


def state_path(rel: Any, name: str = "rel") -> str:
    """A saved-state path as a worker may write it (pure): relative, normalised, and inside one of
    STATE_AREAS, so never job.json, manifest.json, data/ or result/."""
    try:
        path = check_entry_path(rel)
    except HostileEntry as exc:
        raise MessageRefused(name, exc.reason) from None
    if not any(path.startswith(area) and len(path) > len(area) for area in STATE_AREAS):
        raise MessageRefused(name, f"{path!r} is outside the saved-state areas {', '.join(STATE_AREAS)}")
    return path


def report_name(name: Any, field: str = "name") -> str:
    """A report file's name: one plain file name, or `samples/<plain file name>` (pure), so it
    lands inside result/report/ (or its one samples/ subfolder)."""
    try:
        path = check_entry_path(name)
    except HostileEntry as exc:
        raise MessageRefused(field, f"{name!r} is not a plain file name ({exc.reason})") from None
    parts = path.split("/")
    if len(parts) == 2 and parts[0] == SAMPLES_DIR:
        parts = parts[1:]
    if len(parts) != 1 or parts[0].startswith("."):
        raise MessageRefused(field, f"{path!r} is not a plain file name (or {SAMPLES_DIR}/<file>)")
    return path


def files_prefix(job_id: str, token: str = "") -> str:
    from daemon.remote.lease import files_key

    return files_key(job_id, token) + ":"


# -- the offer (coordinator -> workers) ----------------------------------------------------------


@dataclass(frozen=True)
class StateFile:
    """One saved-state file (a checkpoint) and where it lands in the work dir."""

    rel: str
    ref: FileRef

    @classmethod
    def parse(cls, value: Any, field: str, *, key_prefix: str) -> "StateFile":
        if not isinstance(value, dict):
            raise MessageRefused(field, "not an object")
        return cls(
            rel=state_path(value.get("rel"), f"{field}.rel"),
            ref=_file_ref(value.get("ref"), f"{field}.ref", key_prefix=key_prefix, max_bytes=MAX_STATE_BYTES),
        )


def _state_files(data: dict, name: str, key_prefix: str) -> tuple[StateFile, ...]:
    items = _get(data, name, list, optional=True) or []
    if len(items) > MAX_STATE_FILES:
        raise MessageRefused(name, f"more than {MAX_STATE_FILES} files")
    files = tuple(StateFile.parse(v, f"{name}[{i}]", key_prefix=key_prefix) for i, v in enumerate(items))
    if len({f.rel for f in files}) != len(files):
        raise MessageRefused(name, "a path is listed twice")
    return files


@dataclass(frozen=True)
class Offer:
    """One dispatch of a job, as queued for the workers."""

    job_id: str
    token: str
    attempt: int
    name: str
    trigger: str
    model: str
    engine: str
    image_count: int
    max_side: int
    options: dict
    preview_prompt: str
    snapshot: TreeRef
    manifest: FileRef
    state: tuple[StateFile, ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> "Offer":
        """The only way a queued offer becomes an Offer; MessageRefused names the bad field."""
        if not isinstance(data, dict):
            raise MessageRefused("offer", "not an object")
        job_id = _matching(data, "job_id", JOB_ID)
        prefix = files_prefix(job_id)
        try:
            snapshot = TreeRef.from_dict(data.get("snapshot"))
        except TransferError as exc:
            raise MessageRefused("snapshot", str(exc)) from None
        if not snapshot.key.startswith(prefix):
            raise MessageRefused("snapshot", f"key {snapshot.key!r} is not under {prefix!r}")
        return cls(
            job_id=job_id,
            token=_matching(data, "token", TOKEN),
            attempt=_int(data, "attempt", 0, 1_000_000) or 0,
            name=_text(data, "name", 200) or "",
            trigger=_text(data, "trigger", 200) or "",
            model=_text(data, "model", 200) or "",
            engine=_matching(data, "engine", ENGINE),
            image_count=_int(data, "image_count", 1, 1_000_000) or 1,
            max_side=_int(data, "max_side", 1, 1 << 16) or 1,
            options=_json_object(data, "options", optional=True),
            preview_prompt=_text(data, "preview_prompt", MAX_ERROR) or "",
            snapshot=snapshot,
            manifest=_file_ref(
                data.get("manifest"), "manifest", key_prefix=prefix, max_bytes=MAX_MANIFEST_BYTES
            ),
            state=_state_files(data, "state", prefix),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "token": self.token, "attempt": self.attempt, "name": self.name,
            "trigger": self.trigger, "model": self.model, "engine": self.engine,
            "image_count": self.image_count, "max_side": self.max_side, "options": self.options,
            "preview_prompt": self.preview_prompt, "snapshot": self.snapshot.to_dict(),
            "manifest": self.manifest.to_dict(),
            "state": [{"rel": s.rel, "ref": s.ref.to_dict()} for s in self.state],
        }  # fmt: skip


# -- worker events (workers -> coordinator) ------------------------------------------------------


@dataclass(frozen=True)
class ReportFile:
    name: str
    ref: FileRef


@dataclass(frozen=True)
class WorkerEvent:
    """One event of the `lorad:events` stream. `data` holds the kind's checked fields: plan (dict),
    host, step, total, loss, eta_s, reason, error, needs_gb, has_gb; `files` the checkpoint's
    saved state; `result` and `report` a finished job's artifacts."""

    job_id: str
    token: str
    kind: str
    worker: str
    data: dict
    files: tuple[StateFile, ...] = ()
    result: tuple[tuple[str, FileRef], ...] = ()
    report: tuple[ReportFile, ...] = ()

    @classmethod
    def from_dict(cls, fields: Any, *, key_prefix: str | None = None) -> "WorkerEvent":
        """The only way a stream entry becomes an event. MessageRefused names the bad field; once
        the envelope (job, token) checked out, the refusal carries them (the job fails visibly)."""
        if not isinstance(fields, dict):
            raise MessageRefused("event", "not an object")
        raw = {_decode(k): _decode(v) for k, v in fields.items()}
        job_id = _matching(raw, "job", JOB_ID)
        token = _matching(raw, "token", TOKEN)
        kind = _get(raw, "kind", str)
        if kind not in EVENT_KINDS:
            raise MessageRefused("kind", f"{kind[:40]!r} is not one of {', '.join(EVENT_KINDS)}")
        worker = _matching(raw, "worker", WORKER_ID)
        try:
            text = _text(raw, "data", 4 * MAX_JSON) or "{}"
            data = json.loads(text)
            if not isinstance(data, dict):
                raise MessageRefused("data", "not a JSON object")
            prefix = key_prefix or files_prefix(job_id, token)  # a worker's files: under its token
            return cls(job_id, token, kind, worker, *_event_data(kind, data, prefix))
        except MessageRefused as exc:
            raise MessageRefused(exc.field, exc.why, job_id=job_id, token=token) from None
        except ValueError:
            raise MessageRefused("data", "not JSON", job_id=job_id, token=token) from None


def _event_data(kind: str, data: dict, prefix: str) -> tuple:
    """(data, files, result, report) of one event kind (pure)."""
    out: dict[str, Any] = {}
    if kind in ("accepted", "plan", "done"):
        out["plan"] = _json_object(data, "plan", optional=kind == "done")
    if kind == "accepted":
        out["host"] = _text(data, "host", 255, optional=True)
    if kind in ("progress", "checkpoint", "rendering", "stopped", "failed", "done"):
        out["step"] = _int(data, "step", 0, MAX_STEP, optional=kind not in ("checkpoint", "progress"))
    if kind == "progress":
        out["total"] = _int(data, "total", 0, MAX_STEP)
        out["loss"], out["eta_s"] = _number(data, "loss", lenient=True), _number(data, "eta_s", lenient=True)
    if kind in ("stopped", "declined"):
        out["reason"] = _text(data, "reason", MAX_TEXT, optional=True)
    if kind == "failed":
        out["error"] = _text(data, "error", MAX_ERROR, optional=True)
    if kind == "declined":
        out["needs_gb"], out["has_gb"] = _number(data, "needs_gb"), _number(data, "has_gb")
    files: tuple[StateFile, ...] = ()
    if kind == "checkpoint":
        files = _state_files(data, "files", prefix)
        if not files:
            raise MessageRefused("files", "a checkpoint without files")
    result, report = (_result(data, prefix), _report(data, prefix)) if kind == "done" else ((), ())
    return out, files, result, report


def _result(data: dict, prefix: str) -> tuple[tuple[str, FileRef], ...]:
    files = _get(data, "files", dict)
    caps = {"adapter": MAX_ADAPTER_BYTES, "render": MAX_IMAGE_BYTES, "compare": MAX_IMAGE_BYTES,
            "base": MAX_IMAGE_BYTES}  # fmt: skip
    for key in files:
        if key not in RESULT_KEYS + OPTIONAL_RESULT_KEYS:
            raise MessageRefused(f"files.{str(key)[:40]}", "not a result artifact")
    out = []
    for key in RESULT_KEYS + OPTIONAL_RESULT_KEYS:
        if key not in files:
            if key in OPTIONAL_RESULT_KEYS:
                continue
            raise MessageRefused(f"files.{key}", f"the {key} is missing")
        out.append((key, _file_ref(files[key], f"files.{key}", key_prefix=prefix, max_bytes=caps[key])))
    return tuple(out)


def _report(data: dict, prefix: str) -> tuple[ReportFile, ...]:
    items = _get(data, "report", list, optional=True) or []
    if len(items) > MAX_REPORT_FILES:
        raise MessageRefused("report", f"more than {MAX_REPORT_FILES} files")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MessageRefused(f"report[{i}]", "not an object")
        name = report_name(item.get("name"), f"report[{i}].name")
        ref = _file_ref(item.get("ref"), f"report[{i}].ref", key_prefix=prefix, max_bytes=MAX_IMAGE_BYTES)
        out.append(ReportFile(name, ref))
    if len({r.name for r in out}) != len(out):
        raise MessageRefused("report", "a name is listed twice")
    return tuple(out)


@dataclass(frozen=True)
class DeclineRecord:
    """A worker's "I cannot fit this dispatch" (the `lorad:declined:<job>` hash), for `waiting:`."""

    worker: str
    token: str
    reason: str
    needs_gb: float | None
    has_gb: float | None

    @classmethod
    def from_dict(cls, worker: Any, raw: Any) -> "DeclineRecord":
        try:
            data = json.loads(_decode(raw) or "")
        except (TypeError, ValueError):
            raise MessageRefused("declined", "not JSON") from None
        if not isinstance(data, dict):
            raise MessageRefused("declined", "not an object")
        return cls(
            worker=_matching({"worker": _decode(worker)}, "worker", WORKER_ID),
            token=_matching(data, "token", TOKEN),
            reason=_text(data, "reason", MAX_TEXT, optional=True) or "",
            needs_gb=_number(data, "needs_gb"),
            has_gb=_number(data, "has_gb"),
        )


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value
