"""Engines built for this machine: settings -> engine, the job's input, the cloud fallback's
engine. Apart from the pipeline so that intake, the CLI and the Redis side can build an engine
without importing the job loop (tests/unit/test_layers.py: no import circles).
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.settings import Settings, SettingsError
from engines.base import (
    Engine,
    EngineContext,
    EngineSettingsError,
    JobInput,
    coerce_options,
    engine_class,
    get_engine,
)

CLOUD_ENGINE = "fal"  # where `cloud_fallback = true` sends a job no local plan fits


def fallback_engine(settings) -> str | None:
    """The cloud engine `cloud_fallback` names (pure): None when off; true means fal."""
    value = getattr(settings, "cloud_fallback", None)
    if not value:
        return None
    return CLOUD_ENGINE if value is True else str(value)


def make_engine(settings: Settings, name: str | None = None) -> Engine:
    """The engine `name` (default: the `engine` setting) with its `[engines.<name>]` section;
    SettingsError when the name is unknown or the section is bad."""
    name = name or settings.engine
    context = EngineContext(
        settings.state,
        settings.stop_timeout_s,
        settings.keep_awake,
        settings.engines.get(name, {}),
        cloud_daily_jobs=settings.cloud_daily_jobs,
        download_models=settings.download_models,
    )
    try:
        return get_engine(name, context)
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def check_engine_settings(settings: Settings) -> None:
    """At start: the chosen engine and every `[engines.<name>]` section must be known and valid."""
    try:
        engine_class(settings.engine)
        for name, raw in settings.engines.items():
            coerce_options(name, engine_class(name).options, raw)
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def job_input(job, workdir: Path) -> JobInput:
    manifest = json.loads((workdir / "manifest.json").read_text(encoding="utf-8"))
    images = manifest["images"]
    preview_prompt = manifest.get("preview_prompt") or f"{job.trigger_word}, portrait photo"
    options = dict(manifest.get("options", {}))
    options["preview_prompts"] = manifest.get("preview_prompts") or [
        preview_prompt
    ]  # samples during training
    if manifest.get("sample_every"):
        options["sample_every"] = manifest["sample_every"]
    return JobInput(
        job_id=job.id,
        name=job.name,
        trigger=job.trigger_word,
        model=job.settings.get("model", "z-image-turbo"),
        image_count=len(images),
        max_side=max((max(i["width"], i["height"]) for i in images), default=0),
        options=options,
        data_dir=workdir / "data",
        preview_prompt=preview_prompt,
    )


def renderer_for(settings: Settings, engine: Engine) -> Engine:
    """The seam that makes the test render (issue 21: rendering is chosen by the daemon, not owned
    by every trainer). Today every engine still renders (a cloud engine borrows the mflux engine);
    the runner calls `renderer_for(...).render(...)` so the choice moves here without touching it."""
    del settings
    return engine
