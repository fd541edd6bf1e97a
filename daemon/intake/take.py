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
from daemon.intake.validate import limits, read_options_file, validate_dataset
from daemon.jobs import JobStore, iso, marker_text, new_job_id
from daemon.logs import get_logger
from daemon.settings import Settings, SettingsError

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


@dataclass
class Outcome:
    status: str  # queued | invalid | unchanged | already_queued | duplicate | not_ready | unstable | changed | refused | no_space | failed
    job_id: str | None = None
    detail: str = ""


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
        folder = Path(folder)
        log = self.log.bind(dataset=folder.name)
        ready = folder / contract.READY
        if not self._in_training_data(folder):
            return Outcome("refused", detail="not directly under training_data")
        try:
            folder_st = folder.lstat()
            ready_st = ready.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return Outcome("not_ready")
        token = ready_token(ready_st)
        if stat.S_ISLNK(folder_st.st_mode):
            return self._refuse(
                folder,
                token,
                log,
                f"the dataset folder is a symlink to {os.readlink(folder)}; lorad only trains real folders inside "
                f"{self.settings.training_data} (move the folder there, then create READY again)",
            )
        if stat.S_ISDIR(ready_st.st_mode) or stat.S_ISLNK(ready_st.st_mode):
            kind = "a folder" if stat.S_ISDIR(ready_st.st_mode) else "a symlink"
            return self._refuse(
                folder, token, log, f"READY is {kind}; create READY as a plain empty file (touch READY)"
            )
        if not stat.S_ISREG(ready_st.st_mode):  # a FIFO would block the read forever; never opened
            kind = file_kind(ready_st.st_mode)
            return self._refuse(
                folder,
                token,
                log,
                f"READY is {kind}, not a file: remove it, then create READY as a plain file (touch READY)",
            )
        if not is_stable(folder, self.settings.settle_s):
            return Outcome("unstable")
        # Re-read the token: READY may have been rewritten while we waited; still being written
        # (size or mtime moved during the settle interval): look again later.
        try:
            ready_st = ready.lstat()
        except FileNotFoundError:
            return Outcome("not_ready")
        if ready_token(ready_st) != token:
            return Outcome("unstable")
        existing = self.store.by_ready_token(str(folder), token)
        if existing is not None:
            self._consume_ready(ready, token)
            return Outcome("duplicate", existing.id)
        ready_text, problem = read_options_file(ready, contract.READY)
        if problem is not None:  # oversize (refused, never cut), or swapped for a special file
            log.warning("dataset.invalid", errors=[problem.to_dict()], warnings=0)
            job = self._record_refusal(folder, token, ready_st.st_mtime, [problem.line()], None, None)
            self._consume_ready(ready, token)
            return Outcome("invalid", job.id, detail=problem.line())
        if ready_text is None:
            return Outcome("not_ready")
        report = validate_dataset(folder, ready_text=ready_text, **limits(self.settings))
        if not report.valid:
            reasons = [f.line() for f in report.errors]
            log.warning(
                "dataset.invalid", errors=[f.to_dict() for f in report.errors], warnings=len(report.warnings)
            )
            job = self._record_refusal(
                folder,
                token,
                ready_st.st_mtime,
                reasons,
                report.name,
                report.trigger,
                warnings=[f.line() for f in report.warnings],
            )
            self._consume_ready(ready, token)
            return Outcome("invalid", job.id, detail="\n".join(reasons))
        effective = effective_settings(report.options, self.settings)
        fp = fingerprint(report, effective)
        force = bool(report.options.get("force"))
        pending = self.store.unfinished_with_fingerprint(fp)
        if pending is not None:  # even with force: the same training is already on its way
            return self._already_queued(folder, ready, token, pending, fp, log)
        previous = self.store.done_with_fingerprint(fp)
        if previous is not None and not force:
            lora = find_published_lora(self.settings.loras, previous)
            markers.write_marker(
                folder, "done",
                markers.unchanged_text(previous.id, previous.name, iso(previous.finished_at), lora, self.settings.loras),
            )  # fmt: skip
            self._consume_ready(ready, token)
            log.info("dataset.unchanged", job_id=previous.id, fingerprint=fp)
            return Outcome("unchanged", previous.id)
        job_id = new_job_id()
        jobs_dir = self.settings.jobs_dir
        jobs_dir.mkdir(parents=True, exist_ok=True)
        no_space = self._space_problem(report, jobs_dir, log)
        if no_space is not None:
            job = self._record_refusal(
                folder, token, ready_st.st_mtime, [no_space], report.name, report.trigger
            )
            self._consume_ready(ready, token)
            return Outcome("no_space", job.id, detail=no_space)
        staging = jobs_dir / f".intake-{job_id}"
        try:
            manifest = take_snapshot(
                report,
                staging,
                preview_prompt=choose_preview_prompt(report),
                effective=effective,
                preview_prompts=choose_preview_prompts(report, self.settings.preview_prompts),
                sample_every=report.options.get("sample_every") or self.settings.sample_every,
            )
        except DatasetChanged as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log.info("dataset.changed", detail=str(exc))
            return Outcome("changed", detail=str(exc))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not self._ready_unchanged(ready, token):  # rewritten since we read it: its options may differ
            shutil.rmtree(staging, ignore_errors=True)
            log.info("dataset.changed", detail="READY changed during intake")
            return Outcome("changed", detail="READY changed during intake")
        row: dict[str, Any] = dict(
            job_id=job_id,
            dataset_path=folder,
            name=report.name or folder.name,
            trigger=report.trigger or "",
            fingerprint=fp,
            ready_token=token,
            settings={
                **effective,
                "options": report.options,
                "warnings": [f.line() for f in report.warnings],
                "images": len(manifest["images"]),
            },
            priority=int(report.options.get("priority", 0)),
            ready_at=ready_st.st_mtime,
        )
        missing = self._weights_missing(effective)
        if missing:  # said now, in QUEUED and status; the job still waits so the user can fetch them
            row["settings"]["weights_missing"] = missing
            log.warning(
                "dataset.weights_missing", job_id=job_id, model=effective.get("model"), detail=missing
            )
        # The work dir carries its own record before it exists under its id: a lost jobs table
        # is rebuilt from these (daemon.recover_work_dirs), never mistaken for garbage.
        jobrecord.write_record(staging, jobrecord.new_record(**row, created_at=time.time()))
        os.rename(staging, jobs_dir / job_id)
        try:
            job = self.store.create(**row)
        except BaseException:
            # No row: the work dir must not outlive this failed intake (a rebuild would adopt it).
            shutil.rmtree(jobs_dir / job_id, ignore_errors=True)
            raise
        self._consume_ready(ready, token)
        for warning in report.warnings:
            log.info(
                "dataset.warning",
                job_id=job.id,
                file=warning.file,
                message=warning.message,
                code=warning.code,
            )
        self.enqueue(job.id, job.priority, job.ready_at)
        return Outcome("queued", job.id)

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

    def _already_queued(self, folder: Path, ready: Path, token: str, pending, fp: str, log) -> Outcome:
        """The same dataset (same fingerprint) is queued or running: READY is consumed, nothing is
        queued twice. Its own folder keeps that job's marker; another folder holding the same
        dataset gets a FAILED.txt saying which job trains it (a copied marker would go stale)."""
        if Path(pending.dataset_path) == folder:
            markers.write_marker(folder, pending.state, marker_text(pending))
        else:
            markers.write_marker(folder, "failed", markers.failed_text(
                [f"the same images, name and settings are already queued as job {pending.id} "
                 f"(from {pending.dataset_path}); lorad does not train them twice"], None))  # fmt: skip
        self._consume_ready(ready, token)
        log.info("dataset.already_queued", job_id=pending.id, state=pending.state, fingerprint=fp)
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

    def _record_refusal(
        self, folder: Path, token: str, ready_at: float, reasons: list[str], name, trigger, warnings=()
    ):
        """A dataset refused at intake becomes a failed job, so `lorad status` shows it and why."""
        job = self.store.create(
            job_id=new_job_id(),
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
        return self.store.transition(job.id, "failed", error="\n".join(reasons))

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
            if markers.write_marker(folder, "failed", text) and token:
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
