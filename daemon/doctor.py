"""`lorad doctor`: what this machine can do, without importing mlx/mflux in this process.

The generic checks (Python, platform, RAM, disk, folders, settings) are here; the engine's own
(its ML stack, its device and the memory it plans from, the model's weights) come from
`Engine.doctor_checks`, which runs its imports in a child interpreter: importing them here would
cost seconds and, on a broken install, could crash the caller instead of reporting.
"""

from __future__ import annotations

import platform
import shutil
import sys

import psutil

from daemon.settings import Settings, SettingsError
from engines.base import Check, CheckStatus

OK, WARN, FAIL = CheckStatus.OK, CheckStatus.WARN, CheckStatus.FAIL


def run_checks(settings: Settings) -> list[Check]:
    from daemon.engine_host import make_engine
    from engines.base import machine_now

    checks: list[Check] = []
    py_ok = sys.version_info >= (3, 11)
    checks.append(Check("python", OK if py_ok else FAIL, platform.python_version()))
    checks.append(Check("platform", OK, f"{platform.system()} {platform.release()} {platform.machine()}"))
    mem = psutil.virtual_memory()
    gb = 1024**3
    # Informational: the engine's own check says whether the memory that limits training suffices.
    checks.append(
        Check(
            "memory", OK, f"system RAM total {mem.total / gb:.1f} GB, available {mem.available / gb:.1f} GB"
        )
    )
    probe = settings.assets
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    checks.append(
        Check("disk", OK if free >= 20 * gb else WARN, f"{free / gb:.1f} GB free under {settings.assets}")
    )
    for note in settings.deprecations:
        checks.append(Check("settings", WARN, note))
    try:
        engine = make_engine(settings)
    except SettingsError as exc:
        checks.append(Check("engine", FAIL, str(exc)))
    else:
        checks.append(Check("engine", OK, engine.name))
        checks.extend(engine.doctor_checks(model=settings.model, machine=machine_now(settings.ram_gb)))
    checks.append(
        Check("assets", OK if settings.training_data.is_dir() else WARN, str(settings.training_data))
    )
    checks.append(Check("state", OK, str(settings.state)))
    from daemon.captions import doctor_check

    checks.append(doctor_check(settings))
    checks.extend(folder_checks(settings, sys.platform))
    return checks


def folder_checks(settings: Settings, platform_name: str) -> list[Check]:
    """macOS: a checkout or assets folder in ~/Documents, ~/Desktop, ~/Downloads or iCloud Drive
    is refused to a LaunchAgent unless granted: say what to grant or where to move."""
    if platform_name != "darwin":
        return []
    from daemon.service import paths_for, protected_warnings

    return [Check("folders", WARN, warning) for warning in protected_warnings(paths_for(settings))]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status is FAIL for c in checks) else 0


def announce_weights(settings: Settings, log) -> Check | None:
    """At `lorad run` start: one `model.weights` log line, and a printed line on stderr when the
    engine says the model cannot be trained here (its weights are missing): said now, with what
    to do, not after the first job fails on it."""
    from daemon.engine_host import make_engine

    try:
        check = make_engine(settings).model_check(settings.model)
    except SettingsError:
        return None  # the daemon refuses a bad engine setting before this
    present = check.status is OK
    getattr(log, "info" if present else "warning")(
        "model.weights", model=settings.model, present=present, detail=check.detail
    )
    if not present:
        print(f"lorad: {check.detail}", file=sys.stderr, flush=True)
    return check
