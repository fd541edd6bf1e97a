"""FalEngine: train on fal.ai behind the engine contract (daemon side: no ML imports).

Training is one request to a fal trainer endpoint (`pricing.ENDPOINTS`, overridable):
zip the snapshot (images + captions), upload it, submit, and write the request id to
`<workdir>/fal/request.json` atomically **before** waiting. Whoever calls `train` again on this
workdir (a restart, a retry) re-attaches to that request instead of paying for a second
training. A shutdown stops waiting but leaves the request running (re-attached next start); a
cancel cancels it remotely. The result's LoRA is downloaded (streamed, size-checked), converted
from fal's diffusers/PEFT layout to lorad's (`convert.py`), and checked to load in mflux with
every key matched (`loadcheck.py`, a child process). The test render is made locally by the mflux
engine (the same child as a local job).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from engines.base import (
    Check,
    CheckStatus,
    EngineContext,
    EngineSettingsError,
    Failure,
    IntakeLimits,
    JobInput,
    Machine,
    Option,
    PlanError,
    Progress,
    RenderFailed,
    RenderOutcome,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
    coerce_options,
    write_cancel_outcome,
)
from engines.cloud.schema import Schema, SchemaError, build_arguments, check_arguments, resolve
from engines.cloud.submission import Ledger, Next, Records, kill_point
from engines.fal import pricing
from engines.fal.endpoints import SCHEMAS
from lorad_base.childenv import HF_TOKENS, child_env
from lorad_base.fsutil import atomic_write_text, temp_beside
from lorad_base.logs import get_logger

ROOT = Path(__file__).resolve().parents[2]
FAL_DIR = "fal"
REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
LEDGER = "submitted.jsonl"  # <state>/fal/: one line per paid submission (cloud_daily_jobs)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
T = TypeVar("T")


class _Stopped(Exception):
    pass


class _Uncertain(Exception):
    """The submission's outcome is unknown: fail visibly, never send it again by itself."""


def request_arguments(schema: Schema, archive_url: str, config: dict) -> dict:
    """The JSON a trainer endpoint takes (pure): its own field names, from its schema's roles."""
    return build_arguments(
        schema,
        archive_url,
        {
            "steps": int(config["steps"]),
            "trigger": config.get("trigger"),
            "learning_rate": float(config["learning_rate"]) if config.get("learning_rate") else None,
        },
    )


_STEP_PATTERNS = (
    re.compile(r"(?i)\bstep\D{0,3}(\d+)\s*(?:/|of)\s*(\d+)"),
    re.compile(r"(\d+)\s*/\s*(\d+)\s*\["),  # tqdm: " 120/1000 [00:10<...]"
)


_LOSS_PATTERN = re.compile(r"(?i)\bloss\b\s*[=:]?\s*([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)")


def loss_from_logs(logs: list[dict]) -> float | None:
    """The newest training loss the logs mention ("loss: 0.42", "loss=4.2e-1"), for the learning
    metrics (pure); None when none does."""
    for entry in reversed(logs):
        message = str(entry.get("message", "")) if isinstance(entry, dict) else str(entry)
        found = _LOSS_PATTERN.findall(message)
        if found:
            return float(found[-1])
    return None


def step_from_logs(logs: list[dict], total: int) -> int | None:
    """The newest training step the logs mention (pure); None when none does."""
    for entry in reversed(logs):
        message = str(entry.get("message", "")) if isinstance(entry, dict) else str(entry)
        for pattern in _STEP_PATTERNS:
            found = pattern.findall(message)
            if found:
                step, of = (int(x) for x in found[-1])
                if of > 0:
                    return min(total, round(step * total / of)) if of != total else min(step, total)
    return None


def _is_caption(path: Path) -> bool:
    """A caption is `<image stem>.txt` beside its image; nothing else travels (preview*.txt, notes)."""
    return path.suffix == ".txt" and any(
        path.with_suffix(s).is_file() or path.with_suffix(s.upper()).is_file() for s in IMAGE_SUFFIXES
    )


def zip_snapshot(data_dir: Path, dest: Path) -> int:
    """Images and their captions from the snapshot, flat, into a zip (atomically); file count."""
    files = sorted(
        p
        for p in Path(data_dir).iterdir()
        if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or _is_caption(p))
    )
    fd, tmp = temp_beside(dest)
    import os

    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
            for path in files:
                archive.write(path, arcname=path.name)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(files)


class FalEngine:
    name: ClassVar[str] = "fal"
    models: ClassVar[tuple[str, ...]] = tuple(pricing.ENDPOINTS)
    options: ClassVar[tuple[Option, ...]] = (
        Option("endpoints", str, "-", "model=owner/app pairs, comma-separated, over the built-in table"),
        Option(
            "max_cost_usd",
            float,
            5.0,
            "refuse a job whose estimate is above this (a job's lora.toml may set its own)",
            0,
        ),
        Option("price_per_step_usd", float, 0.0, "override the price table (0: use it)", 0),
        Option("poll_s", float, 5.0, "seconds between status polls", 0.01),
        Option("retry_base_s", float, 2.0, "first backoff after a failed call (doubles up to 60 s)", 0.01),
        Option(
            "unreachable_timeout_s",
            float,
            6 * 3600.0,
            "fail the job when fal.ai stays unreachable this long",
            1,
        ),
        Option("timeout_s", float, 120.0, "HTTP timeout of the submit and the upload", 1),
        Option(
            "schemas",
            str,
            "-",
            "a JSON file describing trainer endpoints lorad does not know (fields, ranges, price)",
        ),
        Option(
            "cancel_wait_s",
            float,
            60.0,
            "after a cancel, how long to wait for fal's outcome (stopped, finished anyway, pending)",
            0,
        ),
        Option(
            "upload_expires_s",
            int,
            3 * 86400,
            "seconds fal keeps the uploaded photos (they must outlive the queue and the training)",
            3600,
        ),
        Option(
            "result_timeout_s",
            float,
            300.0,
            "fail a COMPLETED request whose result keeps answering 5xx after this long",
            1,
        ),
    )

    def __init__(self, context: EngineContext):
        values = coerce_options(self.name, self.options, context.options)
        self.context = context
        self.state_dir = Path(context.state_dir)
        try:
            self.endpoints = (
                {} if values["endpoints"] == "-" else pricing.parse_endpoints(str(values["endpoints"]))
            )
        except ValueError as exc:
            raise EngineSettingsError(f"setting 'endpoints' in [engines.fal]: {exc}") from None
        self.max_cost_usd = float(values["max_cost_usd"])  # type: ignore[arg-type]
        self.price_override = float(values["price_per_step_usd"])  # type: ignore[arg-type]
        self.poll_s = float(values["poll_s"])  # type: ignore[arg-type]
        self.retry_base_s = float(values["retry_base_s"])  # type: ignore[arg-type]
        self.unreachable_timeout_s = float(values["unreachable_timeout_s"])  # type: ignore[arg-type]
        self.timeout_s = float(values["timeout_s"])  # type: ignore[arg-type]
        self.result_timeout_s = float(values["result_timeout_s"])  # type: ignore[arg-type]
        self.cancel_wait_s = float(values["cancel_wait_s"])  # type: ignore[arg-type]
        self.upload_expires_s = int(values["upload_expires_s"])  # type: ignore[call-overload]
        self.schemas = {**SCHEMAS, **self._user_schemas(str(values["schemas"]))}
        self.prices = {
            e: pricing.Price(s.usd_per_step, s.min_steps, self._default_steps(s))
            for e, s in self.schemas.items()
            if s.usd_per_step is not None
        }
        self.daily_jobs = int(context.cloud_daily_jobs)
        self.log = get_logger()

    @staticmethod
    def _user_schemas(path: str) -> dict[str, Schema]:
        from engines.cloud.schema import schemas_from_json

        if path == "-":
            return {}
        try:
            return schemas_from_json(Path(path).expanduser().read_text(encoding="utf-8"), path)
        except (OSError, SchemaError) as exc:
            raise EngineSettingsError(f"setting 'schemas' in [engines.fal]: {exc}") from None

    @staticmethod
    def _default_steps(schema: Schema) -> int:
        name = schema.role("steps")
        default = schema.fields[name].default if name else None
        return int(default) if isinstance(default, int) else 1000

    # -- plan --------------------------------------------------------------------------------

    def plan(self, job: JobInput, machine: Machine) -> TrainingPlan:
        try:
            schema = resolve(job.model, pricing.ENDPOINTS, self.endpoints, self.schemas, "fal").schema
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        endpoint = schema.endpoint
        steps = int(
            job.options.get("steps")
            or job.options.get("epochs", 0) * job.image_count
            or self._default_steps(schema)
        )
        config = {"steps": steps, "trigger": job.trigger, "learning_rate": job.options.get("learning_rate")}
        try:  # before any upload: what fal would refuse (after the upload, and maybe billed)
            arguments = request_arguments(schema, "<the uploaded dataset zip>", config)
            check_arguments(schema, arguments)
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        cost, price = pricing.estimate_usd(endpoint, steps, self.price_override, self.prices)
        max_cost = float(job.options.get("max_cost_usd", self.max_cost_usd))
        problem = pricing.cost_problem(cost, max_cost, steps, price, endpoint)
        if problem:
            raise PlanError(problem)
        warnings = (
            []
            if endpoint in self.prices or self.price_override
            else [
                f"no published price for {endpoint} in lorad's table; estimated at ${price.usd_per_step}/step"
            ]
        )
        minimum = (
            f"; fal bills at least {price.min_steps} steps (${price.min_steps * price.usd_per_step:.3f})"
            if price.min_steps
            else ""
        )
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            backend="fal.ai",
            tier="cloud",
            reason=f"trains on fal.ai ({endpoint}), about ${cost:.2f}",
            total_steps=steps,
            summary=[
                f"backend      fal.ai ({endpoint})",
                f"endpoint     {endpoint}",
                f"arguments    {json.dumps(arguments, sort_keys=True)}",
                f"cost         about ${cost:.2f} (${price.usd_per_step:g}/step{minimum}; guard ${max_cost:.2f})",
            ],
            warnings=warnings,
            config={
                "endpoint": endpoint,
                "steps": steps,
                "cost_usd": cost,
                "max_cost_usd": max_cost,
                "trigger": job.trigger,
                "learning_rate": job.options.get("learning_rate"),
                "rank": int(job.options.get("rank", 16)),
                "job_id": job.job_id,
                "name": job.name,
                "image_count": job.image_count,
                "max_side": job.max_side,
                "options": dict(job.options),
                "data": str(job.data_dir),
                "workdir": str(job.data_dir.parent),
                "preview_prompt": job.preview_prompt,
            },
        )

    def step_down(
        self, plan: TrainingPlan, job: JobInput, machine: Machine, failed: TrainResult
    ) -> TrainingPlan | None:
        return None  # the service sizes its own machines

    # -- train -------------------------------------------------------------------------------

    def _service(self):
        from engines.fal.service import HOW_TO_SET_KEY, BadKey, FalService, find_key

        try:
            key = find_key()
        except BadKey as exc:
            raise PlanError(str(exc)) from None
        if not key:
            raise PlanError(f"no fal.ai API key: {HOW_TO_SET_KEY}")
        return FalService(key, self.timeout_s)

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        stop: StopToken,
        note: Callable[[str], None],
        bound_s: float | None = None,
    ) -> T:
        """fn(), retried with backoff while fal.ai is unreachable (bounded by unreachable_timeout_s);
        `Rejected` goes up at once; a stop request ends the wait (_Stopped)."""
        from engines.fal.service import Unreachable

        delay, since = self.retry_base_s, None
        while True:
            if stop.requested():
                raise _Stopped()
            try:
                result = fn()
                if since is not None:
                    self.log.info("fal.reachable", call=what, after_s=round(time.monotonic() - since, 1))
                return result
            except Unreachable as exc:
                now = time.monotonic()
                since = since if since is not None else now
                waited = now - since
                limit = self.unreachable_timeout_s if bound_s is None else bound_s
                if waited >= limit:
                    raise Unreachable(
                        f"fal.ai unreachable for {waited:.0f} s ({what}: {exc}); gave up after {limit:g} s"
                    ) from None
                self.log.warning(
                    "fal.retry", call=what, error=str(exc), retry_in_s=delay, waited_s=round(waited, 1)
                )
                note(f"waiting: fal.ai unreachable ({what}: {exc}); retrying in {delay:g} s")
                if stop.wait(delay):
                    raise _Stopped() from None
                delay = min(60.0, delay * 2)

    def train(
        self,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        from engines.fal.service import Rejected, Unreachable

        workdir = Path(workdir)
        fal_dir = workdir / FAL_DIR
        fal_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(workdir / "plan.json", json.dumps(plan.to_dict(), indent=2))
        config, total = plan.config, plan.total_steps
        endpoint = str(config["endpoint"])
        last: dict[str, Any] = {"step": 0, "loss": None}

        def note(text: str, remote: dict | None = None) -> None:
            progress(Progress(last["step"], total, last["loss"], note=text, remote=remote))

        try:
            service = self._service()
        except PlanError as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        records = Records(fal_dir)
        remote = {"engine": self.name, "endpoint": endpoint}
        try:
            request_id = self._attach_or_submit(service, plan, records, stop, note)
            if request_id is None:
                return TrainResult(
                    TrainStatus.FAILED, error=self._refusal or "not sent", failure=Failure.OTHER
                )
            remote["request_id"] = request_id
            error = self._wait(service, endpoint, request_id, total, stop, note, remote, last)
            if error is not None:
                records.close_request("failed")  # a retry submits anew (it failed on fal)
                self.log.warning("fal.remote_failed", request_id=request_id, error=error)
                return TrainResult(
                    TrainStatus.FAILED,
                    error=f"fal.ai ({endpoint}, request {request_id}) failed: {error}; "
                    f"lorad retry sends a new request (paid again)",
                    failure=Failure.OTHER,
                )
            note("downloading the LoRA", remote)
            adapter = self._fetch_result(service, endpoint, request_id, plan, workdir, stop, note)
        except _Stopped:
            return self._stopped(stop, fal_dir, last["step"], plan)
        except _Uncertain as exc:
            note(str(exc), {**remote, "error_kind": Failure.SUBMISSION_UNCERTAIN.value})
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.SUBMISSION_UNCERTAIN)
        except Rejected as exc:
            return TrainResult(TrainStatus.FAILED, error=f"fal.ai ({endpoint}): {exc}", failure=Failure.OTHER)
        except Unreachable as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        progress(Progress(total, total, note="LoRA downloaded and checked", remote=remote))
        return TrainResult(
            TrainStatus.COMPLETED, adapter=adapter, step=total, artifacts={"request_id": request_id}
        )

    _refusal: str | None = None

    def _attach_or_submit(
        self, service, plan: TrainingPlan, records: Records, stop: StopToken, note
    ) -> str | None:
        """The request of this workdir: the one on record (re-attach), else a new submission
        (engines/cloud/submission.py: intent before the POST, record after; never twice)."""
        step = records.next_step()
        if step is Next.REATTACH:
            saved = records.read_record()
            self.log.info("fal.reattach", request_id=saved["request_id"], endpoint=saved["endpoint"])
            return str(saved["request_id"])  # its first status poll reports it (with the step fal is at)
        if step is Next.UNCERTAIN:
            self.log.warning("fal.submission_uncertain", endpoint=records.read_intent().get("endpoint"))
            raise _Uncertain(
                records.mark_uncertain(
                    "the attempt that sent it ended before fal's answer was recorded",
                    plan.config.get("job_id"),
                )
            )
        if step is Next.RESUBMIT:
            records.start_resubmit()
            self.log.info("fal.resubmit", job_id=plan.config.get("job_id"))
        problem = pricing.daily_problem(self._ledger().last_day(), self.daily_jobs)
        if problem:
            self._refusal = problem
            return None
        endpoint = str(plan.config["endpoint"])
        schema = self.schemas.get(endpoint)
        if schema is None:
            from engines.fal.service import Rejected

            raise Rejected(f"no schema for {endpoint} (plan it again)")
        archive = records.folder / "dataset.zip"
        count = zip_snapshot(Path(plan.config["data"]), archive)
        note(f"uploading the dataset ({count} files)")
        url = self._call("upload", lambda: service.upload(archive, self.upload_expires_s), stop, note)
        self.log.info("fal.uploaded", files=count, bytes=archive.stat().st_size)
        arguments = request_arguments(schema, url, plan.config)
        check_arguments(schema, arguments)
        if stop.requested():
            raise _Stopped()
        return self._submit_once(service, plan, records, endpoint, arguments, stop, note)

    def _submit_once(
        self, service, plan, records: Records, endpoint: str, arguments: dict, stop, note
    ) -> str:
        """The paid POST, at most once: intent and ledger line first, the record after."""
        from engines.fal.service import Rejected, SubmissionUncertain, Unreachable

        kill_point("before_intent")
        records.write_intent(endpoint, arguments, plan.config.get("job_id"))
        self._ledger().append(
            endpoint=endpoint, job_id=plan.config.get("job_id"), cost_usd=plan.config.get("cost_usd")
        )
        kill_point("after_intent")
        try:
            request_id = self._call("submit", lambda: service.submit(endpoint, arguments), stop, note)
        except SubmissionUncertain as exc:
            self.log.warning("fal.submission_uncertain", endpoint=endpoint, reason=str(exc))
            raise _Uncertain(records.mark_uncertain(str(exc), plan.config.get("job_id"))) from None
        except (Unreachable, Rejected, _Stopped):
            records.archive(records.intent, "not_sent")  # fal answered no, or nothing left: not queued
            raise
        records.write_record(
            {
                "request_id": request_id,
                "endpoint": endpoint,
                "submitted_at": time.time(),
                "job_id": plan.config.get("job_id"),
                "cost_usd": plan.config.get("cost_usd"),
            }
        )
        kill_point("after_record")
        self.log.info(
            "fal.submitted",
            request_id=request_id,
            endpoint=endpoint,
            steps=plan.total_steps,
            cost_usd=plan.config.get("cost_usd"),
        )
        note("submitted to fal.ai", {"engine": self.name, "endpoint": endpoint, "request_id": request_id})
        return request_id

    def _wait(
        self,
        service,
        endpoint: str,
        request_id: str,
        total: int,
        stop: StopToken,
        note,
        remote: dict,
        last: dict,
    ) -> str | None:
        """Poll until COMPLETED; fal's error text when the request failed, None when it succeeded."""
        seen_state = None
        while True:
            status = self._call("status", lambda: service.status(endpoint, request_id), stop, note)
            if status.state != seen_state:
                self.log.info(
                    "fal.status", request_id=request_id, state=status.state, position=status.position
                )
                seen_state = status.state
            if status.state == "COMPLETED":
                return status.error
            if status.state == "IN_QUEUE":
                note(f"fal.ai queue, position {status.position}", {**remote, "state": "IN_QUEUE"})
            else:
                step = step_from_logs(status.logs, total)
                if step is not None:
                    last["step"] = step
                    last["loss"] = loss_from_logs(
                        status.logs
                    )  # the learning metrics' series, where fal logs it
                note(
                    f"training on fal.ai{f' (step {step}/{total})' if step is not None else ''}",
                    {**remote, "state": "IN_PROGRESS"},
                )
            if stop.wait(self.poll_s):
                raise _Stopped()

    def _stopped(self, stop: StopToken, fal_dir: Path, step: int, plan: TrainingPlan) -> TrainResult:
        """Shutdown: the request keeps running (re-attached at the next start). Cancel: cancel it
        on fal and learn, within cancel_wait_s, what fal did (cancel_outcome)."""
        record = fal_dir / REQUEST_FILE
        if stop.reason == "cancel" and record.is_file():
            saved = json.loads(record.read_text(encoding="utf-8"))
            try:
                service = self._service()
                service.cancel(saved["endpoint"], saved["request_id"])
                self.log.info("fal.cancelled", request_id=saved["request_id"])
                outcome = self._cancel_outcome(service, saved, plan, Records(fal_dir))
            except Exception as exc:  # told, not fatal: the job is cancelled either way
                self.log.warning("fal.cancel_failed", request_id=saved["request_id"], error=str(exc))
                outcome = "still_pending"
            write_cancel_outcome(fal_dir.parent, outcome, saved["request_id"])
        elif record.is_file():
            self.log.info(
                "fal.detached", request_id=json.loads(record.read_text(encoding="utf-8"))["request_id"]
            )
        return TrainResult(TrainStatus.STOPPED, step=step or None)

    def cancel_remote(self, workdir: Path) -> str | None:
        """A cancel given while lorad was down, carried out now (daemon start): cancel the request
        on record on fal and learn the outcome; None when there is no request to cancel."""
        fal_dir = Path(workdir) / FAL_DIR
        records = Records(fal_dir)
        if not records.record.is_file():
            return None
        saved = records.read_record()
        plan = TrainingPlan.from_dict(json.loads((Path(workdir) / "plan.json").read_text(encoding="utf-8")))
        service = self._service()
        service.cancel(saved["endpoint"], saved["request_id"])
        self.log.info("fal.cancelled", request_id=saved["request_id"], while_down=True)
        outcome = self._cancel_outcome(service, saved, plan, records)
        write_cancel_outcome(Path(workdir), outcome, saved["request_id"])
        return outcome

    def _cancel_outcome(self, service, saved: dict, plan: TrainingPlan, records: Records) -> str:
        """fal only *signals* an in-progress runner: poll up to cancel_wait_s for what happened.
        stopped: the record goes aside (a retry submits anew). finished_anyway: it was paid for;
        its LoRA is downloaded into the job's folder and the record kept, so `lorad retry`
        re-attaches and publishes it without paying. still_pending: kept; a retry re-attaches."""
        deadline = time.monotonic() + self.cancel_wait_s
        endpoint, request_id = saved["endpoint"], saved["request_id"]
        outcome = "still_pending"
        while True:
            try:
                status = service.status(endpoint, request_id)
            except Exception:
                status = None
            if status is not None and status.state == "COMPLETED":
                outcome = "stopped" if status.error else "finished_anyway"
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        if outcome == "stopped":
            records.close_request("cancelled")
        elif outcome == "finished_anyway":
            try:
                self._fetch_result(
                    service, endpoint, request_id, plan, records.workdir, StopToken(), lambda *a: None
                )
            except Exception as exc:
                self.log.warning("fal.cancel_download_failed", request_id=request_id, error=str(exc))
        self.log.info("fal.cancel_outcome", request_id=request_id, outcome=outcome)
        return outcome

    def _fetch_result(
        self, service, endpoint: str, request_id: str, plan: TrainingPlan, workdir: Path, stop, note
    ) -> Path:
        import shutil

        from engines.fal.convert import BadLoRA, convert, layout_of, read_header
        from engines.fal.service import Rejected, Unreachable

        try:  # COMPLETED: an answer that keeps failing is the request's own failure, not an outage
            result = self._call(
                "result", lambda: service.result(endpoint, request_id), stop, note, self.result_timeout_s
            )
        except Unreachable as exc:
            raise Rejected(
                f"request {request_id} COMPLETED but its result could not be fetched: {exc}"
            ) from None
        atomic_write_text(workdir / FAL_DIR / RESULT_FILE, json.dumps(result, indent=2, default=str))
        lora = result.get("diffusers_lora_file") if isinstance(result, dict) else None
        if not isinstance(lora, dict) or not lora.get("url"):
            raise Rejected(
                f"the result has no diffusers_lora_file (keys: {sorted(result) if isinstance(result, dict) else result!r})"
            )
        download = workdir / FAL_DIR / "download.safetensors"
        size = lora.get("file_size")
        nbytes, sha = self._call(
            "download",
            lambda: service.download(str(lora["url"]), download, int(size) if size else None),
            stop,
            note,
        )
        self.log.info("fal.downloaded", bytes=nbytes, sha256=sha)
        adapter = workdir / "adapter.safetensors"
        kept = f"(fal's file is kept: {download})"
        try:
            layout = layout_of(list(read_header(download)[0]))
            if layout == "passthrough":  # a layout mflux loads as is: unchanged, after its check
                shutil.copyfile(download, adapter)
                converted = None
            else:
                converted = convert(
                    download, adapter, "transformer." if "flux" in plan.model else "diffusion_model."
                )
        except BadLoRA as exc:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA fal returned is not usable: {exc} {kept}") from None
        problem = self._load_check(adapter, plan.model)
        if problem:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA fal returned does not load in mflux: {problem} {kept}")
        if converted is None:
            atomic_write_text(
                workdir / FAL_DIR / "adapter.json", json.dumps({"sha256_download": sha, "layout": layout})
            )
            self.log.info("fal.passthrough", layout=layout, sha256=sha)
            return adapter
        atomic_write_text(
            workdir / FAL_DIR / "adapter.json",
            json.dumps(
                {
                    "sha256_download": sha,
                    "rank": converted.rank,
                    "alpha": converted.alpha,
                    "modules": converted.modules,
                }
            ),
        )
        self.log.info("fal.converted", modules=converted.modules, rank=converted.rank, alpha=converted.alpha)
        return adapter

    def _load_check(self, adapter: Path, model: str) -> str | None:
        """None when mflux matches every key (and, for the miniature model, applies them all)."""
        import os

        args = [sys.executable, "-m", "engines.fal.loadcheck", "--lora", str(adapter), "--model", model]
        if model == "tiny-z-image":
            args += ["--tiny-dir", str(self.state_dir / "models" / "tiny-z-image")]
        env = child_env(os.environ, keep=HF_TOKENS)  # no FAL_KEY: it only loads the file in mflux
        try:
            done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return "the mflux load check took over 600 s"
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1])
        except (IndexError, ValueError):
            return f"the mflux load check ended with code {done.returncode}: {done.stderr.strip()[-300:]}"
        if "error" in answer:
            return answer["error"]
        if answer["matched"] != answer["total"]:
            return f"{answer['total'] - answer['matched']} of {answer['total']} keys match no layer (e.g. {answer['unmatched'][:3]})"
        return None

    def _ledger(self) -> Ledger:
        return Ledger(self.state_dir / FAL_DIR / LEDGER)

    # -- render and publish ------------------------------------------------------------------

    def _local(self):
        from engines.mflux.engine import MFluxEngine

        return MFluxEngine(
            EngineContext(self.state_dir, self.context.stop_timeout_s, self.context.keep_awake)
        )

    def render(
        self,
        plan: TrainingPlan,
        workdir: Path,
        lora: Path,
        prompt: str,
        out_dir: Path,
        stop: StopToken,
        seed: int = 42,
    ) -> RenderOutcome:
        """The test render, made here by the mflux engine when the model is on this machine."""
        local = self._local()
        check = local.model_check(plan.model)
        if check.status is not CheckStatus.OK and plan.model != "tiny-z-image":
            return RenderFailed(
                f"the LoRA trained on fal.ai is ready in {lora}, but the local test render needs the model "
                f"here: {check.detail}"
            )
        from engines.base import machine_now  # a render plan for this machine, as a local job gets

        c = plan.config
        job = JobInput(
            str(c["job_id"]),
            str(c["name"]),
            str(c["trigger"]),
            plan.model,
            int(c["image_count"]),
            int(c["max_side"]),
            dict(c.get("options") or {}),
            Path(c["data"]),
            prompt,
        )
        try:
            local_plan = local.render_plan(job, machine_now())
        except PlanError as exc:
            return RenderFailed(
                f"the LoRA trained on fal.ai is ready in {lora}, but this machine cannot render it: {exc}"
            )
        render_dir = Path(workdir) / FAL_DIR / "local"
        render_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(render_dir / "plan.json", json.dumps(local_plan.to_dict(), indent=2))
        return local.render(local_plan, render_dir, lora, prompt, out_dir, stop, seed)

    def report_files(self, workdir: Path) -> list[Path]:
        result = Path(workdir) / FAL_DIR / RESULT_FILE
        return [result] if result.is_file() else []

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        fal_dir = Path(plan.config.get("workdir", ".")) / FAL_DIR
        keys = {"lorad.engine": self.name, "lorad.fal_endpoint": str(plan.config.get("endpoint", ""))}
        try:
            keys["lorad.fal_request_id"] = str(json.loads((fal_dir / REQUEST_FILE).read_text())["request_id"])
        except (OSError, ValueError, KeyError):
            pass
        try:
            adapter = json.loads((fal_dir / "adapter.json").read_text())
            keys["ss_network_dim"], keys["ss_network_alpha"] = str(adapter["rank"]), f"{adapter['alpha']:g}"
        except (OSError, ValueError, KeyError):
            keys["ss_network_dim"] = str(plan.config.get("rank", ""))
        return keys

    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(max_caption_tokens=None)

    def doctor_checks(self, model: str, machine: Machine) -> list[Check]:
        checks = [self.model_check(model)]
        try:
            import fal_client

            checks.append(Check("fal-client", CheckStatus.OK, f"fal-client {fal_client.__version__}"))
        except Exception as exc:
            checks.append(Check("fal-client", CheckStatus.FAIL, f"cannot import fal_client: {exc}"))
        return checks

    def model_check(self, model: str) -> Check:
        from engines.fal.service import HOW_TO_SET_KEY, BadKey, find_key

        try:
            endpoint = resolve(model, pricing.ENDPOINTS, self.endpoints, self.schemas, "fal").endpoint
        except SchemaError as exc:
            return Check("model", CheckStatus.FAIL, str(exc))
        try:
            key = find_key()
        except BadKey as exc:
            return Check("model", CheckStatus.FAIL, str(exc))
        if not key:
            return Check(
                "model",
                CheckStatus.FAIL,
                f"{model} trains on fal.ai ({endpoint}) but there is no API key: {HOW_TO_SET_KEY}",
            )
        return Check("model", CheckStatus.OK, f"{model} trains on fal.ai ({endpoint}); FAL_KEY is set")

    def saved_step(self, workdir: Path) -> int | None:
        """0 once a request is on fal: its record is the state a later run (a restart, another
        worker) re-attaches to; the step itself lives on fal's side and its status reports it."""
        return 0 if (Path(workdir) / FAL_DIR / REQUEST_FILE).is_file() else None

    def saved_state(self, workdir: Path) -> list[Path]:
        """The request record: sent to the coordinator like a checkpoint, so a job whose worker
        dies re-attaches to the paid request on the next worker instead of submitting again."""
        record = Path(workdir) / FAL_DIR / REQUEST_FILE
        return [record] if record.is_file() else []

    def disk_needed(self, plan: TrainingPlan, workdir: Path) -> int:
        data = Path(plan.config.get("data", Path(workdir) / "data"))
        snapshot = sum(p.stat().st_size for p in data.iterdir() if p.is_file()) if data.is_dir() else 0
        return snapshot + 3 * 512 * 1024 * 1024  # the zip, the download and the converted LoRA
