"""The verbs behind `lorad <command>`: thin, each importing only what it uses."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from daemon.settings import Settings


class UsageError(Exception):
    pass


def _log_to_file(settings: Settings) -> None:
    """Commands that change jobs log their events to the daemon's log file too."""
    from daemon import logs

    logs.configure(level=settings.log_level, log_file=settings.log_file, console=False)


def _store(settings: Settings, *, must_exist: bool = True):
    from daemon.jobs import JobStore

    if must_exist and not settings.jobs_db.exists():
        return None
    return JobStore(settings.jobs_db, check=False)


def _wake_daemon(settings: Settings) -> int | None:
    from daemon.lock import running_daemon_pid

    pid = running_daemon_pid(settings.state)
    if pid:
        import signal

        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return None
    return pid


def cmd_run(settings: Settings, args) -> int:
    from daemon.daemon import run

    return run(settings)


def cmd_status(settings: Settings, args) -> int:
    from daemon.status import render_status

    store = _store(settings)
    jobs = store.list() if store else []
    from daemon.lock import running_daemon_pid

    pid = running_daemon_pid(settings.state)
    print(render_status(jobs, show_all=args.all, as_json=args.json, daemon_pid=pid, now=time.time()))
    return 0


def cmd_validate(settings: Settings, args) -> int:
    from daemon.intake.validate import validate_dataset

    path = args.path
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass a dataset folder (assets/training_data/<trigger>_<name>)")
    report = validate_dataset(path)
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for finding in report.errors + report.warnings:
            print(finding.line())
        verdict = "valid" if report.valid else "INVALID"
        print(
            f"{path.name}: {verdict} — {len(report.images)} images, trigger {report.trigger!r}, "
            f"{len(report.errors)} errors, {len(report.warnings)} warnings"
        )
    return 0 if report.valid else 1


def _ask_int(prompt: str, default: int) -> int:
    while True:
        answer = input(f"{prompt} [{default}]: ").strip()
        if not answer:
            return default
        try:
            return int(answer)
        except ValueError:
            print("please enter a whole number")


def cmd_enqueue(settings: Settings, args) -> int:
    from daemon.fsutil import atomic_write_text
    from daemon.intake.options import parse_options, render_ready

    folder = args.path
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a dataset folder")
    options = {}
    for key in ("rank", "alpha", "epochs", "steps", "learning_rate", "resolution", "priority", "name"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.force:
        options["force"] = True
    if not options and not args.yes and sys.stdin.isatty():
        # The original plan's train_lora.py asked these two questions.
        options["rank"] = _ask_int("LoRA rank", 16)
        options["epochs"] = _ask_int("epochs", 10)
    text = render_ready(options)
    _, problems = parse_options(text, "READY", allow_force=True)
    if problems:
        raise UsageError("; ".join(p.message for p in problems))
    atomic_write_text(folder / "READY", text)
    print(f"READY written to {folder / 'READY'}" + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""))
    return 0


def _find_job(store, ref: str):
    if store is None:
        raise UsageError("no jobs yet (no jobs database)")
    job = store.find(ref)
    if job is None:
        several = [j.id for j in store.list() if j.id.startswith(ref)]
        if several:
            raise UsageError(f"{ref!r} matches several jobs ({', '.join(several)}); give more of the id")
        raise UsageError(f"no job matches {ref!r} (lorad status lists them)")
    return job


def cmd_cancel(settings: Settings, args) -> int:
    _log_to_file(settings)
    store = _store(settings)
    job = _find_job(store, args.job)
    if job.state in ("done", "failed", "cancelled"):
        print(f"job {job.id} is already {job.state}")
        return 1
    if job.state == "queued":
        store.transition(job.id, "cancelled")
        print(f"cancelled {job.id} ({job.name})")
        return 0
    store.request_cancel(job.id)
    pid = _wake_daemon(settings)
    if job.state == "interrupted" and not pid:
        store.transition(job.id, "cancelled")
        print(f"cancelled {job.id} ({job.name})")
        return 0
    print(f"cancelling {job.id} ({job.name}): the trainer stops at its next step")
    return 0


def cmd_retry(settings: Settings, args) -> int:
    from daemon.queue import Queue

    _log_to_file(settings)
    store = _store(settings)
    job = _find_job(store, args.job)
    if job.state not in ("failed", "cancelled", "interrupted"):
        raise UsageError(f"job {job.id} is {job.state}; only failed, cancelled or interrupted jobs can be retried")
    if job.settings.get("intake") == "refused":
        raise UsageError(
            f"{job.dataset} was refused at intake ({job.dataset_path}/FAILED.txt says why); "
            f"fix it, then create READY again (or: lorad enqueue '{job.dataset_path}')"
        )
    job = store.transition(job.id, "queued", attempt=job.attempt + 1, error=None)
    Queue(settings.queue_db).enqueue(job.id, job.priority, job.ready_at)
    pid = _wake_daemon(settings)
    print(f"queued {job.id} again (attempt {job.attempt})" + ("" if pid else "; it runs when lorad runs"))
    return 0


def cmd_plan(settings: Settings, args) -> int:
    from daemon.pipeline import machine_now, make_engine
    from engines.base import JobInput, PlanError

    image_count, max_side, options = 20, 1024, {}
    model = settings.model
    if args.path is not None:
        from daemon.intake.validate import validate_dataset

        report = validate_dataset(args.path)
        image_count = len(report.images) or image_count
        max_side = max((max(i.width, i.height) for i in report.images), default=max_side)
        options = report.options
        model = options.get("model", model)
    machine = machine_now(args.ram_gb if args.ram_gb is not None else settings.ram_gb)
    engine = make_engine(settings)
    job = JobInput("plan", "plan", "x", model, image_count, max_side, options, Path("/tmp/lorad-plan/data"), "")
    try:
        plan = engine.plan(job, machine)
    except PlanError as exc:
        print(f"lorad plan: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        data = plan.to_dict()
        data.pop("config")
        print(json.dumps(data, indent=2))
        return 0
    print(f"model        {model} ({image_count} images, max side {max_side})")
    print(f"engine       {plan.engine}")
    for line in plan.summary:  # the engine's own lines: backend, device, memory, its knobs
        print(line)
    print(f"steps        {plan.total_steps}")
    print(f"reason       {plan.reason}")
    for warning in plan.warnings:
        print(f"warning      {warning}")
    return 0


def cmd_logs(settings: Settings, args) -> int:
    from daemon.logview import show

    return show(settings.log_file, lines=args.lines, follow=args.follow, job=args.job, raw=args.json)


def cmd_service(settings: Settings, args) -> int:
    from daemon import service

    code = service.main(settings, args)
    if args.action == "status" and code == 0:
        args.json, args.all = False, False
        return cmd_status(settings, args)  # here, not in service.py: service never imports commands
    return code


def cmd_selftest(settings: Settings, args) -> int:
    from daemon.selftest import run_selftest

    return run_selftest(clean=args.clean)


def cmd_doctor(settings: Settings, args) -> int:
    from daemon.doctor import exit_code, run_checks

    checks = run_checks(settings)
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    for check in checks:
        print(f"[{marks[check.status.value]}] {check.name:<9} {check.detail}")
    code = exit_code(checks)
    print("lorad can run here" if code == 0 else "lorad cannot train here until the FAIL lines are fixed")
    return code
