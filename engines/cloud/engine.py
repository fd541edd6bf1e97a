"""CloudEngine: what every cloud engine shares behind the engine contract (daemon side, no ML).

A cloud training is one paid remote job: zip the snapshot, upload it, submit, and write the job's
id to `<workdir>/<cloud>/request.json` before any wait (engines/cloud/submission.py), so a
restart or a retry re-attaches instead of paying twice; poll it to its end; download its LoRA,
convert it to lorad's layout (convert.py) and check it loads in mflux (loadcheck.py, a child).
A shutdown leaves the job running; a cancel cancels it remotely and learns what the cloud did.
A cloud engine has no renderer: the daemon makes the test render here with the mflux engine
(engines/mflux/render.py, chosen by daemon/engine_host.py `renderer_for`).

A cloud engine (engines/fal, engines/replicate) subclasses this with its table (models,
options, schemas), its client adapter (`_service`) and the members that really differ:
`_target`, `_prepare`, `_upload`, `_send`, `_await`, `_remote_failure`, `_cancel`,
`_cancel_verdict`, `_fetch_result`, `_metadata_head`, `plan`, `model_check`, `doctor_checks`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from engines.base import (
    Engine,
    EngineContext,
    EngineSettingsError,
    Failure,
    JobInput,
    Option,
    Options,
    PlanError,
    Progress,
    SavedState,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
    write_cancel_outcome,
)
from engines.cloud import money
from engines.cloud.convert import Converted
from engines.cloud.dataset import request_arguments, zip_snapshot
from engines.cloud.errors import Rejected, SubmissionUncertain, Unreachable
from engines.cloud.schema import Schema, SchemaError, check_arguments
from engines.cloud.submission import FAL_DASHBOARD, Ledger, Next, Records, kill_point
from lorad_base.childenv import HF_TOKENS, child_env
from lorad_base.fsutil import atomic_write_text
from lorad_base.logs import get_logger
from lorad_base.workdir import WorkDir

ROOT = Path(__file__).resolve().parents[2]
REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
LEDGER = "submitted.jsonl"  # <state>/<cloud>/: one line per paid submission ([engines.<cloud>] daily_jobs)
# The daily cap every paid cloud has in its section (the deprecated top-level `cloud_daily_jobs`
# fills it in: daemon/settings.py DEPRECATED_ALIASES).
DAILY_JOBS = Option(
    "daily_jobs", int, 10, "at most this many jobs sent to this cloud in any 24 hours (0: no limit)", 0
)
Note = Callable[..., None]
T = TypeVar("T")


class Stopped(Exception):
    """A stop request ended a wait: the caller decides between detach and cancel."""


class Uncertain(Exception):
    """The submission's outcome is unknown: fail visibly, never send it again by itself."""


class CloudEngine(Engine):
    """The shared half of a cloud engine; the per-cloud half is its table and client adapter."""

    label: ClassVar[str]  # the cloud in messages: "fal.ai", "Replicate"
    short: ClassVar[str]  # the cloud as owner: "fal's file", "Replicate's answer"
    dashboard: ClassVar[str] = FAL_DASHBOARD
    id_field: ClassVar[str] = "request_id"  # the log field naming the remote job
    target_field: ClassVar[str] = "endpoint"  # the log field naming where it was sent
    id_metadata_key: ClassVar[str]  # the safetensors metadata key of the remote job's id
    downloads_of_512mb: ClassVar[int] = 3  # disk_needed: files beside the snapshot
    schemas: dict[str, Schema]  # endpoint -> its schema (built in tables, then the user's file)
    prices: dict[str, money.Price]
    price_override: float
    _refusal: str | None = None

    def __init__(self, context: EngineContext):
        super().__init__(context)
        self.log = get_logger()
        self._read_common(self.values)

    def _read_common(self, values: Options) -> None:
        """The settings every cloud has (poll, backoff, bounds, daily cap), from its options."""
        self.daily_jobs = values.integer("daily_jobs")
        self.max_cost_usd = values.number("max_cost_usd")
        self.poll_s = values.number("poll_s")
        self.retry_base_s = values.number("retry_base_s")
        self.unreachable_timeout_s = values.number("unreachable_timeout_s")
        self.timeout_s = values.number("timeout_s")
        self.cancel_wait_s = values.number("cancel_wait_s")

    def _user_schemas(self, path: str) -> dict[str, Schema]:
        from engines.cloud.schema import schemas_from_json

        if path == "-":
            return {}
        try:
            return schemas_from_json(Path(path).expanduser().read_text(encoding="utf-8"), path)
        except (OSError, SchemaError) as exc:
            raise EngineSettingsError(f"setting 'schemas' in [engines.{self.name}]: {exc}") from None

    @staticmethod
    def _default_steps(schema: Schema) -> int:
        name = schema.role("steps")
        default = schema.fields[name].default if name else None
        return int(default) if isinstance(default, int) else 1000

    # -- per-cloud hooks ---------------------------------------------------------------------

    def _service(self) -> Any:
        """The cloud's client adapter; PlanError when it has no usable key."""
        raise NotImplementedError

    def _target(self, plan: TrainingPlan) -> str:
        """Where the plan's job is sent (an endpoint, a trainer)."""
        return str(plan.config["endpoint"])

    def _prepare(self, service: Any, plan: TrainingPlan, stop: StopToken, note: Note) -> dict:
        """Remote look-ups before the upload (e.g. the trainer's version); kept in the record."""
        return {}

    def _upload(self, service: Any, archive: Path, stop: StopToken, note: Note) -> str:
        raise NotImplementedError

    def _send(
        self, service: Any, plan: TrainingPlan, arguments: dict, prepared: dict, stop: StopToken, note: Note
    ) -> str:
        """The paid call itself (through `_call`); the remote job's id."""
        raise NotImplementedError

    def _await(
        self, service: Any, saved: dict, total: int, stop: StopToken, note: Note, remote: dict, last: dict
    ) -> Any:
        """Poll until the remote job ends; its last status."""
        raise NotImplementedError

    def _remote_failure(self, done: Any, saved: dict, records: Records) -> str | None:
        """The job's error text when it ended without a LoRA (after logging it), else None."""
        raise NotImplementedError

    def _cancel(self, service: Any, saved: dict) -> None:
        raise NotImplementedError

    def _cancel_verdict(self, service: Any, saved: dict) -> tuple[str | None, Any]:
        """After a cancel: "stopped", "finished_anyway" or None (still running), and the status."""
        raise NotImplementedError

    def _fetch_result(
        self, service: Any, saved: dict, done: Any, plan: TrainingPlan, workdir: Path, stop, note
    ) -> Path:
        """Download, convert and check the finished job's LoRA; the adapter's path."""
        raise NotImplementedError

    def _metadata_head(self, plan: TrainingPlan) -> dict[str, str]:
        raise NotImplementedError

    # -- plan --------------------------------------------------------------------------------

    def _plan_numbers(self, job: JobInput, schema: Schema) -> tuple[int, dict, float, money.Price, float]:
        """Steps, arguments (checked against the schema before any upload), cost, price and guard."""
        endpoint = schema.endpoint
        steps = int(
            job.options.get("steps")
            or job.options.get("epochs", 0) * job.image_count
            or self._default_steps(schema)
        )
        config = {"steps": steps, "trigger": job.trigger, "learning_rate": job.options.get("learning_rate")}
        try:  # before any upload: what the cloud would refuse (after the upload, and maybe billed)
            arguments = request_arguments(schema, "<the uploaded dataset zip>", config)
            check_arguments(schema, arguments)
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        cost, price = money.estimate_usd(endpoint, steps, self.price_override, self.prices)
        max_cost = float(job.options.get("max_cost_usd", self.max_cost_usd))
        problem = money.cost_problem(cost, max_cost, steps, price, endpoint, self.name)
        if problem:
            raise PlanError(problem)
        return steps, arguments, cost, price, max_cost

    @staticmethod
    def _plan_config(head: dict, job: JobInput, steps: int, cost: float, max_cost: float) -> dict:
        """The plan's config: the cloud's own keys first, then what train and render read."""
        return {
            **head,
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
        }

    # -- train -------------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        stop: StopToken,
        note: Note,
        bound_s: float | None = None,
    ) -> T:
        """fn(), retried with backoff while the cloud is unreachable (bounded by
        unreachable_timeout_s); `Rejected` goes up at once; a stop request ends the wait (Stopped)."""
        delay, since = self.retry_base_s, None
        while True:
            if stop.requested():
                raise Stopped()
            try:
                result = fn()
                if since is not None:
                    self.log.info(
                        f"{self.name}.reachable", call=what, after_s=round(time.monotonic() - since, 1)
                    )
                return result
            except Unreachable as exc:
                now = time.monotonic()
                since = since if since is not None else now
                waited = now - since
                limit = self.unreachable_timeout_s if bound_s is None else bound_s
                if waited >= limit:
                    raise Unreachable(
                        f"{self.label} unreachable for {waited:.0f} s ({what}: {exc}); gave up after {limit:g} s"
                    ) from None
                self.log.warning(
                    f"{self.name}.retry",
                    call=what,
                    error=str(exc),
                    retry_in_s=delay,
                    waited_s=round(waited, 1),
                )
                note(f"waiting: {self.label} unreachable ({what}: {exc}); retrying in {delay:g} s")
                if stop.wait(delay):
                    raise Stopped() from None
                delay = min(60.0, delay * 2)

    def train(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        progress: Callable[[Progress], None],
        stop: StopToken,
        on_spawn: Callable[[int], None] | None = None,
    ) -> TrainResult:
        """Send the job (or re-attach to the one on record), follow it, fetch its LoRA (the cloud
        sizes its own machines: no step-down)."""
        workdir = Path(workdir)
        folder = workdir / self.name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(WorkDir(workdir).plan, json.dumps(plan.to_dict(), indent=2))
        total, target = plan.total_steps, self._target(plan)
        last: dict[str, Any] = {"step": 0, "loss": None}

        def note(text: str, remote: dict | None = None) -> None:
            progress(Progress(last["step"], total, last["loss"], note=text, remote=remote))

        try:
            service = self._service()
        except PlanError as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        records = Records(folder)
        remote = {"engine": self.name, "endpoint": target}
        try:
            remote_id = self._attach_or_submit(service, plan, records, stop, note)
            if remote_id is None:
                return TrainResult(
                    TrainStatus.FAILED, error=self._refusal or "not sent", failure=Failure.OTHER
                )
            remote["request_id"] = remote_id
            saved = {"request_id": remote_id, "endpoint": str(plan.config["endpoint"]), "target": target}
            done = self._await(service, saved, total, stop, note, remote, last)
            error = self._remote_failure(done, saved, records)
            if error is not None:
                return TrainResult(TrainStatus.FAILED, error=error, failure=Failure.OTHER)
            note("downloading the LoRA", remote)
            adapter = self._fetch_result(service, saved, done, plan, workdir, stop, note)
        except Stopped:
            return self._stopped(stop, folder, last["step"], plan)
        except Uncertain as exc:
            note(str(exc), {**remote, "error_kind": Failure.SUBMISSION_UNCERTAIN.value})
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.SUBMISSION_UNCERTAIN)
        except Rejected as exc:
            return TrainResult(
                TrainStatus.FAILED, error=f"{self.label} ({target}): {exc}", failure=Failure.OTHER
            )
        except Unreachable as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        progress(Progress(total, total, note="LoRA downloaded and checked", remote=remote))
        return TrainResult(
            TrainStatus.COMPLETED, adapter=adapter, step=total, artifacts={"request_id": remote_id}
        )

    def _uncertain(self, records: Records, reason: str, plan: TrainingPlan) -> str:
        return records.mark_uncertain(
            reason, plan.config.get("job_id"), cloud=self.short, dashboard=self.dashboard
        )

    def _attach_or_submit(
        self, service, plan: TrainingPlan, records: Records, stop: StopToken, note: Note
    ) -> str | None:
        """The remote job of this workdir: the one on record (re-attach), else a new submission
        (engines/cloud/submission.py: intent before the paid call, record after; never twice)."""
        step = records.next_step()
        if step is Next.REATTACH:
            saved = records.read_record()
            self.log.info(
                f"{self.name}.reattach",
                **{self.id_field: saved["request_id"], self.target_field: saved["endpoint"]},
            )
            return str(saved["request_id"])  # its first status poll reports it (with the step)
        if step is Next.UNCERTAIN:
            self.log.warning(
                f"{self.name}.submission_uncertain",
                **{self.target_field: records.read_intent().get("endpoint")},
            )
            reason = f"the attempt that sent it ended before {self.short}'s answer was recorded"
            raise Uncertain(self._uncertain(records, reason, plan))
        if step is Next.RESUBMIT:
            records.start_resubmit()
            self.log.info(f"{self.name}.resubmit", job_id=plan.config.get("job_id"))
        problem = money.daily_problem(self._ledger().last_day(), self.daily_jobs)
        if problem:
            self._refusal = problem
            return None
        prepared = self._prepare(service, plan, stop, note)
        schema = self.schemas.get(str(plan.config["endpoint"]))
        if schema is None:
            raise Rejected(f"no schema for {plan.config['endpoint']} (plan it again)")
        archive = records.folder / "dataset.zip"
        count = zip_snapshot(Path(plan.config["data"]), archive)
        note(f"uploading the dataset ({count} files)")
        url = self._upload(service, archive, stop, note)
        self.log.info(f"{self.name}.uploaded", files=count, bytes=archive.stat().st_size)
        arguments = request_arguments(schema, url, plan.config)
        check_arguments(schema, arguments)
        if stop.requested():
            raise Stopped()
        return self._submit_once(service, plan, records, arguments, prepared, stop, note)

    def _submit_once(
        self, service, plan, records: Records, arguments: dict, prepared: dict, stop, note
    ) -> str:
        """The paid call, at most once: intent and ledger line first, the record after."""
        target = self._target(plan)
        kill_point("before_intent")
        records.write_intent(target, arguments, plan.config.get("job_id"))
        self._ledger().append(
            endpoint=target, job_id=plan.config.get("job_id"), cost_usd=plan.config.get("cost_usd")
        )
        kill_point("after_intent")
        try:
            remote_id = self._send(service, plan, arguments, prepared, stop, note)
        except SubmissionUncertain as exc:
            self.log.warning(
                f"{self.name}.submission_uncertain", **{self.target_field: target}, reason=str(exc)
            )
            raise Uncertain(self._uncertain(records, str(exc), plan)) from None
        except (Unreachable, Rejected, Stopped):
            records.archive(records.intent, "not_sent")  # the cloud answered no, or nothing left
            raise
        records.write_record(
            {
                "request_id": remote_id,
                "endpoint": target,
                **prepared,
                "submitted_at": time.time(),
                "job_id": plan.config.get("job_id"),
                "cost_usd": plan.config.get("cost_usd"),
            }
        )
        kill_point("after_record")
        self.log.info(
            f"{self.name}.submitted",
            **{self.id_field: remote_id, self.target_field: target},
            steps=plan.total_steps,
            cost_usd=plan.config.get("cost_usd"),
        )
        note(f"submitted to {self.label}", {"engine": self.name, "endpoint": target, "request_id": remote_id})
        return remote_id

    def _ledger(self) -> Ledger:
        return Ledger(self.state_dir / self.name / LEDGER)

    # -- stop and cancel ---------------------------------------------------------------------

    def _stopped(self, stop: StopToken, folder: Path, step: int, plan: TrainingPlan) -> TrainResult:
        """Shutdown: the remote job keeps running (re-attached at the next start). Cancel: cancel
        it on the cloud and learn, within cancel_wait_s, what the cloud did (_cancel_and_learn)."""
        records = Records(folder)
        if stop.reason == "cancel" and records.record.is_file():
            saved = records.read_record()
            try:
                outcome = self._cancel_and_learn(self._service(), saved, plan, records)
            except Exception as exc:  # told, not fatal: the job is cancelled either way
                self.log.warning(
                    f"{self.name}.cancel_failed", **{self.id_field: saved["request_id"]}, error=str(exc)
                )
                outcome = "still_pending"
            write_cancel_outcome(folder.parent, outcome, saved["request_id"])
        elif records.record.is_file():
            self.log.info(f"{self.name}.detached", **{self.id_field: records.read_record()["request_id"]})
        return TrainResult(TrainStatus.STOPPED, step=step or None)

    def cancel_remote(self, workdir: Path) -> str | None:
        """A cancel given while lorad was down, carried out now (daemon start): cancel the job on
        record and learn the outcome; None when there is no job to cancel."""
        records = Records(Path(workdir) / self.name)
        if not records.record.is_file():
            return None
        saved = records.read_record()
        plan = TrainingPlan.from_dict(json.loads(WorkDir(Path(workdir)).plan.read_text(encoding="utf-8")))
        outcome = self._cancel_and_learn(self._service(), saved, plan, records, while_down=True)
        write_cancel_outcome(Path(workdir), outcome, saved["request_id"])
        return outcome

    def _cancel_and_learn(
        self, service, saved: dict, plan: TrainingPlan, records: Records, **told: Any
    ) -> str:
        """Cancel, then poll up to cancel_wait_s. stopped: the record goes aside (a retry submits
        anew). finished_anyway: it was paid for; its LoRA is downloaded into the job's folder and
        the record kept, so `lorad retry` re-attaches and publishes it without paying.
        still_pending: kept; a retry re-attaches."""
        remote_id = saved["request_id"]
        self._cancel(service, saved)
        self.log.info(f"{self.name}.cancelled", **{self.id_field: remote_id}, **told)
        deadline, outcome, status = time.monotonic() + self.cancel_wait_s, "still_pending", None
        while True:
            try:
                verdict, status = self._cancel_verdict(service, saved)
            except Exception:
                verdict, status = None, None
            if verdict is not None:
                outcome = verdict
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        if outcome == "stopped":
            records.close_request("cancelled")
        elif outcome == "finished_anyway":
            try:
                self._fetch_result(
                    service, saved, status, plan, records.workdir, StopToken(), lambda *a, **k: None
                )
            except Exception as exc:
                self.log.warning(
                    f"{self.name}.cancel_download_failed", **{self.id_field: remote_id}, error=str(exc)
                )
        self.log.info(f"{self.name}.cancel_outcome", **{self.id_field: remote_id}, outcome=outcome)
        return outcome

    # -- the LoRA ----------------------------------------------------------------------------

    def _convert_checked(self, download: Path, adapter: Path, model: str) -> tuple[str, Converted | None]:
        """The downloaded LoRA in lorad's layout at `adapter` (copied as is when mflux loads its
        layout), checked to load in mflux: (layout, conversion or None). Rejected otherwise."""
        from engines.cloud.convert import BadLoRA, convert, layout_of, read_header

        kept = f"({self.short}'s file is kept: {download})"
        try:
            layout = layout_of(list(read_header(download)[0]))
            if layout == "passthrough":  # a layout mflux loads as is: unchanged, after its check
                shutil.copyfile(download, adapter)
                converted = None
            else:
                converted = convert(
                    download, adapter, "transformer." if "flux" in model else "diffusion_model."
                )
        except BadLoRA as exc:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA {self.short} returned is not usable: {exc} {kept}") from None
        problem = self._load_check(adapter, model)
        if problem:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA {self.short} returned does not load in mflux: {problem} {kept}")
        return layout, converted

    def _load_check(self, adapter: Path, model: str) -> str | None:
        """None when mflux matches every key (and, for the miniature model, applies them all)."""
        args = [sys.executable, "-m", "engines.cloud.loadcheck", "--lora", str(adapter), "--model", model]
        if model == "tiny-z-image":
            args += ["--tiny-dir", str(self.state_dir / "models" / "tiny-z-image")]
        env = child_env(os.environ, keep=HF_TOKENS)  # no cloud key: it only loads the file in mflux
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

    # -- publish -----------------------------------------------------------------------------

    def report_files(self, workdir: Path) -> list[Path]:
        result = Path(workdir) / self.name / RESULT_FILE
        return [result] if result.is_file() else []

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        folder = Path(plan.config.get("workdir", ".")) / self.name
        keys = self._metadata_head(plan)
        try:
            keys[self.id_metadata_key] = str(json.loads((folder / REQUEST_FILE).read_text())["request_id"])
        except (OSError, ValueError, KeyError):
            pass
        try:
            adapter = json.loads((folder / "adapter.json").read_text())
            keys["ss_network_dim"], keys["ss_network_alpha"] = str(adapter["rank"]), f"{adapter['alpha']:g}"
        except (OSError, ValueError, KeyError):
            keys["ss_network_dim"] = str(plan.config.get("rank", ""))
        return keys

    def saved_state(self, workdir: Path) -> SavedState | None:
        """The request record, at step 0 once a job is on the cloud (the step itself lives on the
        cloud and its status reports it): sent to the coordinator like a checkpoint, so a job whose
        worker dies re-attaches to the paid job on the next worker instead of submitting again."""
        record = Path(workdir) / self.name / REQUEST_FILE
        return SavedState(step=0, files=(record,)) if record.is_file() else None

    def disk_needed(self, *, plan: TrainingPlan, workdir: Path) -> int:
        data = Path(plan.config.get("data", WorkDir(Path(workdir)).data))
        snapshot = sum(p.stat().st_size for p in data.iterdir() if p.is_file()) if data.is_dir() else 0
        return snapshot + self.downloads_of_512mb * 512 * 1024 * 1024  # the zip, downloads, the LoRA
