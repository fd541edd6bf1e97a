"""FalEngine: train on fal.ai behind the engine contract (daemon side: no ML imports).

Training is one request to a fal trainer endpoint (`pricing.ENDPOINTS`, overridable):
zip the snapshot (images + captions), upload it, submit, and write the request id to
`<workdir>/fal/request.json` atomically **before** waiting. Whoever calls `train` again on this
workdir (a restart, a retry) re-attaches to that request instead of paying for a second
training. A shutdown stops waiting but leaves the request running (re-attached next start); a
cancel cancels it remotely. The result's LoRA is downloaded (streamed, size-checked), converted
from fal's diffusers/PEFT layout to lorad's (engines/cloud/convert.py), and checked to load in mflux with
every key matched (engines/cloud/loadcheck.py, a child process). The test render is made locally by the mflux
engine (the same child as a local job; the daemon chooses it: a cloud engine has no renderer). What every cloud shares lives in engines/cloud/engine.py
(`CloudEngine`); this file is fal's table, its client adapter and what only fal does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from engines.base import (
    Check,
    CheckStatus,
    EngineContext,
    EngineSettingsError,
    JobInput,
    Machine,
    Option,
    PlanError,
    StopToken,
    TrainingPlan,
)
from engines.cloud.dataset import IMAGE_SUFFIXES, request_arguments, zip_snapshot
from engines.cloud.engine import DAILY_JOBS, RESULT_FILE, CloudEngine, Stopped
from engines.cloud.logsteps import loss_from_logs, step_from_logs
from engines.cloud.schema import SchemaError, resolve
from engines.cloud.submission import Records
from engines.fal import pricing
from engines.fal.endpoints import SCHEMAS
from lorad_base.fsutil import atomic_write_text
from lorad_base.workdir import WorkDir

# Kept for old imports: these moved to engines/cloud/ (every cloud engine uses them).
__all__ = [
    "IMAGE_SUFFIXES",
    "FalEngine",
    "loss_from_logs",
    "request_arguments",
    "step_from_logs",
    "zip_snapshot",
]

FAL_DIR = "fal"


class FalEngine(CloudEngine):
    name: ClassVar[str] = FAL_DIR
    models: ClassVar[tuple[str, ...]] = tuple(pricing.ENDPOINTS)
    label: ClassVar[str] = "fal.ai"
    short: ClassVar[str] = "fal"
    id_metadata_key: ClassVar[str] = "lorad.fal_request_id"
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
        DAILY_JOBS,
    )

    def __init__(self, context: EngineContext):
        super().__init__(context)
        values = self.values
        try:
            endpoints = values.text("endpoints")
            self.endpoints = {} if endpoints == "-" else pricing.parse_endpoints(endpoints)
        except ValueError as exc:
            raise EngineSettingsError(f"setting 'endpoints' in [engines.fal]: {exc}") from None
        self.price_override = values.number("price_per_step_usd")
        self.result_timeout_s = values.number("result_timeout_s")
        self.upload_expires_s = values.integer("upload_expires_s")
        self.schemas = {**SCHEMAS, **self._user_schemas(values.text("schemas"))}
        self.prices = {
            e: pricing.Price(s.usd_per_step, s.min_steps, self._default_steps(s))
            for e, s in self.schemas.items()
            if s.usd_per_step is not None
        }

    # -- plan --------------------------------------------------------------------------------

    def plan(self, *, job: JobInput, machine: Machine) -> TrainingPlan:
        try:
            schema = resolve(job.model, pricing.ENDPOINTS, self.endpoints, self.schemas, "fal").schema
        except SchemaError as exc:
            raise PlanError(str(exc)) from None
        endpoint = schema.endpoint
        steps, arguments, cost, price, max_cost = self._plan_numbers(job, schema)
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
            config=self._plan_config({"endpoint": endpoint}, job, steps, cost, max_cost),
        )

    # -- fal's side of train -----------------------------------------------------------------

    def _service(self):
        from engines.fal.service import HOW_TO_SET_KEY, BadKey, FalService, find_key

        try:
            key = find_key()
        except BadKey as exc:
            raise PlanError(str(exc)) from None
        if not key:
            raise PlanError(f"no fal.ai API key: {HOW_TO_SET_KEY}")
        return FalService(key, self.timeout_s)

    def _upload(self, service, archive: Path, stop: StopToken, note) -> str:
        return self._call("upload", lambda: service.upload(archive, self.upload_expires_s), stop, note)

    def _send(self, service, plan: TrainingPlan, arguments: dict, prepared: dict, stop, note) -> str:
        endpoint = self._target(plan)
        return self._call("submit", lambda: service.submit(endpoint, arguments), stop, note)

    def _await(self, service, saved: dict, total: int, stop: StopToken, note, remote: dict, last: dict):
        """Poll until COMPLETED; its status (`error`: fal's text when the request failed)."""
        endpoint, request_id = saved["endpoint"], saved["request_id"]
        seen_state = None
        while True:
            status = self._call("status", lambda: service.status(endpoint, request_id), stop, note)
            if status.state != seen_state:
                self.log.info(
                    "fal.status", request_id=request_id, state=status.state, position=status.position
                )
                seen_state = status.state
            if status.state == "COMPLETED":
                return status
            if status.state == "IN_QUEUE":
                note(f"fal.ai queue, position {status.position}", {**remote, "state": "IN_QUEUE"})
            else:
                step = step_from_logs(status.logs, total)
                if step is not None:
                    last["step"] = step
                    last["loss"] = loss_from_logs(status.logs)  # the learning metrics' series
                note(
                    f"training on fal.ai{f' (step {step}/{total})' if step is not None else ''}",
                    {**remote, "state": "IN_PROGRESS"},
                )
            if stop.wait(self.poll_s):
                raise Stopped()

    def _remote_failure(self, done: Any, saved: dict, records: Records) -> str | None:
        if done.error is None:
            return None
        request_id = saved["request_id"]
        records.close_request("failed")  # a retry submits anew (it failed on fal)
        self.log.warning("fal.remote_failed", request_id=request_id, error=done.error)
        return (
            f"fal.ai ({saved['endpoint']}, request {request_id}) failed: {done.error}; "
            f"lorad retry sends a new request (paid again)"
        )

    def _cancel(self, service, saved: dict) -> None:
        service.cancel(saved["endpoint"], saved["request_id"])

    def _cancel_verdict(self, service, saved: dict) -> tuple[str | None, Any]:
        """fal only *signals* an in-progress runner: COMPLETED with an error means it stopped."""
        status = service.status(saved["endpoint"], saved["request_id"])
        if status.state != "COMPLETED":
            return None, status
        return ("stopped" if status.error else "finished_anyway"), status

    def _fetch_result(
        self, service, saved: dict, done: Any, plan: TrainingPlan, workdir: Path, stop, note
    ) -> Path:
        from engines.cloud.errors import Rejected, Unreachable

        endpoint, request_id = saved["endpoint"], saved["request_id"]
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
        adapter = WorkDir(workdir).adapter
        layout, converted = self._convert_checked(download, adapter, plan.model)
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

    # -- checks and publish ------------------------------------------------------------------

    def _metadata_head(self, plan: TrainingPlan) -> dict[str, str]:
        return {"lorad.engine": self.name, "lorad.fal_endpoint": str(plan.config.get("endpoint", ""))}

    def doctor_checks(self, *, model: str, machine: Machine) -> list[Check]:
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
