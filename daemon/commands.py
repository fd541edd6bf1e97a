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

    logs.configure(
        level=settings.log_level, log_file=settings.log_file, console=False, secrets=logs.secrets_of(settings)
    )


def _store(settings: Settings, *, must_exist: bool = True):
    from daemon.jobs import JobStore

    if must_exist and not settings.jobs_db.exists():
        return None
    return JobStore(settings.jobs_db, check=False, jobs_dir=settings.jobs_dir)


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
    from daemon.intake.validate import limits, validate_dataset

    path = args.path
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if not path.is_dir():
        raise UsageError(
            f"{path} is not a folder; pass a dataset folder (assets/training_data/<trigger>_<name>)"
        )
    report = validate_dataset(path, **limits(settings))
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


def _enqueue_defaults(settings: Settings, folder: Path) -> tuple[int, int, str] | str:
    """(rank, steps, one-line summary) that a plain READY would train with (lora.toml's options,
    else the engine's plan for this dataset on this machine), or why there is no plan here."""
    model, images, max_side, options, plan = _dataset_plan(
        settings, folder, ram_gb=settings.ram_gb, read_ready=False
    )
    if isinstance(plan, Exception):
        return f"{model}, {images} images; no plan on this machine: {plan}"
    from daemon.pipeline import make_engine

    rank = int(
        options.get("rank") or make_engine(settings).adapter_metadata(plan).get("ss_network_dim") or 16
    )
    return rank, plan.total_steps, f"{model}, {images} images (max side {max_side} px), {plan.tier} plan"


def cmd_enqueue(settings: Settings, args) -> int:
    folder = args.path
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a dataset folder")
    options = {}
    model = getattr(args, "model", None)
    if model is not None:
        from engines.base import engine_class

        known = engine_class(settings.engine).models
        if model not in known:
            raise UsageError(f"unknown model {model!r}; known: {', '.join(known)}")
        options["model"] = model
    for key in ("rank", "alpha", "epochs", "steps", "learning_rate", "resolution", "priority", "name"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.force:
        options["force"] = True
    if not options and not args.yes and sys.stdin.isatty():
        # Ask with the values a plain READY trains with; keep only what the user changed, so
        # pressing Enter is exactly `touch READY` (same settings, same fingerprint).
        defaults = _enqueue_defaults(settings, folder)
        if isinstance(defaults, str):  # nothing to offer: READY as is fails with the same reason
            print(f"{folder.name}: {defaults}")
        else:
            rank, steps, summary = defaults
            print(f"{folder.name}: {summary}\nPress Enter to keep a value.")
            for key, prompt, default in (("rank", "LoRA rank", rank), ("steps", "training steps", steps)):
                answer = _ask_int(prompt, default)
                if answer != default:
                    options[key] = answer
    print(write_ready(folder, options))
    return 0


def write_ready(folder: Path, options: dict) -> str:
    """Write READY with these options into a dataset folder (the user's own drop, done for them):
    `lorad enqueue` and the dashboard's "re-train with force" both come here. Returns what to say."""
    from daemon.fsutil import atomic_write_text
    from daemon.intake.options import parse_options, render_ready

    text = render_ready(options)
    _, problems = parse_options(text, "READY", allow_force=True)
    if problems:
        raise UsageError("; ".join(p.message for p in problems))
    atomic_write_text(folder / "READY", text)
    return f"READY written to {folder / 'READY'}" + (
        f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
    )


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
    code, message = cancel_job(settings, store, job)
    print(message if code == 0 else f"lorad cancel: {message}", file=sys.stdout if code == 0 else sys.stderr)
    return code


def cancel_job(settings: Settings, store, job) -> tuple[int, str]:
    """(exit code, what to say) of cancelling `job`; `lorad cancel` and the dashboard both call it.

    Decided in one transaction against the job's state at that moment, so a cancel that
    says so is honoured: a running job stops at its next step or phase boundary and publishes
    nothing. A job already publishing is too late to cancel (non-zero exit)."""
    action, job = store.cancel(job.id)
    if action == "finished":
        return 1, f"job {job.id} is already {job.state}; nothing to cancel"
    if action == "too_late":
        return 1, (
            f"too late, job {job.id} ({job.name}) is publishing its LoRA; it will be done in a moment "
            f"(remove the LoRA from {settings.loras} afterwards if you do not want it)"
        )
    if action == "cancel":
        if job.remote.get("request_id"):  # its cloud request may still run (and bill)
            return 0, (
                f"cancelled {job.id} ({job.name}); its request on the cloud runs on until lorad next "
                f"starts, and is cancelled there then"
            )
        return 0, f"cancelled {job.id} ({job.name})"
    from engines.base import CANCEL_OUTCOME_FILE

    workdir = settings.jobs_dir / job.id
    (workdir / CANCEL_OUTCOME_FILE).unlink(missing_ok=True)  # only this cancel's outcome counts
    pid = _wake_daemon(settings)
    said = f"cancelling {job.id} ({job.name}, {job.state}): it stops at its next step and publishes nothing"
    if not pid:
        cloud = (
            "; its request on the cloud runs on until then, and is cancelled there then"
            if job.remote.get("request_id")
            else ""
        )
        return 0, said + f"; lorad is not running, so it is cancelled when lorad next starts{cloud}"
    if job.remote.get("request_id"):
        said += "; " + _cloud_cancel_outcome(settings, job, workdir)
    return 0, said


def _cloud_cancel_outcome(settings: Settings, job, workdir: Path) -> str:
    """A cloud job: wait (bounded by the engine's cancel_wait_s) for what the cloud did with the
    cancel, and say it: stopped, finished anyway (paid; retry publishes it), or still pending."""
    import time

    from daemon.pipeline import make_engine
    from engines.base import CANCEL_WORDS, read_cancel_outcome

    try:
        wait_s = float(getattr(make_engine(settings, job.settings.get("engine")), "cancel_wait_s", 60.0))
    except Exception:
        wait_s = 60.0
    deadline = time.monotonic() + wait_s + 10  # the daemon's own wait, and its next tick
    while time.monotonic() < deadline:
        outcome = read_cancel_outcome(workdir)
        if outcome:
            return CANCEL_WORDS[outcome].replace("JOB", job.id)
        time.sleep(0.2)
    return CANCEL_WORDS["still_pending"].replace("JOB", job.id)


def retry_lost_message(job_id: str, current: str | None) -> str:
    """What a `lorad retry` that lost its race to another process tells the user (pure)."""
    if current == "queued":
        return f"job {job_id} was already queued again by another retry; nothing to do"
    if current in ("preparing", "training", "rendering", "publishing"):
        return f"job {job_id} is already running again ({current}), queued by another retry"
    if current is None:
        return f"job {job_id} changed while this retry ran; run lorad status and try again"
    return f"job {job_id} became {current} while this retry ran; nothing done (lorad status shows it)"


def cmd_retry(settings: Settings, args) -> int:
    _log_to_file(settings)
    store = _store(settings)
    job = _find_job(store, args.job)
    code, message = retry_job(settings, store, job, resubmit=getattr(args, "resubmit", False))
    print(message if code == 0 else f"lorad retry: {message}", file=sys.stdout if code == 0 else sys.stderr)
    return code


def retry_job(settings: Settings, store, job, resubmit: bool = False) -> tuple[int, str]:
    """(exit code, what to say) of queueing `job` again; `lorad retry` and the dashboard both
    call it. UsageError when the job cannot be retried (its state, or refused at intake, or a
    cloud submission whose outcome is unknown, unless `resubmit`: paying again is explicit)."""
    from daemon.jobs import StateChanged
    from daemon.queue import Queue
    from engines.base import allow_resubmit, submission_uncertain

    if job.state not in ("failed", "cancelled", "interrupted"):
        raise UsageError(
            f"job {job.id} is {job.state}; only failed, cancelled or interrupted jobs can be retried"
        )
    if job.settings.get("intake") == "refused":
        raise UsageError(
            f"{job.dataset} was refused at intake ({job.dataset_path}/FAILED.txt says why); "
            f"fix it, then create READY again (or: lorad enqueue '{job.dataset_path}')"
        )
    workdir = settings.jobs_dir / job.id
    if submission_uncertain(workdir) and not resubmit:
        raise UsageError(
            f"job {job.id}: submission uncertain: its cloud training request may have been accepted and "
            f"billed (check the {job.settings.get('engine') or 'cloud'} dashboard). lorad retry {job.id} --resubmit "
            f"sends a new paid request"
        )
    if resubmit and submission_uncertain(workdir):
        allow_resubmit(workdir)
    try:  # compare-and-set: only the retry that finds the job still in the state read above wins
        job = store.transition(job.id, "queued", expect=job.state, attempt=job.attempt + 1, error=None)
    except StateChanged as exc:
        return 1, retry_lost_message(job.id, exc.current)
    if not settings.scale_out:  # with a Redis queue the coordinator dispatches from the table
        Queue(settings.queue_db).enqueue(job.id, job.priority, job.ready_at)
    pid = _wake_daemon(settings)
    return 0, f"queued {job.id} again (attempt {job.attempt})" + ("" if pid else "; it runs when lorad runs")


def _dataset_plan(settings: Settings, path: Path | None, *, ram_gb: float | None, read_ready: bool = True):
    """(model, image count, max side, options, plan or PlanError) for a dataset folder, as the
    daemon would plan it on this machine (the engine's own plan: pure, no mlx/mflux import)."""
    from daemon.pipeline import machine_now, make_engine
    from engines.base import JobInput, PlanError, TrainingPlan

    image_count, max_side, options, trigger = 20, 1024, {}, "x"
    model = settings.model
    if path is not None:
        from daemon.intake.validate import validate_dataset

        report = validate_dataset(path, read_ready=read_ready)
        image_count = len(report.images) or image_count
        max_side = max((max(i.width, i.height) for i in report.images), default=max_side)
        options = report.options
        model = options.get("model", model)
        trigger = report.trigger or trigger
    machine = machine_now(ram_gb)
    engine = make_engine(settings, str(options.get("engine") or settings.engine))  # the dataset's own
    job = JobInput(
        "plan", "plan", trigger, model, image_count, max_side, options, Path("/tmp/lorad-plan/data"), ""
    )
    plan: TrainingPlan | PlanError
    try:
        plan = engine.plan(job, machine)
    except PlanError as exc:
        plan = exc
    return model, image_count, max_side, options, plan


def cmd_plan(settings: Settings, args) -> int:
    ram = args.ram_gb if args.ram_gb is not None else settings.ram_gb
    model, image_count, max_side, _options, plan = _dataset_plan(settings, args.path, ram_gb=ram)
    if isinstance(plan, Exception):
        print(f"lorad plan: {plan}", file=sys.stderr)
        return 1
    if args.json:
        import json

        data = plan.to_dict()
        data.pop("config")
        print(json.dumps(data, indent=2))
        return 0
    print(f"model        {model} ({image_count} images, max side {max_side} px)")
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


def cmd_notify(settings: Settings, args) -> int:
    """`lorad notify test`: one test message to every target, one line each (URLs masked)."""
    if not settings.notify:
        print(
            'lorad notify: no notification targets: set notify = ["ntfy://..."] in lorad.toml or LORAD_NOTIFY',
            file=sys.stderr,
        )
        return 2
    from daemon import notify

    print(
        f"sending a test message to {len(settings.notify)} target(s), {settings.notify_timeout_s:g}s each at most"
    )
    outcomes = []
    for url in settings.notify:
        outcome = notify.deliver_one(url, notify.test_message(), settings.notify_timeout_s)
        outcomes.append(outcome)
        print(
            f"[{'ok  ' if outcome.ok else 'FAIL'}] {outcome.target}"
            + ("" if outcome.ok else f": {outcome.reason}"),
            flush=True,
        )
    failed = sum(not o.ok for o in outcomes)
    print("every target answered" if not failed else f"{failed} of {len(outcomes)} target(s) failed")
    return 1 if failed else 0


def _queue_url(settings: Settings, args) -> str:
    url = getattr(args, "queue", None) or settings.queue
    if not url or not url.startswith(("redis://", "rediss://")):
        raise UsageError(
            "needs a Redis queue: --queue redis://host:6379/0 (or the queue setting / LORAD_QUEUE)"
        )
    from daemon.remote.redisurl import InvalidRedisURL, parse

    try:
        parse(url)
    except InvalidRedisURL as exc:
        raise UsageError(str(exc)) from None
    return url


def worker_settings(settings: Settings) -> Settings:
    """A worker's own state dir: --state-dir / LORAD_STATE_DIR, else <state>/remote-worker."""
    if settings.state_dir is not None:
        return settings
    from daemon.settings import FIELDS

    values = {name: getattr(settings, name) for name in FIELDS}
    values["state_dir"] = settings.state / "remote-worker"
    return Settings(**values)


def cmd_worker(settings: Settings, args) -> int:
    from daemon.remote.worker import run_worker

    url = _queue_url(settings, args)
    return run_worker(worker_settings(settings), url)


def worker_rows(workers: list[dict], now: float) -> list[str]:
    """`lorad workers` as a table (pure)."""
    from daemon.status import duration

    if not workers:
        return ["no live workers (start one: lorad worker --queue <url>)"]
    lines = [
        f"{'WORKER':<22} {'HOST':<18} {'BACKEND':<8} {'DEVICE':<24} {'PLATFORM':<16} {'MEMORY':>8} {'JOB':<22} {'BEAT':>6}"
    ]
    for w in sorted(workers, key=lambda w: w.get("id", "")):
        try:
            age = duration(now - float(w.get("beat") or now))
        except ValueError:
            age = "-"
        memory = f"{w.get('memory_gb', '-')} GB"
        lines.append(
            f"{w.get('id', '-'):<22} {w.get('host', '-')[:18]:<18} {w.get('backend', '-'):<8} {w.get('device', '-')[:24]:<24} "
            f"{w.get('platform', '-')[:16]:<16} {memory:>8} {w.get('job') or 'idle':<22} {age:>6}"
        )
    return lines


def cmd_workers(settings: Settings, args) -> int:
    from daemon.remote import lease
    from daemon.remote.redisurl import make_client, mask

    url = _queue_url(settings, args)
    client = make_client(url, socket_timeout=5.0)
    try:
        workers = []
        for key in client.scan_iter(match=lease.worker_key("*"), count=100):
            values = {_str(k): _str(v) for k, v in client.hgetall(key).items()}
            if values.get("id"):
                workers.append(values)
    except Exception as exc:
        print(f"lorad workers: cannot read {mask(url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps({"queue": mask(url), "workers": workers}, indent=2))
        return 0
    print(f"queue: {mask(url)}")
    print("\n".join(worker_rows(workers, time.time())))
    return 0


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def cmd_ui(settings: Settings, args) -> int:
    """Open the dashboard the running daemon serves (python's webbrowser); print its URL."""
    from daemon.lock import running_daemon_pid

    if settings.ui is None:
        raise UsageError('the dashboard is off (ui = false); set ui = "127.0.0.1:8765" and restart lorad')
    from daemon.settings import parse_ui_address

    host, port = parse_ui_address(settings.ui)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    opened = url + (f"?token={settings.ui_token}" if settings.ui_token else "")
    print(url + ("?token=***" if settings.ui_token else ""))
    if not running_daemon_pid(settings.state):
        print(
            "lorad is not running: start it (lorad run, or lorad service start) to serve the dashboard",
            file=sys.stderr,
        )
    if not getattr(args, "print_only", False):
        import webbrowser

        if not webbrowser.open(opened):
            print("no browser found here: open the URL above", file=sys.stderr)
    return 0
