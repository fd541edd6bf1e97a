"""ReplicateEngine: train on Replicate behind the engine contract (daemon side: no ML imports).

A training is one paid `POST /v1/models/<trainer>/versions/<v>/trainings` (the official client's
`trainings.create`) into the user's destination model (`[engines.replicate] destination`).
It stands on the cloud base (engines/cloud): the snapshot is zipped and uploaded, the arguments
are checked against the trainer's schema, the *intent* is written before the create call and the
training id right after, before any wait; a restart re-attaches to the training on record; an
uncertain create is never sent again by itself. The result is a weights archive: downloaded
(bounded), its LoRA taken out under the untrusted-input rules (engines/cloud/archive.py),
converted with the shared converter (engines/fal/convert.py), load-checked in mflux in a child,
then published and rendered locally like any LoRA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from engines.base import (
    EngineContext,
    EngineSettingsError,
    Failure,
    JobInput,
    Machine,
    Option,
    PlanError,
    Progress,
    StopToken,
    TrainingPlan,
    TrainResult,
    TrainStatus,
    coerce_options,
    write_cancel_outcome,
)
from engines.cloud.schema import Schema, SchemaError, check_arguments, resolve
from engines.cloud.submission import Ledger, Next, Records, kill_point
from engines.fal import pricing
from engines.fal.engine import request_arguments, step_from_logs, zip_snapshot
from engines.replicate import trainers
from lorad_base.fsutil import atomic_write_text
from lorad_base.logs import get_logger

CLOUD = "replicate"
RESULT_FILE = "result.json"
LEDGER = "submitted.jsonl"
DASHBOARD = "https://replicate.com/trainings"
T = TypeVar("T")


class _Stopped(Exception):
    pass


class _Uncertain(Exception):
    pass


def steps_from_logs(logs: str, total: int) -> int | None:
    """The newest step Replicate's training logs mention (tqdm `120/1000 [`, `step 120/1000`)."""
    return step_from_logs([{"message": line} for line in logs.splitlines()[-200:]], total)


class ReplicateEngine:
    """The cloud half is Replicate's; the local half (load check, render) is the mflux engine's."""

    name: ClassVar[str] = CLOUD
    models: ClassVar[tuple[str, ...]] = tuple(trainers.TRAINERS)
    options: ClassVar[tuple[Option, ...]] = (
        Option("destination", str, "-", "owner/model on Replicate that receives the trained version"),
        Option("trainers", str, "-", "model=owner/name[:version] pairs over the built-in table"),
        Option("schemas", str, "-", "a JSON file describing trainers lorad does not know"),
        Option("max_cost_usd", float, 5.0, "refuse a job whose estimate is above this", 0),
        Option(
            "seconds_per_step",
            float,
            trainers.SECONDS_PER_STEP,
            "for the estimate: seconds one step takes on the trainer's hardware",
            0,
        ),
        Option("usd_per_second", float, trainers.H100_USD_PER_SECOND, "the trainer hardware's price", 0),
        Option("poll_s", float, 5.0, "seconds between status polls", 0.01),
        Option("retry_base_s", float, 2.0, "first backoff after a failed call (doubles up to 60 s)", 0.01),
        Option(
            "unreachable_timeout_s", float, 6 * 3600.0, "fail when Replicate stays unreachable this long", 1
        ),
        Option("timeout_s", float, 120.0, "HTTP timeout of each call", 1),
        Option("cancel_wait_s", float, 60.0, "after a cancel, how long to wait for Replicate's outcome", 0),
        Option("max_download_mb", int, 2048, "refuse a weights archive above this size", 1),
    )

    def __init__(self, context: EngineContext):
        values = coerce_options(self.name, self.options, context.options)
        self.context = context
        self.state_dir = Path(context.state_dir)
        try:
            self.endpoints = (
                {} if values["trainers"] == "-" else trainers.parse_trainers(str(values["trainers"]))
            )
        except ValueError as exc:
            raise EngineSettingsError(f"setting 'trainers' in [engines.replicate]: {exc}") from None
        self.destination = str(values["destination"]).strip()
        self.max_cost_usd = float(values["max_cost_usd"])  # type: ignore[arg-type]
        per_step = trainers.usd_per_step(float(values["seconds_per_step"]), float(values["usd_per_second"]))  # type: ignore[arg-type]
        self.poll_s = float(values["poll_s"])  # type: ignore[arg-type]
        self.retry_base_s = float(values["retry_base_s"])  # type: ignore[arg-type]
        self.unreachable_timeout_s = float(values["unreachable_timeout_s"])  # type: ignore[arg-type]
        self.timeout_s = float(values["timeout_s"])  # type: ignore[arg-type]
        self.cancel_wait_s = float(values["cancel_wait_s"])  # type: ignore[arg-type]
        self.max_download = int(values["max_download_mb"]) * 1024 * 1024  # type: ignore[call-overload]
        self.price_override = per_step
        self.schemas = {**trainers.SCHEMAS, **self._user_schemas(str(values["schemas"]))}
        self.prices = {
            e: pricing.Price(per_step, s.min_steps, self._default_steps(s)) for e, s in self.schemas.items()
        }
        self.daily_jobs = int(context.cloud_daily_jobs)
        self.log = get_logger()

    def _resolve(self, model: str) -> Schema:
        try:
            schema = resolve(model, trainers.TRAINERS, self._trainer_names(), self.schemas, CLOUD).schema
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        return schema

    def _trainer_names(self) -> dict[str, str]:
        """The user's trainers without a pinned `:version` (schemas are per trainer)."""
        return {m: t.partition(":")[0] for m, t in self.endpoints.items()}

    # -- plan --------------------------------------------------------------------------------

    def plan(self, job: JobInput, machine: Machine) -> TrainingPlan:
        schema = self._resolve(job.model)
        problem = trainers.destination_problem(self.destination)
        if problem:
            raise PlanError(problem)
        trainer = self.endpoints.get(job.model) or trainers.TRAINERS[job.model]
        steps = int(
            job.options.get("steps")
            or job.options.get("epochs", 0) * job.image_count
            or self._default_steps(schema)
        )
        config = {"steps": steps, "trigger": job.trigger, "learning_rate": job.options.get("learning_rate")}
        try:
            arguments = request_arguments(schema, "<the uploaded dataset zip>", config)
            check_arguments(schema, arguments)
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        cost, price = pricing.estimate_usd(schema.endpoint, steps, self.price_override, self.prices)
        max_cost = float(job.options.get("max_cost_usd", self.max_cost_usd))
        problem = pricing.cost_problem(cost, max_cost, steps, price, schema.endpoint)
        if problem:
            raise PlanError(problem.replace("[engines.fal]", "[engines.replicate]"))
        return TrainingPlan(
            engine=self.name,
            model=job.model,
            backend="replicate.com",
            tier="cloud",
            reason=f"trains on Replicate ({trainer}), about ${cost:.2f} (an estimate)",
            total_steps=steps,
            summary=[
                f"backend      replicate.com ({trainer})",
                f"trainer      {trainer}",
                f"destination  {self.destination}",
                f"arguments    {json.dumps(arguments, sort_keys=True)}",
                f"cost         about ${cost:.2f}, an estimate: Replicate bills hardware time "
                f"(${price.usd_per_step:g}/step = seconds per step x hardware price; guard ${max_cost:.2f})",
            ],
            config={
                "endpoint": schema.endpoint,
                "trainer": trainer,
                "destination": self.destination,
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

    @staticmethod
    def _user_schemas(path: str) -> dict[str, Schema]:
        from engines.cloud.schema import schemas_from_json

        if path == "-":
            return {}
        try:
            return schemas_from_json(Path(path).expanduser().read_text(encoding="utf-8"), path)
        except (OSError, SchemaError) as exc:
            raise EngineSettingsError(f"setting 'schemas' in [engines.replicate]: {exc}") from None

    @staticmethod
    def _default_steps(schema: Schema) -> int:
        name = schema.role("steps")
        default = schema.fields[name].default if name else None
        return int(default) if isinstance(default, int) else 1000

    def step_down(self, plan, job, machine, failed) -> TrainingPlan | None:
        return None  # Replicate sizes its own hardware

    # -- train -------------------------------------------------------------------------------

    def _service(self):
        from engines.replicate.service import HOW_TO_SET_TOKEN, BadKey, ReplicateService, find_token

        try:
            token = find_token()
        except BadKey as exc:
            raise PlanError(str(exc)) from None
        if not token:
            raise PlanError(f"no Replicate API token (REPLICATE_API_TOKEN): {HOW_TO_SET_TOKEN}")
        return ReplicateService(token, self.timeout_s)

    def _call(self, what: str, fn: Callable[[], T], stop: StopToken, note, bound_s: float | None = None) -> T:
        """fn(), retried with backoff while Replicate is unreachable (bounded); a stop ends the wait."""
        from engines.replicate.service import Unreachable

        delay, since = self.retry_base_s, None
        while True:
            if stop.requested():
                raise _Stopped()
            try:
                return fn()
            except Unreachable as exc:
                now = time.monotonic()
                since = since if since is not None else now
                limit = self.unreachable_timeout_s if bound_s is None else bound_s
                if now - since >= limit:
                    raise Unreachable(
                        f"Replicate unreachable for {now - since:.0f} s ({what}: {exc}); gave up after {limit:g} s"
                    ) from None
                self.log.warning("replicate.retry", call=what, error=str(exc), retry_in_s=delay)
                note(f"waiting: Replicate unreachable ({what}: {exc}); retrying in {delay:g} s")
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
        from engines.replicate.service import Rejected, Unreachable

        workdir = Path(workdir)
        folder = workdir / CLOUD
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(workdir / "plan.json", json.dumps(plan.to_dict(), indent=2))
        total, trainer = plan.total_steps, str(plan.config["trainer"])
        last = {"step": 0}

        def note(text: str, remote: dict | None = None) -> None:
            progress(Progress(last["step"], total, note=text, remote=remote))

        try:
            service = self._service()
        except PlanError as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        records = Records(folder)
        remote = {"engine": self.name, "endpoint": trainer}
        try:
            training_id = self._attach_or_submit(service, plan, records, stop, note)
            if training_id is None:
                return TrainResult(
                    TrainStatus.FAILED, error=self._refusal or "not sent", failure=Failure.OTHER
                )
            remote["request_id"] = training_id
            done = self._wait(service, training_id, total, stop, note, remote, last)
            if done.state != "succeeded":
                records.close_request(done.state)  # a retry trains anew (paid again)
                self.log.warning(
                    "replicate.remote_failed", training_id=training_id, state=done.state, error=done.error
                )
                return TrainResult(
                    TrainStatus.FAILED,
                    error=f"Replicate ({trainer}, training {training_id}) {done.state}: {done.error or 'no reason given'}; "
                    f"lorad retry starts a new training (paid again)",
                    failure=Failure.OTHER,
                )
            note("downloading the LoRA", remote)
            adapter = self._fetch_result(service, done, plan, workdir, stop, note)
        except _Stopped:
            return self._stopped(stop, folder, last["step"], plan)
        except _Uncertain as exc:
            note(str(exc), {**remote, "error_kind": Failure.SUBMISSION_UNCERTAIN.value})
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.SUBMISSION_UNCERTAIN)
        except Rejected as exc:
            return TrainResult(
                TrainStatus.FAILED, error=f"Replicate ({trainer}): {exc}", failure=Failure.OTHER
            )
        except Unreachable as exc:
            return TrainResult(TrainStatus.FAILED, error=str(exc), failure=Failure.OTHER)
        progress(Progress(total, total, note="LoRA downloaded and checked", remote=remote))
        return TrainResult(
            TrainStatus.COMPLETED, adapter=adapter, step=total, artifacts={"request_id": training_id}
        )

    _refusal: str | None = None

    def _attach_or_submit(
        self, service, plan: TrainingPlan, records: Records, stop: StopToken, note
    ) -> str | None:
        """The training of this workdir: the one on record (re-attach), else a new one (intent
        before the create call, record after; engines/cloud/submission.py)."""
        from engines.replicate.service import Rejected

        step = records.next_step()
        if step is Next.REATTACH:
            saved = records.read_record()
            self.log.info("replicate.reattach", training_id=saved["request_id"], trainer=saved["endpoint"])
            return str(saved["request_id"])
        if step is Next.UNCERTAIN:
            self.log.warning("replicate.submission_uncertain", trainer=records.read_intent().get("endpoint"))
            raise _Uncertain(
                self._uncertain(
                    records, "the attempt that sent it ended before Replicate's answer was recorded", plan
                )
            )
        if step is Next.RESUBMIT:
            records.start_resubmit()
            self.log.info("replicate.resubmit", job_id=plan.config.get("job_id"))
        problem = pricing.daily_problem(self._ledger().last_day(), self.daily_jobs)
        if problem:
            self._refusal = problem
            return None
        destination = str(plan.config["destination"])
        missing = self._call("destination", lambda: service.destination_problem(destination), stop, note)
        if missing:
            raise Rejected(missing)
        trainer = str(plan.config["trainer"])
        version = self._call("trainer version", lambda: service.trainer_version(trainer), stop, note)
        schema = self.schemas.get(str(plan.config["endpoint"]))
        if schema is None:
            raise Rejected(f"no schema for {plan.config['endpoint']} (plan it again)")
        archive = records.folder / "dataset.zip"
        count = zip_snapshot(Path(plan.config["data"]), archive)
        note(f"uploading the dataset ({count} files)")
        url = self._call("upload", lambda: service.upload(archive), stop, note)
        self.log.info("replicate.uploaded", files=count, bytes=archive.stat().st_size)
        arguments = request_arguments(schema, url, plan.config)
        check_arguments(schema, arguments)
        if stop.requested():
            raise _Stopped()
        return self._submit_once(service, plan, records, trainer, version, arguments, stop, note)

    def _uncertain(self, records: Records, reason: str, plan: TrainingPlan) -> str:
        return records.mark_uncertain(
            reason, plan.config.get("job_id"), cloud="Replicate", dashboard=DASHBOARD
        )

    def _submit_once(
        self, service, plan, records: Records, trainer: str, version: str, arguments: dict, stop, note
    ) -> str:
        """The paid create call, at most once: intent and ledger line first, the record after."""
        from engines.replicate.service import Rejected, SubmissionUncertain, Unreachable

        kill_point("before_intent")
        records.write_intent(trainer, arguments, plan.config.get("job_id"))
        self._ledger().append(
            endpoint=trainer, job_id=plan.config.get("job_id"), cost_usd=plan.config.get("cost_usd")
        )
        kill_point("after_intent")
        destination = str(plan.config["destination"])
        try:
            created = self._call(
                "create", lambda: service.create(trainer, version, arguments, destination), stop, note
            )
        except SubmissionUncertain as exc:
            self.log.warning("replicate.submission_uncertain", trainer=trainer, reason=str(exc))
            raise _Uncertain(self._uncertain(records, str(exc), plan)) from None
        except (Unreachable, Rejected, _Stopped):
            records.archive(records.intent, "not_sent")
            raise
        records.write_record(
            {
                "request_id": created.id,
                "endpoint": trainer,
                "version": version,
                "destination": destination,
                "submitted_at": time.time(),
                "job_id": plan.config.get("job_id"),
                "cost_usd": plan.config.get("cost_usd"),
            }
        )
        kill_point("after_record")
        self.log.info(
            "replicate.submitted",
            training_id=created.id,
            trainer=trainer,
            steps=plan.total_steps,
            cost_usd=plan.config.get("cost_usd"),
        )
        note("submitted to Replicate", {"engine": self.name, "endpoint": trainer, "request_id": created.id})
        return created.id

    def _wait(self, service, training_id: str, total: int, stop: StopToken, note, remote: dict, last: dict):
        """Poll until the training ends (succeeded, failed, canceled); its last state."""
        seen = None
        while True:
            training = self._call("status", lambda: service.get(training_id), stop, note)
            if training.state != seen:
                self.log.info("replicate.status", training_id=training_id, state=training.state)
                seen = training.state
            if training.done:
                return training
            step = steps_from_logs(training.logs, total)
            if step is not None:
                last["step"] = step
            where = f" (step {step}/{total})" if step is not None else ""
            text = (
                "starting on Replicate" if training.state == "starting" else f"training on Replicate{where}"
            )
            note(text, {**remote, "state": training.state})
            if stop.wait(self.poll_s):
                raise _Stopped()

    def _stopped(self, stop: StopToken, folder: Path, step: int, plan: TrainingPlan) -> TrainResult:
        """Shutdown: the training runs on (re-attached at the next start). Cancel: cancel it on
        Replicate and learn, within cancel_wait_s, what happened."""
        records = Records(folder)
        if stop.reason == "cancel" and records.record.is_file():
            saved = records.read_record()
            try:
                outcome = self._cancel_and_learn(self._service(), saved, plan, records)
            except Exception as exc:  # told, not fatal: the job is cancelled either way
                self.log.warning("replicate.cancel_failed", training_id=saved["request_id"], error=str(exc))
                outcome = "still_pending"
            write_cancel_outcome(folder.parent, outcome, saved["request_id"])
        elif records.record.is_file():
            self.log.info("replicate.detached", training_id=records.read_record()["request_id"])
        return TrainResult(TrainStatus.STOPPED, step=step or None)

    def cancel_remote(self, workdir: Path) -> str | None:
        """A cancel given while lorad was down, carried out at the next start."""
        records = Records(Path(workdir) / CLOUD)
        if not records.record.is_file():
            return None
        saved = records.read_record()
        plan = TrainingPlan.from_dict(json.loads((Path(workdir) / "plan.json").read_text(encoding="utf-8")))
        outcome = self._cancel_and_learn(self._service(), saved, plan, records)
        write_cancel_outcome(Path(workdir), outcome, saved["request_id"])
        return outcome

    def _cancel_and_learn(self, service, saved: dict, plan: TrainingPlan, records: Records) -> str:
        """Cancel, then poll up to cancel_wait_s: stopped (canceled or failed: the record goes
        aside), finished_anyway (succeeded: paid; its LoRA is fetched and the record kept, so
        `lorad retry` publishes it without paying), or still_pending."""
        training_id = saved["request_id"]
        service.cancel(training_id)
        self.log.info("replicate.cancelled", training_id=training_id)
        deadline, outcome, training = time.monotonic() + self.cancel_wait_s, "still_pending", None
        while True:
            try:
                training = service.get(training_id)
            except Exception:
                training = None
            if training is not None and training.done:
                outcome = "finished_anyway" if training.state == "succeeded" else "stopped"
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        if outcome == "stopped":
            records.close_request("cancelled")
        elif outcome == "finished_anyway" and training is not None:
            try:
                self._fetch_result(
                    service, training, plan, records.workdir, StopToken(), lambda *a, **k: None
                )
            except Exception as exc:
                self.log.warning("replicate.cancel_download_failed", training_id=training_id, error=str(exc))
        self.log.info("replicate.cancel_outcome", training_id=training_id, outcome=outcome)
        return outcome

    def _fetch_result(self, service, training, plan: TrainingPlan, workdir: Path, stop, note) -> Path:
        """Download the weights archive (bounded), take its LoRA out (untrusted-input rules),
        convert it to lorad's layout, check it loads in mflux."""
        import shutil

        from engines.cloud.archive import BadArchive, extract_lora
        from engines.cloud.download import TooLarge
        from engines.fal.convert import BadLoRA, convert, layout_of, read_header
        from engines.replicate.service import Rejected

        folder = workdir / CLOUD
        atomic_write_text(
            folder / RESULT_FILE,
            json.dumps(
                {
                    "id": training.id,
                    "state": training.state,
                    "weights": training.weights,
                    "version": training.version,
                },
                indent=2,
            ),
        )
        if not training.weights:
            raise Rejected(f"training {training.id} succeeded but its output names no weights")
        archive = folder / "weights.archive"
        nbytes, sha = self._call(
            "download", lambda: service.download(training.weights, archive, self.max_download), stop, note
        )
        self.log.info("replicate.downloaded", bytes=nbytes, sha256=sha)
        download = folder / "download.safetensors"
        try:
            member = extract_lora(archive, download, self.max_download)
        except (BadArchive, TooLarge) as exc:
            raise Rejected(f"the weights archive is not usable: {exc} (kept: {archive})") from None
        adapter = workdir / "adapter.safetensors"
        kept = f"(Replicate's file is kept: {download})"
        try:
            layout = layout_of(list(read_header(download)[0]))
            if layout == "passthrough":
                shutil.copyfile(download, adapter)
                converted = None
            else:
                converted = convert(
                    download, adapter, "transformer." if "flux" in plan.model else "diffusion_model."
                )
        except BadLoRA as exc:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA Replicate returned is not usable: {exc} {kept}") from None
        problem = self._load_check(adapter, plan.model)
        if problem:
            adapter.unlink(missing_ok=True)
            raise Rejected(f"the LoRA Replicate returned does not load in mflux: {problem} {kept}")
        info: dict = {"sha256_archive": sha, "member": member, "layout": layout}
        if converted is not None:
            info.update(rank=converted.rank, alpha=converted.alpha, modules=converted.modules)
        atomic_write_text(folder / "adapter.json", json.dumps(info))
        self.log.info("replicate.converted", member=member, layout=layout, rank=info.get("rank"))
        return adapter

    def _load_check(self, adapter: Path, model: str) -> str | None:
        """The shared mflux load check (engines/fal/loadcheck.py), in a child without any key."""
        import os
        import subprocess
        import sys

        from engines.fal.engine import ROOT

        args = [sys.executable, "-m", "engines.fal.loadcheck", "--lora", str(adapter), "--model", model]
        if model == "tiny-z-image":
            args += ["--tiny-dir", str(self.state_dir / "models" / "tiny-z-image")]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("FAL_KEY", "REPLICATE_API_TOKEN", "FAL_KEY_SECRET")
        }
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
        return Ledger(self.state_dir / CLOUD / LEDGER)

    # -- render and publish ------------------------------------------------------------------

    def render(
        self,
        plan: TrainingPlan,
        workdir: Path,
        lora: Path,
        prompt: str,
        out_dir: Path,
        stop: StopToken,
        seed: int = 42,
    ):
        """The test render, made here by the mflux engine on a render plan for this machine
        (`render_plan`: also for flux-dev, which mflux renders but cannot train)."""
        from engines.base import CheckStatus, RenderFailed, machine_now
        from engines.mflux.engine import MFluxEngine

        local = MFluxEngine(
            EngineContext(self.state_dir, self.context.stop_timeout_s, self.context.keep_awake)
        )
        check = local.model_check(plan.model)
        if check.status is not CheckStatus.OK and plan.model != "tiny-z-image":
            return RenderFailed(
                f"the LoRA trained on Replicate is ready in {lora}, but the local test render needs the model here: {check.detail}"
            )
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
                f"the LoRA trained on Replicate is ready in {lora}, but this machine cannot render it: {exc}"
            )
        render_dir = Path(workdir) / CLOUD / "local"
        render_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(render_dir / "plan.json", json.dumps(local_plan.to_dict(), indent=2))
        return local.render(local_plan, render_dir, lora, prompt, out_dir, stop, seed)

    def report_files(self, workdir: Path) -> list[Path]:
        result = Path(workdir) / CLOUD / RESULT_FILE
        return [result] if result.is_file() else []

    def adapter_metadata(self, plan: TrainingPlan) -> dict[str, str]:
        folder = Path(plan.config.get("workdir", ".")) / CLOUD
        keys = {
            "lorad.engine": self.name,
            "lorad.replicate_trainer": str(plan.config.get("trainer", "")),
            "lorad.replicate_destination": str(plan.config.get("destination", "")),
        }
        try:
            keys["lorad.replicate_training_id"] = str(
                json.loads((folder / "request.json").read_text())["request_id"]
            )
        except (OSError, ValueError, KeyError):
            pass
        try:
            adapter = json.loads((folder / "adapter.json").read_text())
            keys["ss_network_dim"], keys["ss_network_alpha"] = str(adapter["rank"]), f"{adapter['alpha']:g}"
        except (OSError, ValueError, KeyError):
            keys["ss_network_dim"] = str(plan.config.get("rank", ""))
        return keys

    def intake_limits(self):
        from engines.base import IntakeLimits

        return IntakeLimits(max_caption_tokens=None)

    def doctor_checks(self, model: str, machine: Machine):
        from engines.base import Check, CheckStatus

        checks = [self.model_check(model)]
        try:
            from importlib.metadata import version

            import replicate  # noqa: F401

            checks.append(Check("replicate", CheckStatus.OK, f"replicate {version('replicate')}"))
        except Exception as exc:
            checks.append(Check("replicate", CheckStatus.FAIL, f"cannot import replicate: {exc}"))
        return checks

    def model_check(self, model: str):
        from engines.base import Check, CheckStatus
        from engines.replicate.service import HOW_TO_SET_TOKEN, BadKey, find_token

        try:
            trainer = self._resolve(model).endpoint
        except PlanError as exc:
            return Check("model", CheckStatus.FAIL, str(exc))
        problem = trainers.destination_problem(self.destination)
        if problem:
            return Check("model", CheckStatus.FAIL, problem)
        try:
            token = find_token()
        except BadKey as exc:
            return Check("model", CheckStatus.FAIL, str(exc))
        if not token:
            return Check(
                "model",
                CheckStatus.FAIL,
                f"{model} trains on Replicate ({trainer}) but REPLICATE_API_TOKEN is not set: {HOW_TO_SET_TOKEN}",
            )
        return Check(
            "model",
            CheckStatus.OK,
            f"{model} trains on Replicate ({trainer}) into {self.destination}; REPLICATE_API_TOKEN is set",
        )

    def saved_step(self, workdir: Path) -> int | None:
        return 0 if (Path(workdir) / CLOUD / "request.json").is_file() else None

    def saved_state(self, workdir: Path) -> list[Path]:
        record = Path(workdir) / CLOUD / "request.json"
        return [record] if record.is_file() else []

    def disk_needed(self, plan: TrainingPlan, workdir: Path) -> int:
        data = Path(plan.config.get("data", Path(workdir) / "data"))
        snapshot = sum(p.stat().st_size for p in data.iterdir() if p.is_file()) if data.is_dir() else 0
        return snapshot + 4 * 512 * 1024 * 1024  # the zip, the archive, its LoRA, the converted LoRA
