"""ReplicateEngine: train on Replicate behind the engine contract (daemon side: no ML imports).

A training is one paid `POST /v1/models/<trainer>/versions/<v>/trainings` (the official client's
`trainings.create`) into the user's destination model (`[engines.replicate] destination`).
It stands on the cloud base (engines/cloud, `CloudEngine`): the snapshot is zipped and uploaded, the arguments
are checked against the trainer's schema, the *intent* is written before the create call and the
training id right after, before any wait; a restart re-attaches to the training on record; an
uncertain create is never sent again by itself. The result is a weights archive: downloaded
(bounded), its LoRA taken out under the untrusted-input rules (engines/cloud/archive.py),
converted with the shared converter (engines/cloud/convert.py), load-checked in mflux in a child,
then published; the daemon renders it locally like any LoRA (a cloud engine has no renderer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from engines.base import (
    EngineContext,
    EngineSettingsError,
    JobInput,
    Machine,
    Option,
    PlanError,
    StopToken,
    TrainingPlan,
)
from engines.cloud import money
from engines.cloud.engine import DAILY_JOBS, RESULT_FILE, CloudEngine, Stopped
from engines.cloud.logsteps import step_from_logs
from engines.cloud.schema import Schema, SchemaError, resolve
from engines.cloud.submission import Records
from engines.replicate import trainers
from lorad_base.fsutil import atomic_write_text
from lorad_base.workdir import WorkDir

CLOUD = "replicate"
DASHBOARD = "https://replicate.com/trainings"


def steps_from_logs(logs: str, total: int) -> int | None:
    """The newest step Replicate's training logs mention (tqdm `120/1000 [`, `step 120/1000`)."""
    return step_from_logs([{"message": line} for line in logs.splitlines()[-200:]], total)


class ReplicateEngine(CloudEngine):
    """The cloud half is Replicate's; the local half (load check, render) is the mflux engine's."""

    name: ClassVar[str] = CLOUD
    models: ClassVar[tuple[str, ...]] = tuple(trainers.TRAINERS)
    label: ClassVar[str] = "Replicate"
    short: ClassVar[str] = "Replicate"
    dashboard: ClassVar[str] = DASHBOARD
    id_field: ClassVar[str] = "training_id"
    target_field: ClassVar[str] = "trainer"
    id_metadata_key: ClassVar[str] = "lorad.replicate_training_id"
    downloads_of_512mb: ClassVar[int] = 4  # the zip, the archive, its LoRA, the converted LoRA
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
        DAILY_JOBS,
    )

    def __init__(self, context: EngineContext):
        super().__init__(context)
        values = self.values
        try:
            names = values.text("trainers")
            self.endpoints = {} if names == "-" else trainers.parse_trainers(names)
        except ValueError as exc:
            raise EngineSettingsError(f"setting 'trainers' in [engines.replicate]: {exc}") from None
        self.destination = values.text("destination").strip()
        per_step = trainers.usd_per_step(values.number("seconds_per_step"), values.number("usd_per_second"))
        self.max_download = values.integer("max_download_mb") * 1024 * 1024
        self.price_override = per_step
        self.schemas = {**trainers.SCHEMAS, **self._user_schemas(values.text("schemas"))}
        self.prices = {
            e: money.Price(per_step, s.min_steps, self._default_steps(s)) for e, s in self.schemas.items()
        }

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

    def plan(self, *, job: JobInput, machine: Machine) -> TrainingPlan:
        schema = self._resolve(job.model)
        problem = trainers.destination_problem(self.destination)
        if problem:
            raise PlanError(problem)
        trainer = self.endpoints.get(job.model) or trainers.TRAINERS[job.model]
        steps, arguments, cost, price, max_cost = self._plan_numbers(job, schema)
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
            config=self._plan_config(
                {"endpoint": schema.endpoint, "trainer": trainer, "destination": self.destination},
                job,
                steps,
                cost,
                max_cost,
            ),
        )

    # -- Replicate's side of train -----------------------------------------------------------

    def _service(self):
        from engines.replicate.service import HOW_TO_SET_TOKEN, BadKey, ReplicateService, find_token

        try:
            token = find_token()
        except BadKey as exc:
            raise PlanError(str(exc)) from None
        if not token:
            raise PlanError(f"no Replicate API token (REPLICATE_API_TOKEN): {HOW_TO_SET_TOKEN}")
        return ReplicateService(token, self.timeout_s)

    def _target(self, plan: TrainingPlan) -> str:
        return str(plan.config["trainer"])

    def _prepare(self, service, plan: TrainingPlan, stop: StopToken, note) -> dict:
        """The destination must exist and the trainer's version be known before the upload."""
        from engines.cloud.errors import Rejected

        destination = str(plan.config["destination"])
        missing = self._call("destination", lambda: service.destination_problem(destination), stop, note)
        if missing:
            raise Rejected(missing)
        trainer = self._target(plan)
        version = self._call("trainer version", lambda: service.trainer_version(trainer), stop, note)
        return {"version": version, "destination": destination}

    def _upload(self, service, archive: Path, stop: StopToken, note) -> str:
        return self._call("upload", lambda: service.upload(archive), stop, note)

    def _send(self, service, plan: TrainingPlan, arguments: dict, prepared: dict, stop, note) -> str:
        trainer, version, destination = self._target(plan), prepared["version"], prepared["destination"]
        created = self._call(
            "create", lambda: service.create(trainer, version, arguments, destination), stop, note
        )
        return str(created.id)

    def _await(self, service, saved: dict, total: int, stop: StopToken, note, remote: dict, last: dict):
        """Poll until the training ends (succeeded, failed, canceled); its last state."""
        training_id = saved["request_id"]
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
                raise Stopped()

    def _remote_failure(self, done: Any, saved: dict, records: Records) -> str | None:
        if done.state == "succeeded":
            return None
        training_id = saved["request_id"]
        records.close_request(done.state)  # a retry trains anew (paid again)
        self.log.warning(
            "replicate.remote_failed", training_id=training_id, state=done.state, error=done.error
        )
        return (
            f"Replicate ({saved['target']}, training {training_id}) {done.state}: {done.error or 'no reason given'}; "
            f"lorad retry starts a new training (paid again)"
        )

    def _cancel(self, service, saved: dict) -> None:
        service.cancel(saved["request_id"])

    def _cancel_verdict(self, service, saved: dict) -> tuple[str | None, Any]:
        """Ended: finished_anyway when it succeeded (paid), else stopped (canceled or failed)."""
        training = service.get(saved["request_id"])
        if not training.done:
            return None, training
        return ("finished_anyway" if training.state == "succeeded" else "stopped"), training

    def _fetch_result(
        self, service, saved: dict, done: Any, plan: TrainingPlan, workdir: Path, stop, note
    ) -> Path:
        """Download the weights archive (bounded), take its LoRA out (untrusted-input rules),
        convert it to lorad's layout, check it loads in mflux."""
        from engines.cloud.archive import BadArchive, extract_lora
        from engines.cloud.download import TooLarge
        from engines.cloud.errors import Rejected

        training = done
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
        adapter = WorkDir(workdir).adapter
        layout, converted = self._convert_checked(download, adapter, plan.model)
        info: dict = {"sha256_archive": sha, "member": member, "layout": layout}
        if converted is not None:
            info.update(rank=converted.rank, alpha=converted.alpha, modules=converted.modules)
        atomic_write_text(folder / "adapter.json", json.dumps(info))
        self.log.info("replicate.converted", member=member, layout=layout, rank=info.get("rank"))
        return adapter

    # -- checks and publish ------------------------------------------------------------------

    def _metadata_head(self, plan: TrainingPlan) -> dict[str, str]:
        return {
            "lorad.engine": self.name,
            "lorad.replicate_trainer": str(plan.config.get("trainer", "")),
            "lorad.replicate_destination": str(plan.config.get("destination", "")),
        }

    def doctor_checks(self, *, model: str, machine: Machine):
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
