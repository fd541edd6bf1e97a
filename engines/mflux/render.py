"""LocalRenderer: the test render of a LoRA trained elsewhere (a cloud), made on this machine by
the mflux engine. A cloud engine has no renderer of its own: the daemon picks this one for it
(daemon/engine_host.py `renderer_for`, through engines.base `local_renderer`).

The render plan is mflux's for this machine (`render_plan`: also for flux-dev, which mflux renders
but cannot train), built from what the cloud's plan config keeps of the job; it and the render's
log go under `<workdir>/<folder>/local`, apart from the cloud's own files.
"""

from __future__ import annotations

import json
from pathlib import Path

from engines.base import (
    CheckStatus,
    EngineContext,
    JobInput,
    PlanError,
    RenderFailed,
    RenderOutcome,
    StopToken,
    TrainingPlan,
    machine_now,
)
from engines.mflux.engine import MFluxEngine
from lorad_base.fsutil import atomic_write_text
from lorad_base.workdir import WorkDir


def render_job(plan: TrainingPlan, prompt: str) -> JobInput:
    """The job as a cloud plan's config keeps it (engines/cloud/engine.py `_plan_config`)."""
    c = plan.config
    return JobInput(
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


class LocalRenderer:
    """A `Renderer` for LoRAs trained on `trained_on` (e.g. "fal.ai")."""

    def __init__(self, context: EngineContext, *, trained_on: str, folder: str):
        self.local = MFluxEngine(context)
        self.trained_on, self.folder = trained_on, folder

    def render(
        self,
        *,
        plan: TrainingPlan,
        workdir: Path,
        lora: Path,
        prompt: str,
        out_dir: Path,
        stop: StopToken,
        seed: int = 42,
    ) -> RenderOutcome:
        check = self.local.model_check(plan.model)
        ready = f"the LoRA trained on {self.trained_on} is ready in {lora}"
        if check.status is not CheckStatus.OK and plan.model != "tiny-z-image":
            return RenderFailed(f"{ready}, but the local test render needs the model here: {check.detail}")
        try:  # a render plan for this machine, as a local job gets
            local_plan = self.local.render_plan(render_job(plan, prompt), machine_now())
        except PlanError as exc:
            return RenderFailed(f"{ready}, but this machine cannot render it: {exc}")
        render_dir = WorkDir(Path(workdir) / self.folder / "local")
        render_dir.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(render_dir.plan, json.dumps(local_plan.to_dict(), indent=2))
        return self.local.render(
            plan=local_plan,
            workdir=render_dir.root,
            lora=lora,
            prompt=prompt,
            out_dir=out_dir,
            stop=stop,
            seed=seed,
        )
