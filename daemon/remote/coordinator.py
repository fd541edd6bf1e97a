"""The coordinator: `lorad run` with `queue = "redis://…"`.

The jobs table stays the only truth. One thread runs a loop that (1) reads worker events from
the `lorad:events` stream (a consumer group: an event is acknowledged only once handled, so a
coordinator killed mid-publish sees it again), (2) every tick checks leases, cancel requests and
waiting jobs, and dispatches runnable jobs: snapshot and newest checkpoint into Redis, a fresh
fencing token, an offer on the PriorityRedisHuey queue. A lapsed lease makes the job
`interrupted` and dispatches it again with the newest checkpoint that reached us; Redis that
forgot everything (restarted without its data) is the same case. Final artifacts are verified
(sha256 by the transfer, then the LoRA's safetensors structure and the renders' PNG signature)
before the normal publish path (daemon/publisher.py Publisher, the same as local mode). Workers never publish.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import Any

from daemon.fsutil import atomic_write_text
from daemon.jobs import ACTIVE, RUNNABLE, Job, JobStore, StateChanged
from daemon.logs import get_logger
from daemon.pipeline import ProgressSink, fallback_engine, job_input, make_engine
from daemon.publish import PublishError, read_header
from daemon.publisher import Publisher
from daemon.remote import lease
from daemon.remote.messages import SAMPLES_DIR, DeclineRecord, MessageRefused, Offer, WorkerEvent, report_name
from daemon.remote.transfer import TransferError
from daemon.remote.worker import safe_relative
from daemon.runner import cloud_fallback_target
from daemon.settings import Settings, SettingsError
from daemon.states import JobState
from engines.base import Progress, RenderResult, TrainingPlan
from lorad_base.workdir import WorkDir

RESULT_DIR = "result"
RESULT_FILE = "result.json"
STATE_FILE = "remote-state.json"  # which saved-state files came from workers (for pruning)
REMOTE_ACTIVE = (JobState.PREPARING, JobState.TRAINING, JobState.RENDERING)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ResultRefused(Exception):
    """An artifact from a worker that does not check out: never published."""


def safetensors_problem(path: Path) -> str | None:
    """None when the file is a well-formed safetensors file holding at least one tensor whose
    offsets, shapes and dtypes agree with the file's size; else what is wrong (no ML imports)."""
    try:
        header, offset = read_header(path)
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as exc:
        return f"not a safetensors file: {exc}"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        return "holds no tensors"
    end = 0
    for name, info in tensors.items():
        if not isinstance(info, dict):
            return f"tensor {name!r}: bad entry"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            dtype not in _DTYPE_BYTES
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
        ):
            return f"tensor {name!r}: bad dtype or shape"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            return f"tensor {name!r}: bad data offsets"
        begin, stop = offsets
        if not 0 <= begin <= stop or stop - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            return f"tensor {name!r}: {stop - begin} bytes do not match shape {shape} of {dtype}"
        end = max(end, stop)
    if offset + end != size:
        return f"data section is {size - offset} bytes, the tensors need {end}"
    return None


def png_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return str(exc)
    return None if head == PNG_SIGNATURE else "not a PNG image"


def verified_result_problem(folder: Path) -> str | None:
    """None when <work>/result holds what collect_result verified (adapter structure, PNGs, plain
    report names in result.json); else what is wrong. Checked again before every publish."""
    problem = safetensors_problem(folder / "adapter.safetensors")
    if problem:
        return f"the LoRA is not a valid safetensors file ({problem})"
    for name in ("render.png", "compare.png"):
        problem = png_problem(folder / name)
        if problem:
            return f"{name}: {problem}"
    report = _read_json(folder / RESULT_FILE).get("report") or []
    if not isinstance(report, list):
        return "result.json: report is not a list"
    for name in report:
        try:
            report_name(name)
        except MessageRefused as exc:
            return f"result.json: {exc}"
    return None


class Coordinator:
    """Dispatch, events, leases and publishing for remote jobs (one thread: `start`/`join`)."""

    def __init__(self, settings: Settings, store: JobStore, shutdown: threading.Event):
        from daemon.remote.redisqueue import RedisQueue, client_pair
        from daemon.remote.transfer import ArtifactStore

        self.settings, self.store, self.shutdown = settings, store, shutdown
        self.log = get_logger()
        self.block_ms = 1000
        self.client, pool = client_pair(settings.queue, name="lorad-coordinator", socket_timeout=15.0)
        self.queue = RedisQueue(pool, self.client)
        self.files = ArtifactStore(self.client)
        self.scripts = lease.Scripts(self.client)
        self.publisher = Publisher(settings, store)
        self.tokens: dict[str, str] = {}  # job id -> the token of its current dispatch
        self.sinks: dict[str, ProgressSink] = {}
        self.waiting_since: dict[str, float] = {}
        self.workers: dict[str, dict[str, str]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick_s = min(5.0, lease.beat_interval(settings.lease_ttl_s))
        self._caught_up_at = float("-inf")
        self._refused_declines: set[tuple[str, Any]] = set()

    # -- life cycle ----------------------------------------------------------------------------

    def wake(self, *_args: object) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorad-coordinator", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        attached = False
        delay = 0.5
        next_tick = 0.0
        failing = False
        while not self.shutdown.is_set():
            try:
                if not attached:
                    self._ensure_group()
                    self.attach()
                    self._drain(pending=True)
                    attached = True
                block = (
                    None if self._wake.is_set() else self.block_ms
                )  # None: no BLOCK at all (0 would wait forever)
                self._drain(pending=False, block=block)
                if self._wake.is_set() or time.monotonic() >= next_tick:
                    self._wake.clear()
                    self.tick()
                    next_tick = time.monotonic() + self.tick_s
                if failing:
                    self.log.info("coordinator.redis_back")
                failing, delay = False, 0.5
            except Exception as exc:
                if _is_redis_error(exc):
                    if not failing:
                        self.log.warning(
                            "coordinator.redis_unreachable", error=f"{type(exc).__name__}: {exc}"
                        )
                    failing = True
                    attached = False  # Redis may have lost everything: re-attach from the table
                else:
                    self.log.exception("coordinator.error")
                self.shutdown.wait(delay)
                delay = min(10.0, delay * 2)
        for sink in self.sinks.values():
            sink.close()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(lease.EVENTS, lease.EVENTS_GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _drain(self, *, pending: bool, block: int | None = None, batches: int = 40) -> None:
        """Handle events: at attach the ones delivered before a restart and never acknowledged;
        else everything queued (up to `batches` reads) BEFORE the tick looks at leases, so a
        coordinator that was stopped a while handles a worker's `done` before calling its lease
        lapsed. Only the first read blocks, for at most `block` ms (never unbounded)."""
        start = "0" if pending else ">"
        for _ in range(batches):
            started = time.monotonic()
            reply = self.client.xreadgroup(
                lease.EVENTS_GROUP,
                "coordinator",
                {lease.EVENTS: start},
                count=50,
                block=None if pending or not block else block,
            )
            block = None
            entries = reply[0][1] if reply else []
            if not entries:
                if not pending:
                    self._caught_up_at = started  # every event sent before `started` is handled
                return
            for entry_id, fields in entries:
                try:
                    self.handle_entry(fields)
                finally:
                    self.client.xack(lease.EVENTS, lease.EVENTS_GROUP, entry_id)
                    self.client.xdel(lease.EVENTS, entry_id)
            if pending:
                start = entries[-1][0]

    # -- attach (start, and after Redis came back) ---------------------------------------------

    def attach(self) -> dict:
        """Re-attach to what workers run (token and lease still in Redis); everything else the
        table says is running becomes `interrupted` and is dispatched again."""
        attached, interrupted, published = [], [], []
        self.tokens.clear()
        for job in self.store.list((*RUNNABLE, *ACTIVE)):
            token = _text(self.client.get(lease.token_key(job.id)))
            if job.state == "publishing" or (job.state in REMOTE_ACTIVE and self._result_ready(job)):
                self._publish_verified(job)
                published.append(job.id)
                continue
            if token is not None:
                self.tokens[job.id] = token
            if job.state in REMOTE_ACTIVE:
                if token is not None:  # held, or lapsed: the tick decides once the events are read
                    attached.append(job.id)
                    continue
                self._interrupt(job, "its worker's lease is gone")
                interrupted.append(job.id)
        self.log.info("coordinator.attached", attached=attached, interrupted=interrupted, published=published,
                      queue=_masked(self.settings.queue))  # fmt: skip
        return {"attached": attached, "interrupted": interrupted}

    # -- the tick ------------------------------------------------------------------------------

    def tick(self) -> None:
        self.workers = self.live_workers()
        queued = self.queued_offers()
        for job in self.store.list(ACTIVE):
            if job.state in REMOTE_ACTIVE and job.id in self.tokens:
                self._check_running(job)
        for job_id in list(self.tokens):
            row = self.store.get(job_id)
            if row is None or row.state not in (*RUNNABLE, *REMOTE_ACTIVE):
                self._forget(job_id, queued.get(job_id))  # cancelled, failed or done meanwhile
        for job in self.store.runnable_in_order():
            if job.cancel_requested:
                continue
            token = self.tokens.get(job.id)
            if token is not None:
                held = bool(self.client.exists(lease.lease_key(job.id)))
                if lease.lease_action(lease_held=held, task_queued=job.id in queued) == "keep":
                    self._check_waiting(job, token, queued.get(job.id))
                    continue
                if not self.caught_up():
                    self.wake()  # an `accepted` may still be unread: read the stream first
                    continue
                if (
                    self.scripts.reclaim(
                        keys=[lease.token_key(job.id), lease.lease_key(job.id)], args=[token]
                    )
                    == 0
                ):
                    continue  # claimed just now
                self.log.warning(
                    "job.redispatch", job_id=job.id, reason="offer lost (Redis forgot it or its worker died)"
                )
                self.tokens.pop(job.id, None)
            self._dispatch_or_say_why(job)

    def queued_offers(self) -> dict:
        """job id -> its queue entry. An entry that is no valid Offer (forged by someone with
        access to Redis) is removed from the queue and logged: the queue keeps moving."""
        found = {}
        for entry in self.queue.entries():
            try:
                offer = Offer.from_dict(entry.offer)
            except MessageRefused as exc:
                self.log.warning("coordinator.offer_refused", field=exc.field, reason=exc.why,
                                 job_id=str(entry.offer.get("job_id"))[:80])  # fmt: skip
                self.queue.remove(entry.member)
                continue
            found[offer.job_id] = entry
        return found

    def live_workers(self) -> dict[str, dict[str, str]]:
        found = {}
        for key in self.client.scan_iter(match=lease.worker_key("*"), count=100):
            values = {_text(k) or "": _text(v) or "" for k, v in self.client.hgetall(key).items()}
            if values.get("id"):
                found[values["id"]] = values
        return found

    def caught_up(self) -> bool:
        """True when the event stream was read to its end moments ago (pure but for the clock): a
        coordinator that was stopped or slow (SIGSTOP, a long publish) reads what its workers sent
        meanwhile (a `done`, newer checkpoints) before it calls any lease lapsed."""
        return time.monotonic() - self._caught_up_at <= self.block_ms / 1000 + 2.0

    def _check_running(self, job: Job) -> None:
        token = self.tokens[job.id]
        if job.cancel_requested:
            self._fence(job.id, token)
            self._transition(job.id, "cancelled", expect=REMOTE_ACTIVE)
            return
        if self.client.exists(lease.lease_key(job.id)):
            return
        if not self.caught_up():
            self.wake()  # read the stream first, then decide
            return
        if self.scripts.reclaim(keys=[lease.token_key(job.id), lease.lease_key(job.id)], args=[token]) == 0:
            return
        self.tokens.pop(job.id, None)
        self._interrupt(job, f"the lease of worker {job.worker or '?'} lapsed")

    def _interrupt(self, job: Job, why: str) -> None:
        self._close_sink(job.id)
        fields: dict[str, Any] = {"worker": None}
        step = self._saved_step(job)
        if step is not None:
            fields["step"] = step
        self.log.warning("job.lease_lapsed", job_id=job.id, worker=job.worker, reason=why, resume_step=step)
        self._transition(job.id, "interrupted", expect=REMOTE_ACTIVE, **fields)

    def _check_waiting(self, job: Job, token: str, queued=None) -> None:
        declines = []
        for worker, raw in self.client.hgetall(lease.declined_key(job.id)).items():
            try:
                record = DeclineRecord.from_dict(worker, raw)
            except MessageRefused as exc:
                if (job.id, worker) not in self._refused_declines:  # once, not every tick
                    self._refused_declines.add((job.id, worker))
                    self.log.warning(
                        "coordinator.event_refused", job_id=job.id, field=exc.field, reason=exc.why
                    )
                continue
            if record.token == token:
                declines.append(lease.Decline(record.worker, record.reason, record.needs_gb, record.has_gb))
        verdict = lease.waiting_verdict(set(self.workers), declines)
        if verdict is not None and self._route_to_cloud(job, verdict, token, queued):
            return
        if verdict != job.waiting:
            self.store.update(job.id, waiting=verdict, updated_at=job.updated_at)
            if verdict:
                self.log.info("job.waiting", job_id=job.id, reason=verdict)
        if verdict is None:
            self.waiting_since.pop(job.id, None)
            return
        since = self.waiting_since.setdefault(job.id, time.time())
        if time.time() - since >= self.settings.wait_timeout_s:
            self._fence(job.id, token)
            self._transition(job.id, "failed", expect=RUNNABLE,
                             error=f"no worker could train this job for {self.settings.wait_timeout_s:.0f} s "
                                   f"({verdict}); start a bigger worker, then run: lorad retry {job.id}")  # fmt: skip

    def _route_to_cloud(self, job: Job, reason: str, token: str, queued) -> bool:
        """`cloud_fallback = true`: a job no live worker fits goes to the cloud engine instead of
        waiting (any worker runs it: it needs no local memory; one without the cloud's key declines
        it, and the job then waits with that reason). False: the setting is off, or the job is
        already there (a refused cloud job waits rather than bounce back)."""
        engine = job.settings.get("engine", "mflux")
        cloud_engine = cloud_fallback_target(
            fallback_engine(self.settings), engine, job.settings.get("fallback_from")
        )
        if cloud_engine is None:
            return False
        self._fence(job.id, token)
        if queued is not None:
            self.queue.remove(queued.member)
        self.store.update(
            job.id, settings={**job.settings, "engine": cloud_engine, "fallback_from": engine}, waiting=None
        )
        self.waiting_since.pop(job.id, None)
        self.log.warning(
            "job.cloud_fallback", job_id=job.id, from_engine=engine, to_engine=cloud_engine, reason=reason
        )
        return True

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch_or_say_why(self, job: Job) -> None:
        """Dispatch; when Redis refuses the offer's data (full: maxmemory) the job stays queued
        with the reason on its `waiting:` line, not a bare `queued`; retried at the next tick."""
        import redis

        try:
            self.dispatch(job)
        except (TransferError, redis.ResponseError) as exc:
            if isinstance(exc, TransferError) and _is_connection_error(exc):
                raise
            reason = f"waiting: Redis refused the job's files ({_short(exc)})"
            if job.waiting != reason:
                self.store.update(job.id, waiting=reason, updated_at=job.updated_at)
                self.log.warning("job.dispatch_failed", job_id=job.id, reason=reason)

    def dispatch(self, job: Job) -> None:
        workdir = self.settings.jobs_dir / job.id
        if not (workdir / "manifest.json").is_file():
            self._transition(
                job.id,
                "failed",
                expect=RUNNABLE,
                error=f"the job's snapshot is missing ({workdir}); drop READY again",
            )
            return
        if self.publisher.already_published(job) or self._result_ready(job):
            self._publish_verified(job)
            return
        from daemon.captions import REMOTE_UNSUPPORTED, uncaptioned_count

        if uncaptioned_count(workdir):  # the captioning phase runs in the embedded pipeline only
            self._transition(job.id, "failed", expect=RUNNABLE, error=REMOTE_UNSUPPORTED)
            return
        spec = job_input(job, workdir)
        base = lease.files_key(job.id)
        snapshot = self.files.put_tree(f"{base}:snapshot", workdir / "data")
        manifest = self.files.put_file(f"{base}:manifest", workdir / "manifest.json")
        state = []
        for i, rel in enumerate(self._state_files(job)):
            state.append(
                {"rel": rel, "ref": self.files.put_file(f"{base}:resume:{i}", workdir / rel).to_dict()}
            )
        token = lease.new_token(job.attempt)
        offer = {
            "job_id": job.id, "token": token, "attempt": job.attempt, "name": job.name, "trigger": job.trigger_word,
            "model": spec.model, "engine": job.settings.get("engine", "mflux"), "image_count": spec.image_count,
            "max_side": spec.max_side, "options": spec.options, "preview_prompt": spec.preview_prompt,
            "snapshot": snapshot.to_dict(), "manifest": manifest.to_dict(), "state": state,
        }  # fmt: skip
        self.client.set(lease.token_key(job.id), token)
        self.tokens[job.id] = token
        self.queue.enqueue(offer, job.priority, job.ready_at)
        self.log.info("job.dispatched", job_id=job.id, token=token, resume_files=len(state))

    def _state_files(self, job: Job) -> list[str]:
        """The saved state that reached us (relative paths), verified again before it travels."""
        workdir = self.settings.jobs_dir / job.id
        try:
            engine = make_engine(self.settings, job.settings.get("engine", "mflux"))
        except SettingsError:
            return []
        state = engine.saved_state(workdir)
        return [p.relative_to(workdir).as_posix() for p in state.files] if state is not None else []

    def _saved_step(self, job: Job) -> int | None:
        try:
            engine = make_engine(self.settings, job.settings.get("engine", "mflux"))
        except SettingsError:
            return None
        state = engine.saved_state(self.settings.jobs_dir / job.id)
        return state.step if state is not None else None

    # -- events --------------------------------------------------------------------------------

    def handle_entry(self, fields: dict) -> None:
        """One stream entry, through its one validating constructor (WorkerEvent.from_dict)."""
        try:
            event = WorkerEvent.from_dict(fields)
        except MessageRefused as exc:
            self._refused_event(exc)
            return
        self.handle(event)

    def _refused_event(self, exc: MessageRefused) -> None:
        """A worker's event that does not check out: nothing of it is written; when it carries the
        job's current token the dispatch ends and the job fails visibly (lorad retry)."""
        self.log.warning("coordinator.event_refused", job_id=exc.job_id, field=exc.field, reason=exc.why)
        if exc.job_id is None or not lease.event_is_current(self.tokens.get(exc.job_id), exc.token):
            return
        job = self.store.get(exc.job_id)
        if job is None:
            return
        self._fence(job.id, exc.token or "")
        self._close_sink(job.id)
        if job.state in (*REMOTE_ACTIVE, *RUNNABLE):
            self._transition(job.id, "failed", error=f"a message from its worker was refused ({exc}); nothing "
                                                     f"of it was written or published; run: lorad retry {job.id}")  # fmt: skip
        self._cleanup(job.id)

    def handle(self, event: WorkerEvent) -> None:
        job = self.store.get(event.job_id)
        if job is None:
            return
        kind, data, worker = event.kind, event.data, event.worker
        if not lease.event_is_current(self.tokens.get(job.id), event.token):
            if kind == "done" and job.state in RUNNABLE and not job.cancel_requested:
                self._late_done(job, event)
                return
            self.log.info("coordinator.stale_event", job_id=job.id, kind=kind, worker=worker)
            return
        if kind == "declined":
            self.wake()
        elif kind == "accepted":
            self._accepted(job, worker, data)
        elif kind == "plan" and job.state in REMOTE_ACTIVE:
            plan = data.get("plan") or {}
            self.store.update(job.id, plan=plan, total_steps=_int_or_none(plan.get("total_steps")))
        elif kind == "progress" and job.state == "training":
            self._sink(job.id)(Progress(data["step"], data["total"], data.get("loss"), data.get("eta_s")))
        elif kind == "checkpoint":
            self._checkpoint(job, event)
        elif kind == "rendering" and job.state == "training":
            self._close_sink(job.id)
            self._transition(job.id, "rendering", expect="training")
        elif kind == "stopped":
            self._fence(job.id, event.token)
            if job.state in REMOTE_ACTIVE:
                self._interrupt(job, f"worker {worker} stopped ({data.get('reason')})")
        elif kind == "failed":
            self._fence(job.id, event.token)
            self._close_sink(job.id)
            if job.state in (*REMOTE_ACTIVE, *RUNNABLE):
                self._transition(job.id, "failed", error=data.get("error") or "failed on a worker")
            self._cleanup(job.id)
        elif kind == "done":
            self._done(job, event)

    def _late_done(self, job: Job, event: WorkerEvent) -> None:
        """A result that arrived after its lease lapsed (a slow or restarted coordinator): accepted
        when nobody claimed the job again under a newer token (no lease), through the same checks
        (collect_result) as any result; else it is stale."""
        token = self.tokens.get(job.id) or _text(self.client.get(lease.token_key(job.id))) or ""
        if self.scripts.reclaim(keys=[lease.token_key(job.id), lease.lease_key(job.id)], args=[token]) != 1:
            self.log.info("coordinator.stale_event", job_id=job.id, kind=event.kind, worker=event.worker)
            return
        self.tokens.pop(job.id, None)
        queued = self.queued_offers().get(job.id)
        if queued is not None:
            self.queue.remove(queued.member)
        try:
            self.collect_result(job, event)
        except ResultRefused as exc:
            self.log.error("job.artifact_refused", job_id=job.id, worker=event.worker, reason=str(exc))
            self.wake()  # still runnable: dispatched again from its newest checkpoint
            return
        self.log.info("job.late_result_accepted", job_id=job.id, worker=event.worker, token=event.token)
        self._publish_verified(job)

    def _accepted(self, job: Job, worker: str | None, data: dict) -> None:
        plan = data.get("plan") or {}
        moved = self._transition(job.id, JobState.PREPARING, expect=RUNNABLE, worker=worker, waiting=None, plan=plan,
                                 total_steps=_int_or_none(plan.get("total_steps")))  # fmt: skip
        self.waiting_since.pop(job.id, None)
        if (
            moved is None or moved.state != JobState.PREPARING
        ):  # cancelled meanwhile: the worker is fenced out
            self._fence(job.id, self.tokens.get(job.id, ""))
            return
        self.log.info(
            "job.remote", job_id=job.id, worker=worker, host=data.get("host"), tier=plan.get("tier")
        )
        self._transition(job.id, JobState.TRAINING, expect=JobState.PREPARING)

    def _checkpoint(self, job: Job, event: WorkerEvent) -> None:
        """Record a worker's checkpoint. Its files land only in the saved-state areas (WorkerEvent);
        an older or repeated step of the same dispatch is stale (never recorded, deletes nothing;
        a new dispatch may start lower: a retry from scratch); the Redis copy of the
        previous checkpoint goes only once this newer one is verified (sha256) and recorded."""
        workdir = self.settings.jobs_dir / job.id
        step, record = event.data["step"], _read_json(workdir / STATE_FILE)
        have, keys = record.get("step"), f"{lease.files_key(job.id, event.token)}:state:{step}"
        same_dispatch = str(record.get("keys", "")).startswith(f"{lease.files_key(job.id, event.token)}:")
        if same_dispatch and isinstance(have, int) and step is not None and step <= have:
            self.log.info("coordinator.stale_checkpoint", job_id=job.id, step=step, recorded_step=have)
            return
        kept = []
        try:
            for item in event.files:
                dest = workdir / item.rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.files.get_file(item.ref, dest)
                kept.append(item.rel)
        except TransferError as exc:
            if _is_connection_error(exc):
                raise
            self.log.warning("coordinator.checkpoint_unusable", job_id=job.id, step=step, reason=str(exc))
            return
        atomic_write_text(workdir / STATE_FILE, json.dumps({"step": step, "files": kept, "keys": keys}))
        for rel in record.get("files") or []:
            safe = safe_relative(rel) if isinstance(rel, str) else None
            if rel not in kept and safe is not None:
                (workdir / safe).unlink(missing_ok=True)
        old_keys = record.get("keys")
        if isinstance(old_keys, str) and old_keys != keys and old_keys.startswith(f"job:{job.id}:"):
            self.files.delete_prefix(old_keys)
        self.store.update(job.id, step=step)
        self.log.info("job.checkpoint_received", job_id=job.id, step=step, files=len(kept))

    def _done(self, job: Job, event: WorkerEvent) -> None:
        token, worker = event.token, event.worker
        self._close_sink(job.id)
        if job.state == JobState.TRAINING:
            job = self._transition(job.id, JobState.RENDERING, expect=JobState.TRAINING) or job
        if job.state != JobState.RENDERING:
            return
        try:
            self.collect_result(job, event)
        except ResultRefused as exc:
            self.log.error("job.artifact_refused", job_id=job.id, worker=worker, reason=str(exc))
            self._fence(job.id, token)
            self._transition(job.id, JobState.FAILED, expect=JobState.RENDERING,
                             error=f"the result from worker {worker} was refused: {exc}. Nothing was published; "
                                   f"run: lorad retry {job.id}")  # fmt: skip
            self._cleanup(job.id)
            return
        self._fence(job.id, token)
        current = self.store.get(job.id)
        if current is not None:
            self._publish_verified(current)

    def collect_result(self, job: Job, event: WorkerEvent | dict) -> Path:
        """Download and verify every artifact of a finished remote job into <work>/result;
        result.json (written last) records what was verified. ResultRefused on any problem. The
        one way a result reaches a publish, whatever led there (live event, lapse, restart)."""
        if isinstance(event, dict):
            try:
                event = result_event(job.id, event)
            except MessageRefused as exc:
                raise ResultRefused(str(exc)) from None
        folder = self.settings.jobs_dir / job.id / RESULT_DIR
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "report").mkdir(parents=True)
        names = {"adapter": "adapter.safetensors", "render": "render.png", "compare": "compare.png",
                 "base": "base.png"}  # fmt: skip
        try:
            for key, ref in event.result:
                self.files.get_file(ref, folder / names[key])
            for item in event.report:
                target = folder / "report" / report_name(item.name)
                target.parent.mkdir(exist_ok=True)  # report/samples/
                self.files.get_file(item.ref, target)
        except Exception as exc:
            raise ResultRefused(f"{type(exc).__name__}: {exc}") from None
        problem = safetensors_problem(folder / "adapter.safetensors")
        if problem:
            raise ResultRefused(f"the LoRA is not a valid safetensors file ({problem})")
        has_base = any(key == "base" for key, _ref in event.result)
        for name in ("render.png", "compare.png", *(["base.png"] if has_base else [])):
            problem = png_problem(folder / name)
            if problem:
                raise ResultRefused(f"{name}: {problem}")
        report = [item.name for item in event.report]
        atomic_write_text(folder / RESULT_FILE, json.dumps({"plan": event.data.get("plan") or job.plan,
                                                            "report": report, "step": event.data.get("step")}))  # fmt: skip
        return folder

    def _result_ready(self, job: Job) -> bool:
        return (self.settings.jobs_dir / job.id / RESULT_DIR / RESULT_FILE).is_file()

    def _publish_verified(self, job: Job) -> None:
        """The normal publish path for a verified result (also after a restart mid-publish). A job
        not yet in a phase goes straight to publishing (states.TRANSITIONS: the result is here,
        nothing is trained or rendered again); one a worker ran walks on from where it is."""
        registry_only = False
        if job.state in (*RUNNABLE, JobState.PREPARING):
            registry_only = self.publisher.already_published(job)
            job = self._transition(job.id, JobState.PUBLISHING, expect=job.state) or job
        if job.state == JobState.TRAINING:
            job = self._transition(job.id, JobState.RENDERING, expect=JobState.TRAINING) or job
        if job.state == JobState.RENDERING:
            job = self._transition(job.id, JobState.PUBLISHING, expect=JobState.RENDERING) or job
        if job.state != JobState.PUBLISHING:
            return
        if registry_only:
            try:
                outputs = self.publisher.registry_only(job)
            except PublishError as exc:
                self._transition(job.id, JobState.FAILED, error=str(exc))
                return
            self._finish(job, outputs)
            return
        self._publish_result(job)

    def _publish_result(self, job: Job) -> None:
        """Stamp and publish the verified result in <work>/result (checked again first)."""
        workdir = WorkDir.of(self.settings.jobs_dir, job.id)
        folder = workdir.root / RESULT_DIR
        record = _read_json(folder / RESULT_FILE)
        if not record:
            self._interrupt_publishing(job)
            return
        problem = verified_result_problem(folder)
        if problem:  # the same checks as collect_result, whatever led here (restart, lapse)
            self.log.error("job.artifact_refused", job_id=job.id, worker=job.worker, reason=problem)
            self._fence(job.id, self.tokens.get(job.id, ""))
            self._cleanup(job.id)
            self._transition(job.id, JobState.FAILED, error=f"the result was refused: {problem}. Nothing was "
                                                            f"published; run: lorad retry {job.id}")  # fmt: skip
            return
        plan = TrainingPlan.from_dict(record.get("plan") or job.plan)
        try:
            engine = make_engine(self.settings, job.settings.get("engine", "mflux"))
            image_count = job_input(job, workdir.root).image_count
            lora_file = self.publisher.stamp(engine, job, plan, folder / "adapter.safetensors", image_count)
            base = folder / "base.png"  # absent from an older worker's result: no lora_effect then
            rendered = RenderResult(
                with_lora=folder / "render.png",
                base=base if base.is_file() else folder / "render.png",
                compare=folder / "compare.png",
            )
            names = [report_name(name) for name in record.get("report") or []]
            report = [folder / "report" / name for name in names if "/" not in name]
            if any(name.startswith(SAMPLES_DIR + "/") for name in names):
                report.append(folder / "report" / SAMPLES_DIR)  # published as one folder
            outputs = self.publisher.publish(job, plan, lora_file, rendered, report)
        except (PublishError, SettingsError, MessageRefused) as exc:
            self._transition(job.id, JobState.FAILED, error=str(exc))
            return
        self._finish(job, outputs)

    def _interrupt_publishing(self, job: Job) -> None:
        self._transition(job.id, JobState.INTERRUPTED, expect=JobState.PUBLISHING, worker=None)

    def _finish(self, job: Job, outputs: dict) -> None:
        self._transition(job.id, JobState.DONE, outputs=outputs, eta_s=0)
        self._cleanup(job.id)

    # -- helpers -------------------------------------------------------------------------------

    def _fence(self, job_id: str, token: str) -> None:
        """End a dispatch: the token goes (its worker is fenced out) and so does the lease."""
        self.client.delete(lease.token_key(job_id), lease.lease_key(job_id))
        if self.tokens.get(job_id) == token or not token:
            self.tokens.pop(job_id, None)

    def _forget(self, job_id: str, queued) -> None:
        self._fence(job_id, self.tokens.get(job_id, ""))
        if queued is not None:
            self.queue.remove(queued.member)
        self._close_sink(job_id)
        self._cleanup(job_id)

    def _cleanup(self, job_id: str) -> None:
        """A finished job's transfers and records leave Redis."""
        try:
            self.files.delete_prefix(lease.files_key(job_id))
            self.client.delete(lease.declined_key(job_id))
        except Exception as exc:
            self.log.warning("coordinator.cleanup_failed", job_id=job_id, error=str(exc))
        self.waiting_since.pop(job_id, None)

    def _sink(self, job_id: str) -> ProgressSink:
        if job_id not in self.sinks:
            self.sinks[job_id] = ProgressSink(
                self.store,
                job_id,
                self.settings.marker_refresh_s,
                series=WorkDir.of(self.settings.jobs_dir, job_id).progress,  # the learning metrics' losses
            )
        return self.sinks[job_id]

    def _close_sink(self, job_id: str) -> None:
        sink = self.sinks.pop(job_id, None)
        if sink is not None:
            sink.close()

    def _transition(self, job_id: str, new: str, *, expect=None, **fields: Any) -> Job | None:
        try:
            return self.store.transition(job_id, new, expect=expect, **fields)
        except StateChanged as exc:
            self.log.info("queue.stale", job_id=job_id, state=exc.current, wanted=new)
            return None


def result_event(job_id: str, data: dict) -> WorkerEvent:
    """A `done` event's data for this job (collect_result's dict form), through WorkerEvent."""
    from daemon.remote.messages import files_prefix

    token = "0." + "0" * 12
    fields = {
        "job": job_id,
        "token": token,
        "kind": "done",
        "worker": "coordinator",
        "data": json.dumps(data),
    }
    try:
        return WorkerEvent.from_dict(fields, key_prefix=files_prefix(job_id))
    except MessageRefused as exc:
        raise MessageRefused(exc.field, exc.why) from None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_connection_error(exc: Exception) -> bool:
    """A transfer that failed because Redis is unreachable (not because its data is missing)."""
    import redis

    return isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError, OSError))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _is_redis_error(exc: Exception) -> bool:
    import redis

    from daemon.remote.transfer import TransferError

    return isinstance(exc, (redis.RedisError, OSError, TransferError))


def _masked(url: str) -> str:
    from daemon.remote.redisurl import mask

    return mask(url)
