"""The jobs table: lorad's source of truth (huey only carries job ids).

stdlib sqlite3 in WAL mode, schema version in `PRAGMA user_version` with forward migrations.
Every state change goes through `JobStore.transition`, which rejects illegal moves, updates the
dataset's marker and logs one event. The legal moves are a pure table (`TRANSITIONS`).
"""

from __future__ import annotations

import _thread  # RLock without importing threading: `lorad status` loads this module
import builtins  # JobStore.list shadows list in the class body
import json
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from daemon.intake import markers
from daemon.states import ACTIVE, FINISHED, RUNNABLE, TRANSITIONS, JobState, moves_from  # noqa: F401 (re-exported)

# The event each move logs (docs/EVENTS.md).
EVENT_FOR_MOVE: dict[tuple[str, str], str] = {
    (JobState.QUEUED, JobState.PREPARING): "job.started",
    (JobState.INTERRUPTED, JobState.PREPARING): "job.resumed",
    # a verified result published straight from the queue (states.TRANSITIONS)
    (JobState.QUEUED, JobState.PUBLISHING): "job.started",
    (JobState.INTERRUPTED, JobState.PUBLISHING): "job.resumed",
}
EVENT_FOR_STATE: dict[str, str] = {
    JobState.DONE: "job.done",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
    JobState.INTERRUPTED: "job.interrupted",
    JobState.QUEUED: "job.requeued",
}


class IllegalTransition(Exception):
    """A move the state machine does not allow; `current` is the state the job was in."""

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        current: str | None = None,
        wanted: str | None = None,
    ):
        super().__init__(message)
        self.job_id, self.current, self.wanted = job_id, current, wanted


class StateChanged(IllegalTransition):
    """A compare-and-set lost its race: the job is no longer in the state the caller saw (another
    process moved it first). `current` says where it is now, so a CLI can say what happened."""


class CorruptDatabase(Exception):
    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message  # what SQLite said, for the log line


def is_legal(old: str, new: str) -> bool:
    return new in moves_from(old)


def honour_cancel(old: str, new: str, cancel_requested: bool) -> str:
    """The state a move really goes to (pure): a job whose cancel was requested enters no further
    phase (preparing, training, rendering, publishing) but goes to `cancelled` at the boundary."""
    if cancel_requested and new in ACTIVE and is_legal(old, JobState.CANCELLED):
        return JobState.CANCELLED
    return new


def cancel_action(state: str) -> str:
    """What `lorad cancel` does to a job in this state (pure): `cancel` it now (not running),
    `request` a stop (running: honoured at the next step or phase boundary), `too_late` (it is
    publishing: the LoRA is being put in place), `finished` (nothing to cancel)."""
    if state in RUNNABLE:
        return "cancel"
    if state == JobState.PUBLISHING:
        return "too_late"
    if state in ACTIVE:
        return "request"
    return "finished"


def event_for(old: str, new: str) -> str:
    return EVENT_FOR_MOVE.get((old, new)) or EVENT_FOR_STATE.get(new) or "job.phase"


MIGRATIONS = [
    # 1: the jobs table.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        dataset TEXT NOT NULL,
        dataset_path TEXT NOT NULL,
        name TEXT NOT NULL,
        trigger_word TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        ready_token TEXT,
        settings TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        priority INTEGER NOT NULL DEFAULT 0,
        ready_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        step INTEGER,
        total_steps INTEGER,
        loss REAL,
        eta_s REAL,
        error TEXT,
        outputs TEXT NOT NULL DEFAULT '{}',
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_fingerprint ON jobs(fingerprint);
    CREATE INDEX jobs_dataset ON jobs(dataset_path);
    """,
    # 2: the memory/training plan chosen for the job.
    "ALTER TABLE jobs ADD COLUMN plan TEXT NOT NULL DEFAULT '{}';",
    # 3: scale-out: the worker that runs the job, and why a queued job waits (no worker fits it).
    "ALTER TABLE jobs ADD COLUMN worker TEXT; ALTER TABLE jobs ADD COLUMN waiting TEXT;",
    # 4: a remote engine's request ({"engine", "endpoint", "request_id", ...}) and its latest word
    # on the job ("fal.ai queue, position 3"), from Progress.remote / Progress.note.
    "ALTER TABLE jobs ADD COLUMN remote TEXT NOT NULL DEFAULT '{}'; ALTER TABLE jobs ADD COLUMN note TEXT;",
]
SCHEMA_VERSION = len(MIGRATIONS)


_JSON_COLUMNS = ("settings", "outputs", "plan", "remote")
# Rows retention pruned stay (their fingerprints keep an unchanged re-drop "unchanged"), hidden.
_NOT_PRUNED = "COALESCE(json_extract(settings, '$.pruned'), 0) = 0"


@dataclass(eq=False, repr=False)
class Job:
    """One row of the jobs table: a field per column (MIGRATIONS, in column order), typed; the
    JSON columns (settings, outputs, plan, remote) decoded when the Job is made. A page that reads
    a few columns (the dashboard's queue) gets the defaults for the rest. eq=False: two Jobs are
    the same only if they are the same object (as before; a Job stays hashable)."""

    id: str = ""
    seq: int = 0
    dataset: str = ""
    dataset_path: str = ""
    name: str = ""
    trigger_word: str = ""
    fingerprint: str = ""
    ready_token: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    attempt: int = 1
    priority: int = 0
    ready_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eta_s: float | None = None
    error: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    cancel_requested: int = 0
    plan: dict[str, Any] = field(default_factory=dict)  # migration 2
    worker: str | None = None  # migration 3
    waiting: str | None = None
    remote: dict[str, Any] = field(default_factory=dict)  # migration 4
    note: str | None = None

    def __post_init__(self) -> None:
        """Rows hold the JSON columns as text and the state as a plain string: decode both here,
        once (a JSON column that is not an object is a corrupt row: refused, naming the column)."""
        for key in _JSON_COLUMNS:
            value: object = getattr(self, key)
            if isinstance(value, (str, bytes)) or value is None:
                value = json.loads(value or "{}")
            if not isinstance(value, dict):
                raise ValueError(
                    f"job {self.id}: column {key!r} holds {type(value).__name__}, not a JSON object"
                )
            setattr(self, key, value)
        self.state = JobState(self.state)

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | sqlite3.Row) -> Job:
        """The one way a jobs-table row becomes a Job (an unknown column is a TypeError naming it)."""
        return cls(**dict(row))

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.dataset}, {self.state})"

    def to_dict(self) -> dict[str, Any]:
        """Every column by name, the JSON ones decoded, the state as its plain string."""
        data = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        data["state"] = self.state.value
        return data


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job.from_row(row)


def new_job_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now or time.time()))
    return f"{stamp}-{os.urandom(2).hex()}"


def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _warnings_text(job: Job) -> str:
    """The dataset's validation warnings, for the DONE / FAILED.txt markers (not only the log)."""
    warnings = job.settings.get("warnings") or []
    if not warnings:
        return ""
    return "\nWarnings from intake:\n" + "".join(f"- {w}\n" for w in warnings)


def _metrics_text(metrics: object) -> str:
    """The learning metrics (daemon/metrics.py) for the DONE marker: the figures, then the verdicts."""
    if not isinstance(metrics, dict):
        return ""
    lines = ["", "Learning metrics:"]
    for key in ("steps", "loss_start", "loss_end", "lora_effect"):
        value = metrics.get(key)
        lines.append(f"{key}: {'-' if value is None else value}")
    warnings = metrics.get("warnings") or []
    lines += [f"warning: {w}" for w in warnings] if warnings else ["warnings: none (the run learned)"]
    return "\n".join(lines) + "\n"


def marker_text(job: Job) -> str:
    """What the dataset's marker file says for this job (pure)."""
    head = f"job {job.id} ({job.name})"
    if job.state == JobState.QUEUED:
        text = f"{head}\nqueued at {iso(job.ready_at)}\nlorad status shows the queue\n"
        missing = job.settings.get("weights_missing")
        if missing:  # flagged at intake: the job waits; it fails at start unless they are fetched
            text += f"\nWaiting, but this machine cannot train it yet: {missing}\n"
        return text
    if job.state == JobState.INTERRUPTED:
        where = f" at step {job.step}/{job.total_steps}" if job.step else ""
        return f"{head}\ninterrupted{where}; resumes from its last checkpoint when lorad runs\n"
    if job.state in ACTIVE:
        lines = [head, f"phase: {job.state}"]
        if job.total_steps:
            pct = 100 * (job.step or 0) / job.total_steps
            lines.append(f"step {job.step or 0}/{job.total_steps} ({pct:.0f}%)")
        if job.eta_s is not None:
            lines.append(
                f"ETA {int(job.eta_s // 3600):02d}:{int(job.eta_s % 3600 // 60):02d}:{int(job.eta_s % 60):02d}"
            )
        if job.loss is not None:
            lines.append(f"loss {job.loss:.4f}")
        if job.note:
            lines.append(job.note)
        lines.append(f"updated {iso(job.updated_at)}")
        return "\n".join(lines) + "\n"
    if job.state == JobState.DONE:
        lines = [f"{head} finished at {iso(job.finished_at)}", ""]
        lines += [f"{k}: {v}" for k, v in job.outputs.items() if isinstance(v, str)]
        return "\n".join(lines) + "\n" + _metrics_text(job.outputs.get("metrics")) + _warnings_text(job)
    if job.state == JobState.FAILED:
        refused = job.settings.get("intake") == "refused"  # nothing to retry: fix and drop READY
        kind = markers.failure_kind(job.error or "", refused_at_intake=refused)
        text = markers.failed_text((job.error or "unknown error").splitlines(), job.id, kind)
        return text + ("\n" + _warnings_text(job) if job.settings.get("warnings") else "")
    return f"{head} cancelled at {iso(job.finished_at)}\nCreate READY again to train it.\n"


class JobStore:
    """Connection per instance; safe to use from the daemon's threads with its own lock-free calls
    because sqlite3 serialises writers (busy timeout) and WAL lets readers run alongside."""

    def __init__(
        self, path: Path, *, write_markers: bool = True, check: bool = True, jobs_dir: Path | None = None
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write_markers = write_markers
        # Where the work dirs live: each gets a job.json record (daemon/jobrecord.py) so a lost
        # table can be rebuilt. None (bench, selftest): no records.
        self.jobs_dir = Path(jobs_dir) if jobs_dir is not None else None
        # One connection shared by the daemon's threads: calls are serialised here.
        self._lock = _thread.RLock()
        # Called as f(job, old, new) after every transition is recorded (the daemon's notifier);
        # each must return at once and never raise into the job.
        self.observers: builtins.list = []
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            if check:
                result = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(result)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise CorruptDatabase(corrupt_message(self.path, "jobs database", exc), str(exc)) from None

    def close(self) -> None:
        self.conn.close()

    def _tx(self) -> "_Transaction":
        return _Transaction(self)

    def _all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple = ()) -> Job | None:
        rows = self._all(sql, params)
        return _row_to_job(rows[0]) if rows else None

    def _migrate(self) -> None:
        """Bring the schema up to date, one migration per transaction. The version is read again
        inside each write transaction: the daemon, `lorad status` and the selftest may open a new
        jobs.db at the same moment, and a migration decided on a stale read would run twice
        ("duplicate column name")."""
        seen = self.conn.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(seen)
        for number in range(seen, SCHEMA_VERSION):  # none (no write lock) when the schema is current
            with self._tx() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(version)
                if version > number:
                    continue  # this one is applied (by us, or by another process just now)
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")

    @staticmethod
    def _check_version(version: int) -> None:
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this lorad understands ({SCHEMA_VERSION}); upgrade lorad"
            )

    # -- reads -------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def find(self, prefix: str) -> Job | None:
        """A job by id or unique id prefix (not a pruned one: daemon/retention.py)."""
        rows = self._all(
            f"SELECT * FROM jobs WHERE id LIKE ? AND {_NOT_PRUNED} ORDER BY seq", (prefix + "%",)
        )
        exact = [r for r in rows if r["id"] == prefix]
        if exact:
            return _row_to_job(exact[0])
        return _row_to_job(rows[0]) if len(rows) == 1 else None

    def list(self, states: tuple[str, ...] | None = None, *, include_pruned: bool = False) -> list[Job]:
        """Jobs in seq order; pruned ones (retention: hidden rows that keep their fingerprints)
        only with include_pruned."""
        where = "1" if include_pruned else _NOT_PRUNED
        if states:
            marks = ",".join("?" * len(states))
            rows = self._all(f"SELECT * FROM jobs WHERE state IN ({marks}) AND {where} ORDER BY seq", states)
        else:
            rows = self._all(f"SELECT * FROM jobs WHERE {where} ORDER BY seq")
        return [_row_to_job(r) for r in rows]

    def mark_pruned(self, job_id: str, seen_state: str, settings: dict) -> bool:
        """Record a prune on the row (settings flags) only while the job is still in the finished
        state it was seen in (a retry since then wins); True when recorded."""
        with self._tx() as conn:
            return self._update_if(conn, job_id, seen_state, settings=settings)

    def runnable_in_order(self) -> builtins.list[Job]:
        """Queue order: priority first, then FIFO by READY time."""
        rows = self._all(
            "SELECT * FROM jobs WHERE state IN ('queued','interrupted') ORDER BY priority DESC, ready_at, seq"
        )
        return [_row_to_job(r) for r in rows]

    def by_ready_token(self, dataset_path: str, token: str) -> Job | None:
        return self._one(
            "SELECT * FROM jobs WHERE dataset_path = ? AND ready_token = ?", (dataset_path, token)
        )

    def done_with_fingerprint(self, fingerprint: str) -> Job | None:
        return self._one(
            "SELECT * FROM jobs WHERE fingerprint = ? AND state = 'done' ORDER BY seq DESC LIMIT 1",
            (fingerprint,),
        )

    def unfinished_with_fingerprint(self, fingerprint: str) -> Job | None:
        """The job already queued or running for this fingerprint (the same dataset dropped twice)."""
        return self._one(
            "SELECT * FROM jobs WHERE fingerprint = ? AND fingerprint != ''"
            " AND state NOT IN ('done','failed','cancelled') ORDER BY seq LIMIT 1",
            (fingerprint,),
        )

    def latest_for_dataset(self, dataset_path: str) -> Job | None:
        """The dataset's newest job: the one its marker must describe."""
        return self._one(
            "SELECT * FROM jobs WHERE dataset_path = ? ORDER BY created_at DESC, seq DESC LIMIT 1",
            (dataset_path,),
        )

    def active_for_dataset(self, dataset_path: str) -> builtins.list[Job]:
        rows = self._all(
            "SELECT * FROM jobs WHERE dataset_path = ? AND state NOT IN ('done','failed','cancelled') ORDER BY seq",
            (dataset_path,),
        )
        return [_row_to_job(r) for r in rows]

    # -- writes ------------------------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        dataset_path: Path,
        name: str,
        trigger: str,
        fingerprint: str,
        ready_token: str | None,
        settings: dict,
        priority: int = 0,
        ready_at: float | None = None,
        marker: bool = True,
    ) -> Job:

        now = time.time()
        with self._tx() as conn:
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            conn.execute(
                "INSERT INTO jobs (id, seq, dataset, dataset_path, name, trigger_word, fingerprint, ready_token,"
                " settings, state, priority, ready_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    seq,
                    Path(dataset_path).name,
                    str(dataset_path),
                    name,
                    trigger,
                    fingerprint,
                    ready_token,
                    json.dumps(settings, default=str),
                    JobState.QUEUED,
                    priority,
                    ready_at or now,
                    now,
                    now,
                ),
            )
        job = self.get(job_id)
        assert job is not None
        self._after(job, None, JobState.QUEUED, "job.queued", marker=marker)
        return job

    def transition(
        self, job_id: str, new: str, *, expect: str | tuple[str, ...] | None = None, **fields: object
    ) -> Job:
        """The one way a job changes state: a compare-and-set in one transaction (the job must be
        in `expect` when given, else StateChanged), legal-move check, cancel honoured at phase
        boundaries (the returned job's state says where it went), marker, event."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT state, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            old = row["state"]
            expected = (expect,) if isinstance(expect, str) else expect
            if expected is not None and old not in expected:
                raise StateChanged(
                    f"job {job_id} is {old}, not {' or '.join(expected)}",
                    job_id=job_id,
                    current=old,
                    wanted=new,
                )
            new = honour_cancel(old, new, bool(row["cancel_requested"]))
            if not is_legal(old, new):
                raise IllegalTransition(
                    f"job {job_id}: {old} -> {new} is not allowed", job_id=job_id, current=old, wanted=new
                )
            fields.setdefault("updated_at", now)
            if old == JobState.QUEUED and new in ACTIVE:  # preparing, or publishing a verified result
                fields.setdefault("started_at", now)
            if new in FINISHED:
                fields.setdefault("finished_at", now)
            if new == JobState.QUEUED:
                fields.setdefault("cancel_requested", 0)
                fields.setdefault("finished_at", None)
            if not self._update_if(conn, job_id, old, state=new, **fields):
                raise StateChanged(f"job {job_id} changed meanwhile", job_id=job_id, current=None, wanted=new)
        job = self.get(job_id)
        assert job is not None
        self._after(job, old, new, event_for(old, new))
        return job

    def cancel(self, job_id: str) -> tuple[str, Job]:
        """`lorad cancel`, decided and applied in one transaction against the job's current state
        (never a stale read): returns (cancel_action, job)."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            old = row["state"]
            action = cancel_action(old)
            if action == "cancel":
                self._update_if(conn, job_id, old, state=JobState.CANCELLED, finished_at=now, updated_at=now)
            elif action == "request":
                self._update_if(conn, job_id, old, cancel_requested=1, updated_at=now)
        job = self.get(job_id)
        assert job is not None
        if action == "cancel":
            self._after(job, old, JobState.CANCELLED, event_for(old, JobState.CANCELLED))
        elif action == "request":
            from daemon.logs import get_logger

            get_logger().info("job.cancel_requested", job_id=job.id, dataset=job.dataset, state=old)
        return action, job

    def update(self, job_id: str, **fields: object) -> Job:
        """Non-state fields (progress, outputs, plan)."""
        fields.setdefault("updated_at", time.time())
        with self._tx() as conn:
            self._update(conn, job_id, **fields)
        job = self.get(job_id)
        assert job is not None
        return job

    def move_outputs(self, job_id: str, outputs: dict) -> Job:
        """A done job's LoRA moved to `<name>.v<N>` (a newer one took its name): record where,
        in the row, its job.json and its DONE marker (only while that marker still names it:
        a retrain of the same folder wrote its own)."""
        job = self.update(job_id, outputs=outputs)
        self.write_record(job)
        done = Path(job.dataset_path) / markers.MARKER_FOR_STATE[JobState.DONE]
        if markers.names_job(markers._first_line(done), job.id):
            self.refresh_marker(job)
        from daemon.logs import get_logger

        get_logger().info("job.outputs_moved", job_id=job_id, lora=outputs.get("lora"))
        return job

    def adopt(self, row: dict) -> Job:
        """Insert a row rebuilt from a work dir's record (jobrecord.row_from_record); seq is new."""
        now = time.time()
        columns = {**row, "updated_at": now}
        with self._tx() as conn:
            columns["seq"] = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            names = ", ".join(columns)
            conn.execute(
                f"INSERT INTO jobs ({names}) VALUES ({','.join('?' * len(columns))})", tuple(columns.values())
            )
        job = self.get(row["id"])
        assert job is not None
        return job

    def request_cancel(self, job_id: str) -> None:
        self.update(job_id, cancel_requested=1)

    @staticmethod
    def _update(conn: sqlite3.Connection, job_id: str, **fields: object) -> None:
        if not fields:
            return

        values = [json.dumps(v, default=str) if k in _JSON_COLUMNS else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))

    @staticmethod
    def _update_if(conn: sqlite3.Connection, job_id: str, seen_state: str, /, **fields: object) -> bool:
        """UPDATE ... WHERE state = <the state just read>: the set half of compare-and-set."""

        values = [json.dumps(v, default=str) if k in _JSON_COLUMNS else v for k, v in fields.items()]
        assignments = ", ".join(f"{k} = ?" for k in fields)
        cursor = conn.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state = ?", (*values, job_id, seen_state)
        )
        return cursor.rowcount == 1

    def refresh_marker(self, job: Job) -> None:
        """Markers are the user's view, never part of the state machine: a marker that cannot be
        written (dataset disk full, read-only folder) is logged and the job goes on."""
        if self.write_markers:
            try:
                markers.write_marker(Path(job.dataset_path), job.state, marker_text(job))
            except OSError as exc:
                path = Path(job.dataset_path) / markers.MARKER_FOR_STATE[job.state]
                _log_write_failure("marker.write_failed", job, path, exc)

    def write_record(self, job: Job) -> None:
        """Keep the work dir's job.json in step with the row (best effort, like markers)."""
        if self.jobs_dir is None:
            return
        from daemon import jobrecord

        try:
            jobrecord.write_record(self.jobs_dir / job.id, jobrecord.record_of(job))
        except OSError as exc:
            _log_write_failure("job.record_failed", job, self.jobs_dir / job.id / jobrecord.RECORD_FILE, exc)

    def follow_renamed_folder(self, job: Job) -> Job:
        """A dataset folder renamed while its job ran takes its marker along: find the folder under
        training_data whose marker names this job, move the row there (dataset_path, dataset) and
        refresh the marker in it, so no folder keeps a TRAINING marker forever. A folder that was
        deleted is not recreated (nothing names the job: the row keeps its old path)."""
        old_path = Path(job.dataset_path)
        if not self.write_markers or markers.is_real_dir(old_path):
            return job
        found = markers.folders_marked_with(old_path.parent, job.id)
        if not found:
            return job
        moved = self.update(
            job.id, dataset_path=str(found[0]), dataset=found[0].name, updated_at=job.updated_at
        )
        from daemon.logs import get_logger

        get_logger().info("job.dataset_moved", job_id=job.id, dataset=moved.dataset, previous=str(old_path),
                          dataset_path=moved.dataset_path)  # fmt: skip
        self.refresh_marker(moved)
        return moved

    def _after(self, job: Job, old: str | None, new: str, event: str, *, marker: bool = True) -> None:
        if old is None or new in FINISHED or old in FINISHED:
            self.write_record(job)  # created, finished, or queued again: what a rebuild must know
        if marker:
            self.refresh_marker(job)
            job = self.follow_renamed_folder(job)
        fields: dict[str, object] = {"job_id": job.id, "dataset": job.dataset, "state": new}
        if old:
            fields["previous"] = old
        if new == JobState.FAILED and job.error:
            fields["error"] = job.error
        if new == JobState.DONE:
            fields["outputs"] = {k: v for k, v in job.outputs.items() if k != "metrics"}
            if isinstance(job.outputs.get("metrics"), dict):
                fields["metrics"] = job.outputs["metrics"]  # once, as its own object
        level = "warning" if new in (JobState.FAILED, JobState.INTERRUPTED) else "info"
        from daemon.logs import get_logger  # here, not at import: `lorad status` never loads structlog

        getattr(get_logger(), level)(event, attempt=job.attempt, **fields)
        for observer in self.observers:
            try:
                observer(job, old, new)
            except Exception as exc:  # an observer's bug must not fail the job
                get_logger().error("job.observer_failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the store's lock."""

    def __init__(self, store: "JobStore"):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        conn = self.store.conn
        try:
            if exc_type is None:
                try:
                    conn.execute("COMMIT")
                except BaseException:
                    # COMMIT failed (disk full): leave no transaction open, or every later BEGIN fails.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            elif conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


def _log_write_failure(event: str, job: Job, path: Path, exc: OSError) -> None:
    from daemon.logs import get_logger

    get_logger().warning(
        event,
        job_id=job.id,
        dataset=job.dataset,
        path=str(path),
        errno=exc.errno,
        error=exc.strerror or str(exc),
    )


def corrupt_message(path: Path, what: str, exc: Exception) -> str:
    return (
        f"the {what} at {path} is corrupt or unreadable ({exc}). `lorad run` moves it aside "
        f"({path.name}.corrupt-<time>, kept) and rebuilds it from the job work dirs in {path.parent / 'jobs'}, "
        f"which it never deletes."
    )


def move_aside(path: Path) -> Path:
    """Rename a database that cannot be opened (and its -wal/-shm) to `<name>.corrupt-<UTC time>`:
    kept for inspection, never deleted. Returns the new path of the main file."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = f".corrupt-{stamp}"
    number = 1
    while any(Path(f"{path}{extra}{suffix}").exists() for extra in ("", "-wal", "-shm")):
        number += 1
        suffix = f".corrupt-{stamp}-{number}"
    moved = Path(f"{path}{suffix}")
    if path.exists() or path.is_symlink():
        os.rename(path, moved)
    for extra in ("-wal", "-shm"):
        side = Path(f"{path}{extra}")
        if side.exists():
            os.rename(side, f"{side}{suffix}")
    return moved
