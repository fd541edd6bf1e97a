"""The verbs behind `lorad <command>`: thin, each importing only what it uses."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from daemon.actions import (  # noqa: F401 (moved there; `lorad` callers and tests import them here)
    UsageError,
    _wake_daemon,
    cancel_job,
    retry_job,
    retry_lost_message,
    write_ready,
)
from daemon.settings import Settings
from daemon.states import JobState


def say_settings(settings: Settings) -> None:
    """On stderr, when the running daemon's settings were used: say so, with the model and what
    set it (stdout stays what scripts parse)."""
    from daemon.settings import DAEMON_SOURCE

    source = settings.sources.get("model", "")
    if any(src.startswith(DAEMON_SOURCE) for src in settings.sources.values()):
        print(f"lorad: using the running daemon's settings (model {settings.model} from "
              f"{source.removeprefix(DAEMON_SOURCE)}; lorad config lists them)", file=sys.stderr)  # fmt: skip


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


def cmd_run(settings: Settings, args) -> int:
    from daemon.daemon import run
    from daemon.settings import default_state_dir

    config = getattr(args, "config", None)
    return run(settings, default_state_dir(Path(config) if config else None))


def cmd_status(settings: Settings, args) -> int:
    from daemon.status import render_status

    store = _store(settings)
    jobs = store.list() if store else []
    from daemon.lock import running_daemon_pid

    pid = running_daemon_pid(settings.state)
    model, source = daemon_model(settings) if pid else (None, None)
    daemon = {"pid": pid, "model": model, "model_source": source} if pid else None
    text = render_status(
        jobs, show_all=args.all, as_json=args.json, daemon_pid=pid, now=time.time(), daemon=daemon
    )
    if pid and not args.json:  # which model the daemon trains, and what set it
        head, _, rest = text.partition("\n")
        text = f"{head}, model {model} from {source}" + ("\n" + rest if rest else "")
    print(text)
    return 0


def daemon_model(settings: Settings) -> tuple[str, str]:
    """(model, its source in the daemon, e.g. "LORAD_MODEL"): what the running daemon trains."""
    from daemon import effective

    record = effective.running_record(settings.state) or {}
    values, sources = record.get("settings") or {}, record.get("sources") or {}
    model = values.get("model", settings.model)
    source = sources.get("model") or settings.sources.get("model", "default")
    return str(model), str(source)


def cmd_config(settings: Settings, args) -> int:
    """`lorad config`: every effective setting and where it came from, secrets masked."""
    from daemon import effective
    from daemon.engine_host import engine_setting_rows
    from daemon.settings import KEYS

    rows = [(key, effective.mask_value(key, getattr(settings, key)), settings.sources.get(key, "default"))
            for key in KEYS]  # fmt: skip
    rows.append(("state (folder)", str(settings.state), settings.sources.get("state_dir", "default")))
    rows += [
        (key, effective.mask_value(key, value), src) for key, value, src in engine_setting_rows(settings)
    ]
    record = effective.running_record(settings.state)
    daemon = f"running (pid {record['pid']})" if record else "not running"
    if args.json:
        import json

        print(
            json.dumps(
                {"daemon": daemon, "settings": {k: {"value": v, "source": src} for k, v, src in rows}},
                indent=2,
            )
        )
        return 0
    print(f"daemon: {daemon}")
    width = max(len(k) for k, _v, _s in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {value}  ({source})")
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
        if report.uncaptioned and report.valid:
            model = report.options.get("caption_model", settings.caption_model)
            print(
                f"{len(report.uncaptioned)} images have no caption: {model} captions them before training "
                '(missing_captions = "vlm")'
            )
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
    model, images, max_side, options, plan, _bytes = _dataset_plan(
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
    say_settings(settings)
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


def cmd_retry(settings: Settings, args) -> int:
    _log_to_file(settings)
    store = _store(settings)
    job = _find_job(store, args.job)
    code, message = retry_job(settings, store, job, resubmit=getattr(args, "resubmit", False))
    print(message if code == 0 else f"lorad retry: {message}", file=sys.stdout if code == 0 else sys.stderr)
    return code


def _dataset_plan(
    settings: Settings, path: Path | None, *, ram_gb: float | None, read_ready: bool = True, images: int = 20
):
    """(model, image count, max side, options, plan or PlanError, snapshot bytes) for a dataset
    folder, as the daemon would plan it on this machine (the engine's own plan: pure, no mlx/mflux
    import). Without a folder the snapshot is assumed at 2 MB an image."""
    from daemon.pipeline import machine_now, make_engine
    from engines.base import JobInput, PlanError, TrainingPlan

    image_count, max_side, options, trigger = images, 1024, {}, "x"
    data_bytes = images * 2 * 1024 * 1024
    model = settings.model
    if path is not None:
        from daemon.intake.validate import validate_dataset
        from daemon.space import snapshot_bytes

        report = validate_dataset(path, read_ready=read_ready)
        image_count = len(report.images) or image_count
        max_side = max((max(i.width, i.height) for i in report.images), default=max_side)
        options = report.options
        model = options.get("model", model)
        trigger = report.trigger or trigger
        data_bytes = snapshot_bytes(report.images, report.captions)
    machine = machine_now(ram_gb)
    engine = make_engine(settings, str(options.get("engine") or settings.engine))  # the dataset's own
    job = JobInput(
        "plan", "plan", trigger, model, image_count, max_side, options, Path("/tmp/lorad-plan/data"), ""
    )
    plan: TrainingPlan | PlanError
    try:
        plan = engine.plan(job=job, machine=machine)
    except PlanError as exc:
        plan = exc
    return model, image_count, max_side, options, plan, data_bytes


def workdir_bytes(settings: Settings, plan, data_bytes: int) -> int:
    """What the job's work dir holds when it is done, kept keep_workdirs_days: the dataset copy,
    what training writes (the engine's estimate: checkpoints, adapter) and a margin."""
    from daemon.pipeline import make_engine
    from daemon.space import space_needed

    engine_bytes = make_engine(settings, plan.engine).disk_needed(
        plan=plan, workdir=Path("/nonexistent/lorad-plan")
    )
    return data_bytes + space_needed("train", engine_bytes=engine_bytes)


def cmd_plan(settings: Settings, args) -> int:
    images = getattr(args, "images", None)
    if args.path is None and images is None:
        raise UsageError(
            "which dataset? give its folder (lorad plan assets/training_data/<trigger>_<name>) "
            "or plan for a number of images without one: lorad plan --images N"
        )
    if images is not None and images < 1:
        raise UsageError(f"--images must be 1 or more, got {images}")
    if args.path is not None and not args.path.is_dir():
        raise UsageError(f"{args.path} is not a dataset folder")
    say_settings(settings)
    ram = args.ram_gb if args.ram_gb is not None else settings.ram_gb
    model, image_count, max_side, _options, plan, data_bytes = _dataset_plan(
        settings, args.path, ram_gb=ram, images=images or 20
    )
    if isinstance(plan, Exception):
        print(f"lorad plan: {plan}", file=sys.stderr)
        return 1
    from daemon.estimate import estimate
    from daemon.status import duration

    store = _store(settings)
    seconds, source, words = estimate(plan, store.list((JobState.DONE,)) if store else [], settings.jobs_dir)
    disk = workdir_bytes(settings, plan, data_bytes)
    if args.json:
        import json

        data = plan.to_dict()
        data.pop("config")
        data.update(duration_s=round(seconds), duration_source=source, duration_basis=words,
                    workdir_bytes=disk, keep_workdirs_days=settings.keep_workdirs_days)  # fmt: skip
        print(json.dumps(data, indent=2))
        return 0
    print(f"model        {model} ({image_count} images, max side {max_side} px)")
    print(f"engine       {plan.engine}")
    for line in plan.summary:  # the engine's own lines: backend, device, memory, its knobs
        print(line)
    print(f"steps        {plan.total_steps}")
    print(f"duration     about {duration(seconds)} ({source}: {words})")
    from daemon.space import human

    print(f"disk         about {human(disk)} in its work dir (dataset copy, checkpoints), kept "
          f"{settings.keep_workdirs_days:g} days (keep_workdirs_days), then pruned to its renders")  # fmt: skip
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
    say_settings(settings)
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
    import urllib.parse

    from daemon.settings import parse_ui_address

    say_settings(settings)
    host, port = parse_ui_address(settings.ui)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    # The token may hold + / = (a base64 secret): encoded, or the dashboard reads another token.
    opened = url + (f"?token={urllib.parse.quote(settings.ui_token, safe='')}" if settings.ui_token else "")
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


def cmd_prune(settings: Settings, args) -> int:
    """`lorad prune [--dry-run]`: apply keep_jobs and keep_workdirs_days now (daemon/retention.py)."""
    from daemon import retention
    from daemon.space import human

    store = _store(settings)
    if store is None:
        print("nothing to prune (no jobs database)")
        return 0
    if not args.dry_run:
        _log_to_file(settings)
    actions = retention.plan_actions(settings, store)
    if not args.dry_run:
        from daemon.logs import get_logger

        retention.apply(settings, store, actions, get_logger())
    verb = "would remove" if args.dry_run else "removed"
    for action in actions:
        what = "job hidden, work dir" if action.kind == "drop" else "work dir pruned to its renders"
        print(
            f"{action.job_id}  {what}: {verb} {len(action.paths)} item(s), {human(action.bytes)} ({action.reason})"
        )
        for path in action.paths:
            print(f"    {path}")
    total = sum(a.bytes for a in actions)
    print(f"{'would free' if args.dry_run else 'freed'} {human(total)} in {len(actions)} job(s); "
          f"keep_jobs = {settings.keep_jobs}, keep_workdirs_days = {settings.keep_workdirs_days:g}")  # fmt: skip
    return 0
