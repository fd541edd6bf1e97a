"""The dashboard: a small Starlette app, server-rendered pages (Jinja2) and server-sent events.

Read-mostly: pages read the jobs table (their own connection; WAL lets them read beside the
daemon's writers), the work dirs and the loras folder. The three actions (cancel, retry,
re-train with force) call the same functions as `lorad cancel/retry/enqueue --force`
(daemon/actions.py). Every request passes `Guard` (token when one is set, loopback Host names
otherwise); every action is a POST with a CSRF token and a same-origin Origin/Referer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import sqlite3
import time
import urllib.parse
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.jobs import ACTIVE, Job, JobStore
from daemon.settings import Settings
from daemon.states import JobState
from daemon.ui import views
from lorad_base.workdir import WorkDir

HERE = Path(__file__).resolve().parent
TOKEN_COOKIE = "lorad_token"
CSRF_COOKIE = "lorad_csrf"
ACTIONS = {
    "cancel": ("Cancel", "It stops at its next step and publishes nothing."),
    "retry": ("Retry", "It is queued again and resumes from its last checkpoint where it has one."),
    "retrain": (
        "Re-train with force",
        "READY with force = true is written into the dataset folder: the dataset is "
        "taken again and trained even if an identical one was trained before.",
    ),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FILE_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
ACTION_BODY_MAX = 4096  # an action's form is a CSRF token: anything longer is refused unread
ACTION_BODY_TIMEOUT_S = 10.0
# mflux's loss.html draws its chart with an inline script: it may run, but sandboxed (an opaque
# origin: no cookies, no dashboard session) and with nothing to load from elsewhere.
LOSS_PLOT_CSP = "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"
LOG_TAIL_BYTES = 2_000_000  # the job page reads at most this much of the end of lorad.jsonl


class Guard:
    """ASGI middleware in front of every request: with a token, the request must carry it
    (Authorization: Bearer, the cookie, or `?token=`, which sets the cookie and redirects to the
    same URL without it); without one, the Host must be a loopback name. Also times the app
    (Server-Timing header: bench P11 reads it)."""

    def __init__(self, app: ASGIApp, *, token: str | None, port: int | None):
        self.app, self.token, self.port = app, token, port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.token is not None:
            denied = self._check_token(request)
            if denied is not None:
                await denied(scope, receive, send)
                return
        elif not views.host_allowed(request.headers.get("host"), self.port or 0) and self.port is not None:
            await PlainTextResponse("lorad dashboard: unknown Host (open it at 127.0.0.1)", 403)(
                scope, receive, send
            )
            return
        started = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - started) * 1000
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"server-timing", f"app;dur={ms:.2f}".encode())]
            await send(message)

        await self.app(scope, receive, timed_send)

    def _check_token(self, request: Request) -> Response | None:
        assert self.token is not None
        given = request.query_params.get("token")
        if given is not None:
            if not _equal(given, self.token):
                return PlainTextResponse("lorad dashboard: wrong token", 401)
            query = urllib.parse.urlencode(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            )
            response = RedirectResponse(views.local_location(request.url.path, query), 303)
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
            return response
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and _equal(auth[7:].strip(), self.token):
            return None
        if _equal(request.cookies.get(TOKEN_COOKIE, ""), self.token):
            return None
        return PlainTextResponse(
            "lorad dashboard: a token is required (Authorization: Bearer <ui_token>, or open the URL with ?token=<ui_token>)",
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


class Dashboard:
    """The app's state and its endpoints (one instance per app)."""

    def __init__(self, settings: Settings, *, poll_s: float = 0.3, stopping=None, max_streams: int = 8):
        self.settings = settings
        self.poll_s = poll_s
        self.max_streams = max_streams  # live-update streams open at once (each holds a db connection)
        self.streams = 0
        self.stopping = stopping  # a threading.Event: SSE streams end when the daemon stops
        self._store: JobStore | None = None
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
        )
        self.env.filters["when"] = _when

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(self.settings.jobs_db, check=False, jobs_dir=self.settings.jobs_dir)
        return self._store

    # -- pages -------------------------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        html = self.env.get_template(template).render(csrf=csrf, request=request, **context)
        response = HTMLResponse(html, status, headers=PAGE_HEADERS)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict")
        return response

    def queue_page(self, request: Request) -> Response:
        jobs = views.queue_order(self.store.list())
        now = time.time()
        rows = [views.row_of(j, now) for j in jobs]
        return self.render(request, "queue.html", rows=rows, title="Queue", nav="queue",
                           scale_out=any(r["worker"] or r["waiting"] for r in rows))  # fmt: skip

    def _job_or_404(self, request: Request) -> Job | Response:
        job = self.store.get(request.path_params["job_id"])
        if job is None:
            return self.render(request, "message.html", 404, title="No such job",
                               message=f"no job {request.path_params['job_id']!r} (the queue page lists them)")  # fmt: skip
        return job

    def job_page(self, request: Request) -> Response:
        job = self._job_or_404(request)
        if isinstance(job, Response):
            return job
        workdir = WorkDir.of(self.settings.jobs_dir, job.id)
        images = {n: views.file_url("jobs", f"{job.id}/render/{n}.png") for n in ("compare", "lora", "base")
                  if (workdir.render / f"{n}.png").is_file()}  # fmt: skip
        settings = job.settings if isinstance(job.settings, dict) else {}
        metrics = (job.outputs or {}).get("metrics") if isinstance(job.outputs, dict) else None
        return self.render(
            request,
            "job.html",
            title=f"Job {job.id}",
            nav="queue",
            job=job,
            row=views.row_of(job, time.time()),
            plan=views.plan_lines(job.plan if isinstance(job.plan, dict) else {}),
            warnings=[str(w) for w in settings.get("warnings") or []],
            errors=[line for line in (job.error or "").splitlines() if line.strip()],
            series=views.read_series(workdir.progress),
            captions=views.read_captions(workdir.manifest),
            images=images,
            render_urls={n: views.file_url("jobs", f"{job.id}/render/{n}.png") for n in ("compare", "lora")},
            outputs={k: v for k, v in (job.outputs or {}).items() if isinstance(v, str)},
            samples=self._samples(job),
            metrics=metrics if isinstance(metrics, dict) else None,
            metrics_line=views.metrics_line(metrics),
            report_links=self._report_links(job),
            workdir=str(workdir.root),
            logs=self._log_lines(job.id),
            actions=_actions_for(job),
            message=request.query_params.get("msg", ""),
        )

    def _report_dir(self, job: Job) -> Path | None:
        """The published `<name>.report/` of a done job (inside the loras folder), or None."""
        outputs = job.outputs if isinstance(job.outputs, dict) else {}
        report = outputs.get("report")
        if job.state != JobState.DONE or not isinstance(report, str):
            return None
        path = self.settings.loras / Path(report).name
        return path if path.is_dir() else None

    def _samples(self, job: Job) -> dict:
        """The samples grid: the published report's once done, the work dir's while training."""
        report = self._report_dir(job)
        if report is not None and (report / "samples").is_dir():
            return views.sample_grid(report / "samples", f"/files/loras/{report.name}/samples")
        samples = WorkDir.of(self.settings.jobs_dir, job.id).samples
        return views.sample_grid(samples, f"/files/jobs/{job.id}/samples")

    def _report_links(self, job: Job) -> list[tuple[str, str]]:
        """(label, URL) of the report's files worth opening: mflux's loss.html, metrics.json."""
        report = self._report_dir(job)
        if report is None:
            return []
        labels = {"loss.html": "loss plot (mflux's loss.html)", "metrics.json": "metrics.json"}
        return [
            (label, f"/files/loras/{report.name}/{name}")
            for name, label in labels.items()
            if (report / name).is_file()
        ]

    def samples(self, request: Request) -> Response:
        job = self.store.get(request.path_params["job_id"])
        return JSONResponse(self._samples(job) if job is not None else {"prompts": [], "rows": []})

    def _log_lines(self, job_id: str, limit: int = 200) -> list[dict]:
        """This job's lines from the end of the JSON log (daemon/logview.py formats them)."""
        from daemon import logview

        path = self.settings.log_file
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - LOG_TAIL_BYTES))
                raw = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        lines = raw.splitlines()[1 if size > LOG_TAIL_BYTES else 0 :]  # the first may be cut
        out = []
        for line in lines:
            record = logview.parse(line)
            if record is not None and record.get("job_id") == job_id:
                out.append(
                    {
                        "level": str(record.get("level", "info")).lower(),
                        "text": logview.format_record(record, colour=False),
                    }
                )
        return out[-limit:]

    def confirm_page(self, request: Request) -> Response:
        job = self._job_or_404(request)
        if isinstance(job, Response):
            return job
        action = request.path_params["action"]
        if action not in ACTIONS:
            return self.render(
                request, "message.html", 404, title="No such action", message=f"unknown action {action!r}"
            )
        label, what = ACTIONS[action]
        return self.render(request, "confirm.html", title=f"{label} {job.id}?", nav="queue", job=job, action=action,
                           label=label, what=what)  # fmt: skip

    async def action(self, request: Request) -> Response:
        """POST /jobs/<id>/<action>: CSRF token (form field = cookie) and same-origin required."""
        body = await _read_body(request, ACTION_BODY_MAX, ACTION_BODY_TIMEOUT_S)
        if body is None:
            return PlainTextResponse("request too large or too slow", 413, headers={"Connection": "close"})
        form = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"))
        token = (form.get("csrf") or [""])[0]
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not token or not _equal(token, cookie):
            return PlainTextResponse(
                "lorad dashboard: missing or wrong CSRF token; reload the page and try again", 403
            )
        origin_ok = views.same_origin(
            request.headers.get("origin"),
            request.headers.get("referer"),
            request.headers.get("host"),
            request.url.scheme,
        )
        if not origin_ok:
            return PlainTextResponse(
                "lorad dashboard: this action must come from the dashboard's own page", 403
            )
        job = self._job_or_404(request)
        if isinstance(job, Response):
            return job
        action = request.path_params["action"]
        if action not in ACTIONS:
            return PlainTextResponse(f"unknown action {action!r}", 404)
        from starlette.concurrency import run_in_threadpool

        code, message = await run_in_threadpool(self._do, action, job)
        from daemon.logs import get_logger

        get_logger().info(
            "ui.action", action=action, job_id=job.id, dataset=job.dataset, ok=code == 0, message=message
        )
        query = urllib.parse.urlencode({"msg": message})
        return RedirectResponse(f"/jobs/{job.id}?{query}", 303)

    def _do(self, action: str, job: Job) -> tuple[int, str]:
        from daemon import actions

        try:
            if action == "cancel":
                return actions.cancel_job(self.settings, self.store, job)
            if action == "retry":
                return actions.retry_job(self.settings, self.store, job)
            folder = Path(job.dataset_path)
            if (
                not folder.resolve().is_relative_to(self.settings.training_data.resolve())
                or not folder.is_dir()
            ):
                return 1, f"{folder} is not a dataset folder under {self.settings.training_data} any more"
            return 0, actions.write_ready(folder, {"force": True})
        except actions.UsageError as exc:
            return 2, str(exc)
        except OSError as exc:
            return 1, f"{type(exc).__name__}: {exc}"

    def loras_page(self, request: Request) -> Response:
        from daemon import publish
        from daemon.publish import metadata_of

        loras = self.settings.loras
        groups = views.lora_groups(loras)
        entries = []
        for group in groups:
            stems = ([group["current"]] if group["current"] else []) + group["versions"]
            versions = []
            for stem in stems:
                try:
                    meta = metadata_of(loras / f"{stem}.safetensors")
                    problem = ""
                except (OSError, ValueError) as exc:
                    meta, problem = {}, f"header unreadable: {exc}"
                learned = publish.read_metrics(loras / f"{stem}{publish.REPORT_SUFFIX}")
                versions.append({
                    "stem": stem,
                    "trigger": meta.get("modelspec.trigger_phrase", ""),
                    "metrics": views.metrics_line(learned),
                    "warnings": (learned or {}).get("warnings") or [],
                    "downloads": [(f"{stem}{suffix}", views.file_url("loras", f"{stem}{suffix}")) for suffix in publish.LORA_SUFFIXES
                                  if (loras / f"{stem}{suffix}").is_file()],
                    "render": views.file_url("loras", f"{stem}.png") if (loras / f"{stem}.png").is_file() else None,
                    "compare": views.file_url("loras", f"{stem}.compare.png") if (loras / f"{stem}.compare.png").is_file() else None,
                    "meta": sorted(meta.items()),
                    "job_id": meta.get("lorad.job_id", ""),
                    "problem": problem,
                })  # fmt: skip
            entries.append({"name": group["name"], "versions": versions})
        return self.render(
            request, "loras.html", title="LoRA library", nav="loras", entries=entries, folder=str(loras)
        )

    def loss(self, request: Request) -> Response:
        series = views.read_series(WorkDir.of(self.settings.jobs_dir, request.path_params["job_id"]).progress)
        return JSONResponse(series)

    # -- files -------------------------------------------------------------------------------

    def files(self, request: Request) -> Response:
        """Only from lorad's own folders: the loras folder, and each work dir's render/."""
        kind, relative = request.path_params["kind"], request.path_params["path"]
        path = None
        if kind == "loras":
            path = views.inside(self.settings.loras, relative)
        elif kind == "jobs":
            parts = relative.split("/")
            if len(parts) >= 3 and parts[1] in ("render", "samples"):
                path = views.inside(self.settings.jobs_dir, relative)  # inside the jobs folder...
                render_dir = self.settings.jobs_dir / parts[0] / parts[1]
                if path is not None and not path.is_relative_to(os.path.realpath(render_dir)):
                    path = None  # ...and inside that job's render (samples) folder, links resolved
        if path is None:
            return PlainTextResponse("not found", 404)
        headers = FILE_HEADERS
        if kind == "loras" and path.name == "loss.html":
            headers = {**FILE_HEADERS, "Content-Security-Policy": LOSS_PLOT_CSP}
        return FileResponse(path, headers=headers)

    # -- live updates ------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        """Server-sent events: `jobs` with the rows that changed (all rows on connect and when a
        job appears or goes). Polls max(updated_at) and count(*) every poll_s on its own
        read-only connection: a progress write is on screen within poll_s plus the network."""
        if self.streams >= self.max_streams:
            return PlainTextResponse("lorad dashboard: too many live-update streams open; try again shortly",
                                     503, headers={"Retry-After": "5"})  # fmt: skip
        db = self.settings.jobs_db

        async def stream():
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            try:
                yield "retry: 1000\n\n"
                seen: tuple | None = None
                since = 0.0
                last_sent = time.monotonic()
                while not (self.stopping is not None and self.stopping.is_set()):
                    try:
                        signature = tuple(
                            conn.execute("SELECT max(updated_at), count(*) FROM jobs").fetchone()
                        )
                    except sqlite3.Error:
                        signature = None
                    if signature is not None and signature != seen:
                        full = seen is None or signature[1] != seen[1]
                        query = f"SELECT {views.ROW_COLUMNS}{_extra_columns(conn)} FROM jobs"
                        rows = conn.execute(
                            query + ("" if full else " WHERE updated_at > ?"), () if full else (since,)
                        ).fetchall()
                        jobs = [Job.from_row(r) for r in rows]
                        now = time.time()
                        payload = {
                            "full": full,
                            "rows": [views.row_of(j, now) for j in views.queue_order(jobs)],
                        }
                        seen, since = signature, signature[0] or 0.0
                        last_sent = time.monotonic()
                        yield f"event: jobs\ndata: {json.dumps(payload)}\n\n"
                    elif time.monotonic() - last_sent > 15:
                        last_sent = time.monotonic()
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(self.poll_s)
            finally:
                conn.close()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        self.streams += 1  # released when the response ends, however it ends (_CountedStream)
        return _CountedStream(self, stream(), media_type="text/event-stream", headers=headers)


class _CountedStream(StreamingResponse):
    """A live-update stream that holds one of the dashboard's stream slots until it ends (the
    generator's own `finally` does not run when the client leaves before it starts)."""

    def __init__(self, dashboard: Dashboard, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dashboard = dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.dashboard.streams -= 1


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes | None:
    """The request body, or None once it passes `limit` bytes or `timeout_s` seconds: a hostile
    client can neither fill memory nor hold the request open by trickling its body."""
    chunks: list[bytes] = []

    async def read() -> bool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return False
            chunks.append(chunk)
        return True

    try:
        complete = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        return None
    return b"".join(chunks) if complete else None


def _extra_columns(conn: sqlite3.Connection) -> str:
    """The scale-out columns where this table has them (migration 3 on that branch)."""
    names = {row[1] for row in conn.execute("PRAGMA table_info(jobs)").fetchall()}
    return "".join(f", {c}" for c in ("worker", "waiting") if c in names)


def _actions_for(job: Job) -> list[str]:
    actions = []
    if job.state not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.PUBLISHING):
        actions.append("cancel")
    if job.state in (JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED) and not (
        isinstance(job.settings, dict) and job.settings.get("intake") == "refused"
    ):
        actions.append("retry")
    if job.state not in ACTIVE and job.state != JobState.QUEUED:
        actions.append("retrain")
    return actions


def _when(ts: float | None) -> str:
    from daemon.jobs import iso

    return iso(ts)


def create_app(settings: Settings, *, token: str | None = None, port: int | None = None, poll_s: float = 0.3,
               stopping=None, max_streams: int = 8) -> ASGIApp:  # fmt: skip
    """The dashboard app. `token`: required on every request when set. `port`: the port it is
    served on, for the Host check when there is no token (None: no Host check, for tests).
    `max_streams`: live-update streams open at once (more get a 503)."""
    ui = Dashboard(settings, poll_s=poll_s, stopping=stopping, max_streams=max_streams)
    routes = [
        Route("/", ui.queue_page),
        Route("/jobs/{job_id}", ui.job_page),
        Route("/jobs/{job_id}/loss.json", ui.loss),
        Route("/jobs/{job_id}/samples.json", ui.samples),
        Route("/jobs/{job_id}/confirm/{action}", ui.confirm_page),
        Route("/jobs/{job_id}/{action}", ui.action, methods=["POST"]),
        Route("/loras", ui.loras_page),
        Route("/events", ui.events),
        Route("/files/{kind}/{path:path}", ui.files),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = ui
    return Guard(app, token=token, port=port)
