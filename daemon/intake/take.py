"""Turn a READY file into a queued job: verify, validate, snapshot, record, consume READY.

Crash-safe order: the snapshot is built in a temp dir and renamed into place, the job row
(with the READY file's identity) is committed, and only then is READY removed. A daemon killed
anywhere in between finds READY again on restart and either redoes the intake (no row yet) or
just consumes READY (a row with that identity exists): the same READY never makes two jobs.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import jobrecord
from daemon.fsutil import file_kind
from daemon.intake import contract, markers
from daemon.intake.snapshot import (
    DatasetChanged,
    choose_preview_prompt,
    choose_preview_prompts,
    fingerprint,
    take_snapshot,
)
from daemon.intake.validate import Report, limits, read_options_file, validate_dataset
from daemon.jobs import JobStore, iso, marker_text, new_job_id
from daemon.logs import get_logger
from daemon.settings import Settings, SettingsError
from daemon.states import JobState
from lorad_base.workdir import WorkDir

TRAINING_KEYS = (
    "rank",
    "alpha",
    "epochs",
    "steps",
    "learning_rate",
    "resolution",
    "caption_policy",
    "max_cost_usd",
)
MAX_ID_DRAWS = 64  # a fresh id is found in one or two draws; 64 taken in a row means something is wrong


@dataclass
class Outcome:
    # What became of one intake (not a job state): queued | invalid | unchanged | already_queued |
    # duplicate | not_ready | unstable | changed | refused | no_space | failed
    status: str
    job_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class _Drop:
    """One READY being taken: its folder, READY's identity and mtime when first seen, the log."""

    folder: Path
    ready: Path
    token: str  # ready_token: READY rewritten meanwhile is another drop
    ready_at: float
    log: Any


def effective_settings(options: dict, settings: Settings) -> dict:
    """What decides the trained result: the model, the engine and the training options (pure)."""
    effective = {
        "model": options.get("model", settings.model),
        "engine": options.get("engine", settings.engine),
    }
    for key in TRAINING_KEYS:
        if key in options:
            effective[key] = options[key]
    effective.setdefault("caption_policy", "prepend")
    # Only when not the default, so datasets trained before this key existed keep their fingerprint.
    missing = options.get("missing_captions", settings.missing_captions)
    if missing != "refuse":
        effective["missing_captions"] = missing
    if missing == "vlm":  # the captioner decides the captions trained: its settings are in the fingerprint
        from daemon.captions import CAPTION_PROMPT, MAX_NEW_TOKENS

        effective["caption_model"] = options.get("caption_model", settings.caption_model)
        effective["caption_prompt"] = CAPTION_PROMPT
        effective["caption_max_tokens"] = MAX_NEW_TOKENS
    return effective


def ready_token(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def folder_signature(folder: Path) -> tuple | None:
    """Names and sizes of the folder's entries: equal across two looks = not being copied into.
    (Not mtimes: a `touch READY` after writing it must not look like a copy in progress.)"""
    try:
        entries = []
        for entry in os.scandir(folder):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append((entry.name, st.st_size))
        return tuple(sorted(entries))
    except OSError:
        return None


def ready_refusal(
    folder_mode: int, ready_mode: int, folder_link: str | None, training_data: Path
) -> str | None:
    """Why a READY can never be taken, from the modes of the dataset folder and of READY (pure):
    a symlinked dataset (`folder_link`: its target), READY a folder or a symlink, or READY a
    special file (a FIFO would block the read forever; it is never opened). None: take it."""
    if stat.S_ISLNK(folder_mode):
        return (
            f"the dataset folder is a symlink to {folder_link}; lorad only trains real folders inside "
            f"{training_data} (move the folder there, then create READY again)"
        )
    if stat.S_ISDIR(ready_mode) or stat.S_ISLNK(ready_mode):
        kind = "a folder" if stat.S_ISDIR(ready_mode) else "a symlink"
        return f"READY is {kind}; create READY as a plain empty file (touch READY)"
    if not stat.S_ISREG(ready_mode):
        return f"READY is {file_kind(ready_mode)}, not a file: remove it, then create READY as a plain file (touch READY)"
    return None


def is_stable(folder: Path, settle_s: float) -> bool:
    first = folder_signature(folder)
    time.sleep(settle_s)
    return first is not None and first == folder_signature(folder)


def find_published_lora(loras: Path, job) -> Path | None:
    """Where the job's LoRA is now: the file in loras/ whose header says `lorad.job_id` = this job.
    Looked for at the recorded path, then among `<name>.v<N>.safetensors` (a later LoRA of the
    same name moved it there), then in any .safetensors of the folder."""
    from daemon.publish import metadata_of

    recorded = job.outputs.get("lora") if isinstance(job.outputs, dict) else None
    candidates = [Path(recorded)] if recorded else []
    try:
        others = sorted(p for p in Path(loras).iterdir() if p.name.endswith(".safetensors"))
    except OSError:
        others = []
    versions = [p for p in others if p.name.startswith(f"{job.name}.v")]
    candidates += versions + [p for p in others if p not in versions]
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() and metadata_of(path).get("lorad.job_id") == job.id:
                return path
        except (OSError, ValueError):
            continue
    return None


def crash_reason(exc: BaseException, state_dir: Path, folder: Path | None = None) -> str:
    """What FAILED.txt says about an exception inside intake: what happened and what to do."""
    import errno

    if isinstance(exc, UnicodeError) and folder is not None and not contract.is_utf8(str(folder)):
        return (
            f"the dataset path {contract.printable_name(str(folder))} is not valid UTF-8 (undecodable bytes shown "
            "as \\xNN), so lorad cannot record it: rename the folder with plain UTF-8 characters, then create READY again"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or state_dir
        free = ""
        try:
            free = f" ({shutil.disk_usage(state_dir).free:,} bytes free now)"
        except OSError:
            pass
        return (
            f"intake stopped: no space left on the disk holding {where}{free} while copying the dataset. "
            "Free some space, then create READY in this folder again"
        )
    if isinstance(exc, MemoryError):
        return (
            "intake ran out of memory reading this dataset; remove very large files, then create READY again"
        )
    if isinstance(exc, UnicodeError):
        return (
            f"intake failed on text that is not UTF-8 ({type(exc).__name__}: {contract.printable_name(str(exc))}); "
            "rename files/folders with plain UTF-8 names, then create READY again"
        )
    return (
        f"intake failed: {type(exc).__name__}: {contract.printable_name(str(exc))}. "
        "Create READY again to retry; if it fails again, `lorad logs` has the details (event intake.crashed)"
    )


class Intake:
    def __init__(self, settings: Settings, store: JobStore, enqueue):
        self.settings = settings
        self.store = store
        self.enqueue = enqueue
        self.log = get_logger()

    def _in_training_data(self, folder: Path) -> bool:
        root = self.settings.training_data
        return folder.parent == root or (folder.parent.resolve() == root.resolve())

    def take(self, folder: Path) -> Outcome:
        """One intake. Any exception inside it becomes a failed job the user sees (FAILED.txt, a
        status row, the exception named) and READY is consumed, so it is not retried forever."""
        try:
            return self._take(folder)
        except Exception as exc:
            return self._record_crash(Path(folder), exc)

    def _take(self, folder: Path) -> Outcome:
        """The pipeline: READY may be taken → the folder is stable and READY unchanged (its
        identity) → validate → refuse, or already known → snapshot → record → enqueue. Each step
        returns the Outcome that ends the intake, or what the next step needs."""
        drop = self._drop(Path(folder))
        if isinstance(drop, Outcome):
            return drop
        ready_text = self._settled(drop)
        if isinstance(ready_text, Outcome):
            return ready_text
        report = validate_dataset(drop.folder, ready_text=ready_text, **limits(self.settings))
        if not report.valid:
            return self._invalid(drop, report)
        effective = effective_settings(report.options, self.settings)
        fp = fingerprint(report, effective)
        known = self._known(drop, report, fp)
        if known is not None:
            return known
        return self._snapshot_and_queue(drop, report, effective, fp)

    def _drop(self, folder: Path) -> Outcome | _Drop:
        """The READY file to take and its identity, or why there is none to take: not directly
        under training_data, no READY (yet), or a READY that can never be taken (refused)."""
        if not self._in_training_data(folder):
            return Outcome("refused", detail="not directly under training_data")
        ready = folder / contract.READY
        try:
            folder_st = folder.lstat()
            ready_st = ready.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return Outcome("not_ready")
        drop = _Drop(
            folder, ready, ready_token(ready_st), ready_st.st_mtime, self.log.bind(dataset=folder.name)
        )
        link = os.readlink(folder) if stat.S_ISLNK(folder_st.st_mode) else None
        reason = ready_refusal(folder_st.st_mode, ready_st.st_mode, link, self.settings.training_data)
        if reason is not None:
            return self._refuse(folder, drop.token, drop.log, reason)
        return drop

    def _settled(self, drop: _Drop) -> Outcome | bytes:
        """READY's text once the folder stopped changing (not being copied into) and READY is the
        one first seen; a READY already taken is only consumed; an unreadable one is refused."""
        if not is_stable(drop.folder, self.settings.settle_s):
            return Outcome("unstable")
        # READY may have been rewritten while we waited (size or mtime moved): look again later.
        try:
            if ready_token(drop.ready.lstat()) != drop.token:
                return Outcome("unstable")
        except FileNotFoundError:
            return Outcome("not_ready")
        existing = self.store.by_ready_token(str(drop.folder), drop.token)
        if existing is not None:
            self._consume_ready(drop.ready, drop.token)
            return Outcome("duplicate", existing.id)
        ready_text, problem = read_options_file(drop.ready, contract.READY)
        if problem is not None:  # oversize (refused, never cut), or swapped for a special file
            drop.log.warning("dataset.invalid", errors=[problem.to_dict()], warnings=0)
            job = self._record_refusal(drop.folder, drop.token, drop.ready_at, [problem.line()], None, None)
            self._consume_ready(drop.ready, drop.token)
            return Outcome("invalid", job.id, detail=problem.line())
        if ready_text is None:
            return Outcome("not_ready")
        return ready_text

    def _invalid(self, drop: _Drop, report: Report) -> Outcome:
        """A dataset that failed validation: a failed job naming every error, READY consumed."""
        reasons = [f.line() for f in report.errors]
        drop.log.warning(
            "dataset.invalid", errors=[f.to_dict() for f in report.errors], warnings=len(report.warnings)
        )
        job = self._record_refusal(
            drop.folder,
            drop.token,
            drop.ready_at,
            reasons,
            report.name,
            report.trigger,
            warnings=[f.line() for f in report.warnings],
        )
        self._consume_ready(drop.ready, drop.token)
        return Outcome("invalid", job.id, detail="\n".join(reasons))

    def _known(self, drop: _Drop, report: Report, fp: str) -> Outcome | None:
        """The same training (same fingerprint) already queued or running (even with force), or
        already done (unless force): READY consumed, nothing queued twice. None: a new one."""
        pending = self.store.unfinished_with_fingerprint(fp)
        if pending is not None:
            return self._already_queued(drop, pending, fp)
        previous = self.store.done_with_fingerprint(fp)
        if previous is None or report.options.get("force"):
            return None
        lora = find_published_lora(self.settings.loras, previous)
        markers.write_marker(
            drop.folder, JobState.DONE,
            markers.unchanged_text(previous.id, previous.name, iso(previous.finished_at), lora, self.settings.loras),
        )  # fmt: skip
        self._consume_ready(drop.ready, drop.token)
        drop.log.info("dataset.unchanged", job_id=previous.id, fingerprint=fp)
        return Outcome("unchanged", previous.id)

    def _snapshot_and_queue(self, drop: _Drop, report: Report, effective: dict, fp: str) -> Outcome:
        """Refuse when the snapshot cannot fit; else snapshot into a staging dir, record the job
        (work dir renamed into place, then its row), consume READY and enqueue it."""
        jobs_dir = self.settings.jobs_dir
        jobs_dir.mkdir(parents=True, exist_ok=True)
        job_id = self._fresh_job_id()
        no_space = self._space_problem(report, jobs_dir, drop.log)
        if no_space is not None:
            job = self._record_refusal(
                drop.folder, drop.token, drop.ready_at, [no_space], report.name, report.trigger
            )
            self._consume_ready(drop.ready, drop.token)
            return Outcome("no_space", job.id, detail=no_space)
        staging = WorkDir(jobs_dir / f".intake-{job_id}")
        manifest = self._snapshot(drop, report, effective, staging)
        if isinstance(manifest, Outcome):
            return manifest
        row = self._job_row(job_id, drop, report, effective, fp, len(manifest["images"]))
        job = self._commit(staging, WorkDir.of(jobs_dir, job_id), row)
        self._consume_ready(drop.ready, drop.token)
        for warning in report.warnings:
            drop.log.info(
                "dataset.warning",
                job_id=job.id,
                file=warning.file,
                message=warning.message,
                code=warning.code,
            )
        self.enqueue(job.id, job.priority, job.ready_at)
        return Outcome("queued", job.id)

    def _snapshot(self, drop: _Drop, report: Report, effective: dict, staging: WorkDir) -> Outcome | dict:
        """The snapshot's manifest, or `changed` (a file, or READY itself, changed meanwhile:
        the staging dir removed, the intake redone on the next look)."""
        try:
            manifest = take_snapshot(
                report,
                staging.root,
                preview_prompt=choose_preview_prompt(report),
                effective=effective,
                preview_prompts=choose_preview_prompts(report, self.settings.preview_prompts),
                sample_every=report.options.get("sample_every") or self.settings.sample_every,
            )
        except DatasetChanged as exc:
            shutil.rmtree(staging.root, ignore_errors=True)
            drop.log.info("dataset.changed", detail=str(exc))
            return Outcome("changed", detail=str(exc))
        except BaseException:
            shutil.rmtree(staging.root, ignore_errors=True)
            raise
        if not self._ready_unchanged(drop.ready, drop.token):  # rewritten since read: options may differ
            shutil.rmtree(staging.root, ignore_errors=True)
            drop.log.info("dataset.changed", detail="READY changed during intake")
            return Outcome("changed", detail="READY changed during intake")
        return manifest

    def _job_row(
        self, job_id: str, drop: _Drop, report: Report, effective: dict, fp: str, images: int
    ) -> dict[str, Any]:
        """The job's row (and record): identity, fingerprint, the settings it trains with, and the
        engine's words when the model's weights are not here yet (the job still waits for them)."""
        row: dict[str, Any] = dict(
            job_id=job_id,
            dataset_path=drop.folder,
            name=report.name or drop.folder.name,
            trigger=report.trigger or "",
            fingerprint=fp,
            ready_token=drop.token,
            settings={
                **effective,
                "options": report.options,
                "warnings": [f.line() for f in report.warnings],
                "images": images,
            },
            priority=int(report.options.get("priority", 0)),
            ready_at=drop.ready_at,
        )
        missing = self._weights_missing(effective)
        if missing:  # said now, in QUEUED and status; the job still waits so the user can fetch them
            row["settings"]["weights_missing"] = missing
            drop.log.warning(
                "dataset.weights_missing", job_id=job_id, model=effective.get("model"), detail=missing
            )
        return row

    def _commit(self, staging: WorkDir, workdir: WorkDir, row: dict[str, Any]):
        """The work dir carries its own record before it exists under its id (a lost jobs table
        is rebuilt from these, daemon.recover_work_dirs, never mistaken for garbage); then the
        row. No row: the work dir must not outlive this failed intake (a rebuild would adopt it)."""
        jobrecord.write_record(staging.root, jobrecord.new_record(**row, created_at=time.time()))
        os.rename(staging.root, workdir.root)
        try:
            return self.store.create(**row)
        except BaseException:
            shutil.rmtree(workdir.root, ignore_errors=True)
            raise

    def _weights_missing(self, effective: dict) -> str | None:
        """The engine's words when the job's model cannot train on this machine yet (its weights,
        or a piece of them, are missing); None otherwise, or when workers train (scale-out: this
        machine's cache says nothing about theirs)."""
        if self.settings.scale_out:
            return None
        from daemon.engine_host import make_engine
        from engines.base import CheckStatus

        try:
            check = make_engine(self.settings, str(effective.get("engine"))).model_check(
                str(effective.get("model"))
            )
        except SettingsError:
            return None  # an unknown engine fails the job with its own message when it runs
        return None if check.status is CheckStatus.OK else check.detail

    def _already_queued(self, drop: _Drop, pending, fp: str) -> Outcome:
        """The same dataset (same fingerprint) is queued or running: READY is consumed, nothing is
        queued twice. Its own folder keeps that job's marker; another folder holding the same
        dataset gets a FAILED.txt saying which job trains it (a copied marker would go stale)."""
        if Path(pending.dataset_path) == drop.folder:
            markers.write_marker(drop.folder, pending.state, marker_text(pending))
        else:
            markers.write_marker(drop.folder, JobState.FAILED, markers.failed_text(
                [f"the same images, name and settings are already queued as job {pending.id} "
                 f"(from {pending.dataset_path}); lorad does not train them twice"], None))  # fmt: skip
        self._consume_ready(drop.ready, drop.token)
        drop.log.info("dataset.already_queued", job_id=pending.id, state=pending.state, fingerprint=fp)
        return Outcome(
            "already_queued", pending.id, detail=f"already queued as job {pending.id} ({pending.state})"
        )

    @staticmethod
    def _space_problem(report, jobs_dir: Path, log) -> str | None:
        """Refuse before copying when the snapshot cannot fit on the state disk (numbers included)."""
        from daemon import space

        needed = space.space_needed(
            "intake", dataset_bytes=space.snapshot_bytes(report.images, report.captions)
        )
        free = space.free_bytes(jobs_dir)
        problem = space.space_problem("the dataset's snapshot", jobs_dir, needed, free, "create READY again")
        if problem is not None:
            log.warning(
                "space.refused", phase="intake", path=str(jobs_dir), needed_bytes=needed, free_bytes=free
            )
        return problem

    def _refuse(self, folder: Path, token: str, log, reason: str) -> Outcome:
        """READY that cannot be taken (a folder, a symlink, a symlinked dataset): recorded once as a
        failed job (rescans see the same READY again) and left in place; it is the user's."""
        existing = self.store.by_ready_token(str(folder), token)
        if existing is not None:
            return Outcome("refused", existing.id, detail=reason)
        log.warning("dataset.invalid", errors=[{"file": "READY", "message": reason}])
        job = self._record_refusal(folder, token, time.time(), [reason], None, None)
        return Outcome("refused", job.id, detail=reason)

    def _fresh_job_id(self) -> str:
        """An id no job row, work dir or snapshot being built has. An id is its second plus 16 random
        bits, so intakes in the same second can draw the same one (50 datasets made READY at once
        did: the second snapshot could not be renamed onto the first job's work dir)."""
        jobs_dir = self.settings.jobs_dir
        for _ in range(MAX_ID_DRAWS):
            job_id = new_job_id()
            if self.store.get(job_id) is None and not any(
                (jobs_dir / name).exists() for name in (job_id, f".intake-{job_id}")
            ):
                return job_id
        raise RuntimeError(f"no unused job id in {MAX_ID_DRAWS} draws under {jobs_dir}")

    def _record_refusal(
        self, folder: Path, token: str, ready_at: float, reasons: list[str], name, trigger, warnings=()
    ):
        """A dataset refused at intake becomes a failed job, so `lorad status` shows it and why."""
        job = self.store.create(
            job_id=self._fresh_job_id(),
            dataset_path=folder,
            name=name or folder.name,
            trigger=trigger or "",
            fingerprint="",
            ready_token=token,
            settings={
                "intake": "refused",
                "model": self.settings.model,
                "engine": self.settings.engine,
                "warnings": list(warnings),
            },
            ready_at=ready_at,
            marker=False,
        )
        return self.store.transition(job.id, JobState.FAILED, error="\n".join(reasons))

    def _record_crash(self, folder: Path, exc: Exception) -> Outcome:
        """An unexpected exception: a failed job with the exception named, FAILED.txt, READY consumed.
        When even the row cannot be written (a full state disk, a name SQLite cannot store),
        FAILED.txt is written directly so the user still sees why."""
        reason = crash_reason(exc, self.settings.jobs_dir, folder)
        name = contract.printable_name(folder.name)
        self.log.error("intake.crashed", dataset=name, error=reason, exc_info=exc)
        ready = folder / contract.READY
        try:
            token = ready_token(ready.lstat())
        except OSError:
            token = ""
        try:
            existing = self.store.by_ready_token(str(folder), token) if token else None
            if existing is not None:  # the job was recorded before the crash; leave it be
                return Outcome("failed", existing.id, detail=reason)
            job = self._record_refusal(folder, token, time.time(), [reason], None, None)
        except Exception as second:
            self.log.error("intake.unrecorded", dataset=name, error=f"{type(second).__name__}: {second}")
            text = markers.failed_text(
                [reason, f"lorad could not record the job either ({type(second).__name__}: {second})"], None
            )
            if markers.write_marker(folder, JobState.FAILED, text) and token:
                self._consume_ready(ready, token)
            return Outcome("failed", detail=reason)
        if token:
            self._consume_ready(ready, token)
        return Outcome("failed", job.id, detail=reason)

    @staticmethod
    def _ready_unchanged(ready: Path, token: str) -> bool:
        try:
            return ready_token(ready.lstat()) == token
        except OSError:
            return False

    @staticmethod
    def _consume_ready(ready: Path, token: str) -> None:
        """Remove READY only if it is still the one we took (a fresh drop stays to be taken)."""
        try:
            if ready_token(ready.lstat()) == token:
                ready.unlink()
        except FileNotFoundError:
            pass
