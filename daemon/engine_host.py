"""Engines built for this machine: settings -> engine, the job's input, the cloud fallback's
engine. Apart from the pipeline so that intake, the CLI and the Redis side can build an engine
without importing the job loop (tests/unit/test_layers.py: no import circles).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from daemon.settings import Settings, SettingsError
from engines.base import (
    GENERIC_OPTIONS,
    Engine,
    EngineContext,
    EngineSettingsError,
    JobInput,
    Option,
    Renderer,
    coerce_options,
    engine_class,
    local_renderer,
)
from lorad_base.workdir import WorkDir

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
    try:
        cls = engine_class(name)
        return cls(engine_context(settings, cls.options, settings.engines.get(name, {})))
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def engine_options(
    settings: Settings, declared: tuple[Option, ...], section: Mapping[str, object]
) -> dict[str, object]:
    """An engine's raw section, with the generic settings it declares as options filled in
    (`keep_awake`); its own section wins (pure)."""
    names = {o.name for o in declared}
    generic = {key: getattr(settings, key) for key in GENERIC_OPTIONS if key in names}
    return {**generic, **dict(section)}


def engine_context(
    settings: Settings, declared: tuple[Option, ...] = (), section: Mapping[str, object] | None = None
) -> EngineContext:
    """What an engine is built with: the generic settings and its section."""
    return EngineContext(
        settings.state,
        settings.stop_timeout_s,
        engine_options(settings, declared, section or {}),
        download_models=settings.download_models,
    )


def check_engine_settings(settings: Settings) -> None:
    """At start: the chosen engine and every `[engines.<name>]` section must be known and valid."""
    try:
        engine_class(settings.engine)
        for name, raw in settings.engines.items():
            coerce_options(name, engine_class(name).options, raw)
    except EngineSettingsError as exc:
        raise SettingsError(str(exc)) from None


def job_input(job, workdir: Path) -> JobInput:
    wd = WorkDir(Path(workdir))
    manifest = json.loads(wd.manifest.read_text(encoding="utf-8"))
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
        data_dir=wd.data,
        preview_prompt=preview_prompt,
    )


LOCAL_RENDERER = "mflux"  # what renders, here, a LoRA an engine without a renderer trained


def renderer_for(settings: Settings, engine: Engine) -> Renderer:
    """The seam that makes the test render (issue 21: rendering is chosen by the daemon, not owned
    by every trainer): the engine itself when it renders (mflux, scripted), else the mflux engine
    on this machine, on a render plan for it (a cloud-trained LoRA; engines/mflux/render.py)."""
    if isinstance(engine, Renderer):
        return engine
    declared = engine_class(LOCAL_RENDERER).options
    context = EngineContext(settings.state, settings.stop_timeout_s, engine_options(settings, declared, {}))
    return local_renderer(context, trained_on=engine.label or engine.name, folder=engine.name)


def engine_setting_rows(settings: Settings) -> list[tuple[str, object, str]]:
    """`lorad config`'s lines for engine settings: every option of the engine in use and of the
    cloud fallback's (their effective value: default, generic setting or section), then any other
    section's keys as given; (`engines.<name>.<key>`, value, where it came from)."""
    rows: list[tuple[str, object, str]] = []
    shown = [settings.engine] + [e for e in [fallback_engine(settings)] if e and e != settings.engine]
    for name in shown:
        try:
            declared = engine_class(name).options
            values = coerce_options(
                name, declared, engine_options(settings, declared, settings.engines.get(name, {}))
            )
        except EngineSettingsError:
            continue
        for key, value in values.items():
            source = settings.sources.get(f"engines.{name}.{key}")
            if source is None:
                source = settings.sources.get(key, "default") if key in GENERIC_OPTIONS else "default"
            rows.append((f"engines.{name}.{key}", value, source))
    for name, section in sorted(settings.engines.items()):
        if name not in shown:
            rows += [
                (f"engines.{name}.{k}", v, settings.sources.get(f"engines.{name}.{k}", "default"))
                for k, v in sorted(section.items())
            ]
    return rows
