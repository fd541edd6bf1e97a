"""`lorad worker --queue URL`: train jobs from a coordinator's Redis queue on this machine.

A worker has its own state dir and shares nothing with the coordinator but the queue URL. It
reads the queue in order, plans each offer with its own engine and memory (Engine.plan with this
machine), and claims the first it can fit together with its lease (lease.CLAIM). An offer it
cannot fit is declined once, with the reason, for the coordinator's `waiting:` line, and left in
the queue for a bigger worker. Then: snapshot (and the newest checkpoint that reached the
coordinator) in, then the same JobRunner as the local pipeline (daemon/runner.py: disk check,
train, step_down once, render) with WorkerEvents: progress and every checkpoint out while training, the adapter, renders and report out
at the end. Every write is fenced by the job's token (daemon/remote/lease.py): a worker whose
lease was lost stops training and its results are never published. Workers never touch the
LoRA folder or the registry: the coordinator verifies and publishes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.logs import get_logger
from daemon.pipeline import machine_now, make_engine
from daemon.remote import lease
from daemon.remote.messages import MessageRefused, Offer
from daemon.runner import FailKind, JobRunner, RunResult
from daemon.settings import Settings, SettingsError
from engines.base import (
    CheckStatus,
    Engine,
    JobInput,
    PlanError,
    Progress,
    StopToken,
    TrainingPlan,
)
from lorad_base.workdir import WorkDir

FENCED = "fenced"


class Fenced(Exception):
    """The job's token is no longer ours: stop, publish nothing."""


def safe_relative(rel: str) -> PurePosixPath | None:
    """A relative path that stays inside its folder, or None (pure): no `..`, no absolute path."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel:
        return None
    return path


def worker_id_for(state: Path) -> str:
    """A stable id for this worker (host + a random suffix kept in its state dir)."""
    path = state / "worker.id"
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except OSError:
        pass
    from daemon.fsutil import atomic_write_text

    value = f"{socket.gethostname().split('.')[0]}-{os.urandom(3).hex()}"
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, value + "\n")
    return value


class RemoteWorker:
    """One worker: one job at a time. `run()` until `shutdown` is set."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        *,
        shutdown: threading.Event | None = None,
        name: str | None = None,
    ):
        from daemon.remote.redisqueue import RedisQueue, client_pair
        from daemon.remote.transfer import ArtifactStore

        self.settings = settings
        self.url = url
        self.shutdown = shutdown or threading.Event()
        self.state = settings.state
        self.id = name or worker_id_for(self.state)
        self.log = get_logger().bind(worker=self.id)
        self.client, pool = client_pair(url, name=f"lorad-worker-{self.id}")
        self.queue = RedisQueue(pool, self.client)
        self.files = ArtifactStore(self.client)
        self.scripts = lease.Scripts(self.client)
        self.ttl_s = settings.lease_ttl_s
        self.beat_s = lease.beat_interval(self.ttl_s)
        self.refused: set[bytes] = set()  # queue entries whose offer was refused (logged once)
        self.declined: dict[str, str] = {}  # job id -> token declined (declined once per dispatch)
        self.current: dict[str, Any] | None = None  # {job_id, token, stop}
        self._lock = threading.Lock()
        self.engines: dict[str, Engine] = {}
        self.backend = "-"
        self.device = "-"
        self.jobs_dir = self.state / "work"

    # -- heartbeat, lease ----------------------------------------------------------------------

    def _engine(self, name: str) -> Engine:
        if name not in self.engines:
            self.engines[name] = make_engine(self.settings, name)
        return self.engines[name]

    def _models(self) -> list[str]:
        try:
            engine = self._engine(self.settings.engine)
        except SettingsError:
            return []
        return [m for m in engine.models if engine.model_check(m).status is CheckStatus.OK]

    def heartbeat_fields(self) -> dict[str, str]:
        machine = machine_now(self.settings.ram_gb)
        memory = machine.memory_override_gb if machine.memory_override_gb is not None else machine.total_gb
        current = self.current
        return {
            "id": self.id,
            "host": socket.gethostname(),
            "platform": f"{platform.system()} {platform.machine()}",
            "backend": self.backend,
            "device": self.device,
            "memory_gb": f"{memory:.1f}",
            "engine": self.settings.engine,
            "models": ",".join(self._models_cache),
            "job": current["job_id"] if current else "",
            "beat": f"{time.time():.3f}",
            "pid": str(os.getpid()),
        }

    def beat(self) -> None:
        """Heartbeat hash with a TTL, and the current job's lease renewal (fenced)."""
        key = lease.worker_key(self.id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=self.heartbeat_fields())
        pipe.pexpire(key, int(self.ttl_s * 1000))
        pipe.execute()
        current = self.current
        if current is not None and not current.get("released"):
            renewed = self.scripts.renew(
                keys=[lease.token_key(current["job_id"]), lease.lease_key(current["job_id"])],
                args=[
                    current["token"],
                    lease.lease_value(self.id, current["token"], time.time(), self.ttl_s),
                    int(self.ttl_s * 1000),
                ],
            )
            if not renewed:
                self._fenced(current, "lease renewal refused")

    def _fenced(self, current: dict, why: str) -> None:
        if not current.get("fenced"):
            current["fenced"] = True
            self.log.warning("worker.fenced", job_id=current["job_id"], reason=why)
        current["stop"].stop(FENCED)

    def _beat_loop(self) -> None:
        failing = False
        while not self.shutdown.is_set():
            try:
                self.beat()
                if failing:
                    self.log.info("worker.redis_back")
                failing = False
            except Exception as exc:  # Redis down: keep training, keep trying (bounded calls)
                if not failing:
                    self.log.warning("worker.redis_unreachable", error=f"{type(exc).__name__}: {exc}")
                failing = True
            self._wake_beat.wait(self.beat_s)
            self._wake_beat.clear()

    # -- events (fenced) -----------------------------------------------------------------------

    def emit(self, current: dict, kind: str, **data: Any) -> bool:
        """A fenced event to the coordinator; False (and the job stops) when the token is not ours."""
        fields = ["job", current["job_id"], "token", current["token"], "kind", kind, "worker", self.id,
                  "data", json.dumps(data, default=str)]  # fmt: skip
        entry = self.scripts.fenced_xadd(
            keys=[lease.token_key(current["job_id"]), lease.EVENTS],
            args=[current["token"], lease.EVENTS_MAXLEN, *fields],
        )
        if entry is None:
            self._fenced(current, f"{kind} refused")
            return False
        return True

    def emit_retrying(self, current: dict, kind: str, **data: Any) -> bool:
        """An event that must arrive (stopped, failed, done): retried while Redis is down, bounded."""
        delay, deadline = 0.5, time.monotonic() + max(60.0, 4 * self.ttl_s)
        while True:
            try:
                return self.emit(current, kind, **data)
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.log.error("worker.event_lost", job_id=current["job_id"], kind=kind, error=str(exc))
                    return False
                self.log.warning(
                    "worker.event_retry",
                    job_id=current["job_id"],
                    kind=kind,
                    error=str(exc),
                    retry_in_s=delay,
                )
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    # -- the loop ------------------------------------------------------------------------------

    def _probe_device(self) -> None:
        """Backend and device for `lorad workers`, from the engine's own doctor check (its probe
        runs in a child: no ML import here). Best effort, once, off the main loop."""
        try:
            engine = self._engine(self.settings.engine)
            checks = engine.doctor_checks(
                model=self.settings.model, machine=machine_now(self.settings.ram_gb)
            )
        except Exception as exc:
            self.log.warning("worker.probe_failed", error=f"{type(exc).__name__}: {exc}")
            return
        detail = next((c.detail for c in checks if c.name == "backend"), "")
        backend, _, rest = detail.partition(":")
        if rest:
            self.backend, self.device = backend.strip(), rest.split(";")[0].strip()
            self._wake_beat.set()

    def run(self) -> int:
        self._models_cache = self._models()
        self._wake_beat = threading.Event()
        beat = threading.Thread(target=self._beat_loop, name="lorad-worker-beat", daemon=True)
        beat.start()
        threading.Thread(target=self._probe_device, name="lorad-worker-probe", daemon=True).start()
        self.log.info("worker.started", host=socket.gethostname(), queue=_masked(self.url), state=str(self.state),
                      engine=self.settings.engine, models=self._models_cache, pid=os.getpid())  # fmt: skip
        pubsub = None
        delay = 0.5
        while not self.shutdown.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(lease.WAKE)
                if self.take_one():
                    delay = 0.5
                    continue
                # Idle: block on the wake channel (no polling); rescan at least every beat.
                pubsub.get_message(timeout=self.beat_s)
                delay = 0.5
            except Exception as exc:
                self.log.warning(
                    "worker.redis_unreachable", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay
                )
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                pubsub = None
                self.shutdown.wait(delay)
                delay = min(10.0, delay * 2)
        try:
            self.client.delete(lease.worker_key(self.id))
        except Exception:
            pass
        self._wake_beat.set()
        self.log.info("worker.stopped")
        return 0

    def take_one(self) -> bool:
        """Claim the first queued offer this worker can fit and run it; False when there is none."""
        for entry in self.queue.entries():
            if self.shutdown.is_set():
                return False
            offer = self.checked_offer(entry)
            if offer is None:
                continue
            job_id, token = offer.job_id, offer.token
            if self.declined.get(job_id) == token:
                continue
            workdir = self.jobs_dir / job_id  # the id grammar makes this one folder inside jobs_dir
            plan_or_reason = self.plan_offer(offer, workdir)
            if not isinstance(plan_or_reason, TrainingPlan):
                self.decline(offer, plan_or_reason)
                continue
            claimed = self.queue.claim(
                entry.member,
                job_id=job_id,
                token=token,
                lease_value=lease.lease_value(self.id, token, time.time(), self.ttl_s),
                ttl_ms=int(self.ttl_s * 1000),
            )
            if claimed == 1:
                self.run_offer(offer, plan_or_reason, workdir)
                return True
            if claimed == -1:
                self.log.info("worker.stale_offer", job_id=job_id)
        return False

    def checked_offer(self, entry) -> Offer | None:
        """The queued offer through its one validating constructor; a forged one is refused (logged
        once per queue entry) and skipped: it never names a folder this worker writes or deletes."""
        try:
            return Offer.from_dict(entry.offer)
        except MessageRefused as exc:
            if entry.member not in self.refused:
                if len(self.refused) > 1000:
                    self.refused.clear()
                self.refused.add(entry.member)
                self.log.warning("worker.offer_refused", field=exc.field, reason=exc.why,
                                 job_id=str(entry.offer.get("job_id"))[:80])  # fmt: skip
            return None

    def plan_offer(self, offer: Offer, workdir: Path) -> TrainingPlan | PlanError:
        """This machine's plan for the offer, or why it cannot train it (never downloads)."""
        try:
            engine = self._engine(offer.engine)
        except SettingsError as exc:
            return PlanError(f"engine {offer.engine!r}: {exc}")
        check = engine.model_check(offer.model)
        if check.status is not CheckStatus.OK and not self.settings.download_models:
            return PlanError(f"{check.detail} (download_models is off on worker {self.id})")
        try:
            plan = engine.plan(job=job_spec(offer, workdir), machine=machine_now(self.settings.ram_gb))
        except PlanError as exc:
            return exc
        self.backend = plan.backend
        return plan

    def decline(self, offer: Offer, why: PlanError) -> None:
        job_id = offer.job_id
        self.declined[job_id] = offer.token
        record = {
            "reason": str(why),
            "needs_gb": why.needs_gb,
            "has_gb": why.has_gb,
            "token": offer.token,
            "at": time.time(),
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(lease.declined_key(job_id), self.id, json.dumps(record))
        pipe.expire(lease.declined_key(job_id), 7 * 86400)
        pipe.execute()
        self.emit({"job_id": job_id, "token": offer.token, "stop": StopToken()}, "declined", **record)
        self.log.info("worker.declined", job_id=job_id, reason=str(why))

    # -- one job -------------------------------------------------------------------------------

    def run_offer(self, offer: Offer, plan: TrainingPlan, workdir: Path) -> None:
        job_id = offer.job_id
        stop = StopToken()
        current = {"job_id": job_id, "token": offer.token, "stop": stop}
        with self._lock:
            self.current = current
        self._wake_beat.set()  # the heartbeat names the job now
        log = self.log.bind(job_id=job_id)
        stopper = threading.Thread(target=self._stop_on_shutdown, args=(stop,), daemon=True)
        stopper.start()
        try:
            log.info("worker.claimed", token=offer.token, plan_tier=plan.tier, total_steps=plan.total_steps)
            if not self.emit(current, "accepted", plan=plan.to_dict(), host=socket.gethostname()):
                return
            self.fetch_inputs(offer, workdir)
            self.train_and_deliver(offer, plan, workdir, current, log)
        except Fenced:
            log.warning("worker.fenced_stop")
        except Exception as exc:
            log.exception("worker.job_crashed")
            if not current.get("fenced"):
                self.emit_retrying(current, "failed", error=f"worker {self.id}: {type(exc).__name__}: {exc}")
        finally:
            current["released"] = True
            with self._lock:
                self.current = None
            stop.stop("done")
            shutil.rmtree(workdir, ignore_errors=True)
            self._wake_beat.set()

    def _stop_on_shutdown(self, stop: StopToken) -> None:
        while not stop.wait(0.5):
            if self.shutdown.is_set():
                stop.stop("shutdown")
                return

    def fetch_inputs(self, offer: Offer, workdir: Path) -> None:
        """A fresh work dir: snapshot, manifest, and the saved state to resume from (if any)."""
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.files.get_tree(offer.snapshot, WorkDir(workdir).data)
        self.files.get_file(offer.manifest, WorkDir(workdir).manifest)
        for item in offer.state:  # Offer.from_dict: inside the saved-state areas only
            dest = workdir / item.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.files.get_file(item.ref, dest)

    def train_and_deliver(self, offer: Offer, plan: TrainingPlan, workdir: Path, current: dict, log) -> None:
        """The offer's run through the one JobRunner (daemon/runner.py), its news as fenced events."""
        engine = self._engine(offer.engine)
        events = WorkerEvents(self, offer, engine, workdir, current, log)
        machine = machine_now(self.settings.ram_gb)
        runner = JobRunner(self.settings, engine, job_spec(offer, workdir), WorkDir(workdir), machine,
                           current["stop"], events, log=log, engines=lambda _s, name: self._engine(name))  # fmt: skip
        try:
            runner.run(plan)
        finally:
            events.close()

    def release(self, current: dict) -> None:
        try:
            self.scripts.release(
                keys=[lease.token_key(current["job_id"]), lease.lease_key(current["job_id"])],
                args=[current["token"]],
            )
        except Exception:
            pass  # it lapses by itself


class WorkerEvents:
    """The Redis worker's RunEvents: each one a fenced event to the coordinator (a lost lease
    raises Fenced: stop, deliver nothing), checkpoints sent while training (CheckpointUploader),
    the result's files uploaded before `done`."""

    def __init__(self, worker: RemoteWorker, offer: Offer, engine: Engine, workdir: Path, current: dict, log):
        self.worker, self.offer, self.engine, self.workdir = worker, offer, engine, workdir
        self.current, self.log = current, log
        self.uploader: CheckpointUploader | None = None
        self.remote: RemoteProgress | None = None
        self.step: int | None = None  # the step training ended at (a stopped render reports it)

    def planned(self, plan: TrainingPlan, engine: Engine, fallback_from: str | None) -> None:
        """`accepted` already carried the plan (run_offer), before the inputs were fetched."""

    def training(self) -> bool:
        self.uploader = CheckpointUploader(self.worker, self.engine, self.workdir, self.current)
        self.remote = RemoteProgress(self.worker, self.current)
        return True

    def checkpoint(self) -> None:
        if self.uploader is not None:
            self.uploader.poke()

    def progress(self, p: Progress) -> None:
        if self.remote is not None:
            self.remote(p)

    def plan_changed(self, plan: TrainingPlan) -> None:
        self.worker.emit(self.current, "plan", plan=plan.to_dict())

    def training_over(self) -> None:
        self.close()
        if self.current.get("fenced") or self.current["stop"].reason == FENCED:
            raise Fenced()

    def rendering(self, step: int | None) -> bool:
        self.step = step
        if self.uploader is not None:
            self.uploader.upload_now()  # the final state: a lost result never means training again
        if not self.worker.emit(self.current, "rendering", step=step):
            raise Fenced()
        return True

    def adapter(self, plan: TrainingPlan, adapter: Path) -> Path:
        return adapter  # the coordinator stamps it when it publishes

    def done(self, result: RunResult) -> None:
        files, offer = self.worker.files, self.offer
        prefix = lease.files_key(offer.job_id, offer.token) + ":result"
        refs = {
            "adapter": files.put_file(f"{prefix}:adapter", result.adapter).to_dict(),
            "render": files.put_file(f"{prefix}:render", result.rendered.with_lora).to_dict(),
            "base": files.put_file(f"{prefix}:base", result.rendered.base).to_dict(),
            "compare": files.put_file(f"{prefix}:compare", result.rendered.compare).to_dict(),
        }
        report = [
            {"name": name, "ref": files.put_file(f"{prefix}:report:{i}", path).to_dict()}
            for i, (name, path) in enumerate(report_entries(result.report_files))
        ]
        if not self.worker.emit_retrying(self.current, "done", files=refs, report=report,
                                         plan=result.plan.to_dict(), step=result.step):  # fmt: skip
            raise Fenced()
        self.log.info("worker.delivered", step=result.step)

    def stopped(self, step: int | None, reason: str | None) -> None:
        if self.current.get("fenced"):
            raise Fenced()
        if self.uploader is not None:
            self.uploader.upload_now()  # the checkpoint written on the graceful stop travels too
        step = step if step is not None else self.step
        self.worker.emit_retrying(self.current, "stopped", step=step, reason=reason)
        self.worker.release(self.current)

    def failed(self, error: str, kind: FailKind, step: int | None = None) -> None:
        if kind is FailKind.RENDER:
            error = f"test render failed on worker {self.worker.id}: {error}"
        data: dict[str, Any] = {"error": error}
        if kind in (FailKind.TRAIN, FailKind.DISK_FULL):
            data["step"] = step
        self.worker.emit_retrying(self.current, "failed", **data)

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()


def report_entries(paths: list[Path]) -> list[tuple[str, Path]]:
    """(name, file) of each report file to send; a folder (samples/) as "<folder>/<file>" entries."""
    entries: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            entries += [(f"{path.name}/{f.name}", f) for f in sorted(path.iterdir()) if f.is_file()]
        else:
            entries.append((path.name, path))
    return entries


class RemoteProgress:
    """Progress to the coordinator at most once a second (and the last step), fenced (the
    runner's `checkpoint` event pokes the uploader with every report)."""

    def __init__(self, worker: RemoteWorker, current: dict):
        self.worker, self.current = worker, current
        self._last = float("-inf")
        self._failing = False

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < 1.0 and p.step < p.total:
            return
        self._last = now
        try:
            self.worker.emit(self.current, "progress", step=p.step, total=p.total, loss=p.loss, eta_s=p.eta_s)
            self._failing = False
        except Exception as exc:  # Redis down: training goes on; the lease decides
            if not self._failing:
                self.worker.log.warning("worker.progress_lost", job_id=self.current["job_id"], error=str(exc))
            self._failing = True


class CheckpointUploader:
    """Sends every new saved state (Engine.saved_state: its step and files from one look) to the
    coordinator on its own thread, so training never waits on the network; only the newest
    pending one is sent."""

    def __init__(self, worker: RemoteWorker, engine: Engine, workdir: Path, current: dict):
        self.worker, self.engine, self.workdir, self.current = worker, engine, workdir, current
        resumed = engine.saved_state(workdir)  # what we resumed from is there already
        self.sent_step: int | None = resumed.step if resumed is not None else None
        self._poke = threading.Event()
        self._closed = False
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lorad-ckpt-upload", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        state = self.engine.saved_state(self.workdir)
        if state is not None and state.step != self.sent_step:
            self._poke.set()

    def _loop(self) -> None:
        while not self._closed:
            if not self._poke.wait(1.0):
                continue
            self._poke.clear()
            self.upload_now(quiet=True)

    def upload_now(self, quiet: bool = False) -> None:
        with self._busy:
            if self.current.get("fenced"):
                return
            state = self.engine.saved_state(self.workdir)  # step and files from one look at the disk
            if state is None or not state.files or state.step == self.sent_step:
                return  # nothing new
            step, files = state.step, state.files
            job_id, token = self.current["job_id"], self.current["token"]
            try:
                items: list[dict] = []
                for path in files:
                    rel = path.relative_to(self.workdir).as_posix()
                    ref = self.worker.files.put_file(
                        f"{lease.files_key(job_id, token)}:state:{step}:{len(items)}", path
                    )
                    items.append({"rel": rel, "ref": ref.to_dict()})
                if self.worker.emit(self.current, "checkpoint", step=step, files=items):
                    self.sent_step = step
                    self.worker.log.info("worker.checkpoint_sent", job_id=job_id, step=step)
            except FileNotFoundError:
                pass  # pruned while we looked: the next one comes
            except Exception as exc:
                if not quiet:
                    raise
                self.worker.log.warning(
                    "worker.checkpoint_upload_failed", job_id=job_id, step=step, error=str(exc)
                )

    def close(self) -> None:
        self._closed = True
        self._poke.set()
        self._thread.join(30)


def job_spec(offer: Offer, workdir: Path) -> JobInput:
    return JobInput(
        job_id=offer.job_id,
        name=offer.name,
        trigger=offer.trigger,
        model=offer.model,
        image_count=offer.image_count,
        max_side=offer.max_side,
        options=dict(offer.options),
        data_dir=WorkDir(workdir).data,
        preview_prompt=offer.preview_prompt,
    )


def _masked(url: str) -> str:
    from daemon.remote.redisurl import mask

    return mask(url)


def run_worker(settings: Settings, url: str) -> int:
    """`lorad worker`: SIGTERM/SIGINT stop gracefully (the job checkpoints, its state travels
    to the coordinator, the job is re-queued); a second signal exits at once."""
    import signal

    from daemon import logs
    from daemon.lock import AlreadyRunning, InstanceLock

    logs.configure(level=settings.log_level, log_file=settings.log_file, max_bytes=settings.log_max_bytes,
                   backups=settings.log_backups, secrets=logs.secrets_of(settings))  # fmt: skip
    lock = InstanceLock(settings.state)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"lorad worker: {exc}", file=__import__("sys").stderr)
        return 1
    shutdown = threading.Event()
    signals = {"n": 0}

    def on_signal(signum, _frame) -> None:
        signals["n"] += 1
        if signals["n"] > 1:
            os._exit(0)
        shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker = RemoteWorker(settings, url, shutdown=shutdown)
        return worker.run()
    finally:
        lock.release()
