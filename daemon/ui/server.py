"""Serve the dashboard in a thread of `lorad run` (uvicorn on its own event loop).

Imported only when the `ui` setting is on, so `ui = false` loads neither Starlette nor uvicorn.
The socket is bound here first: a port in use is one `ui.unavailable` line and the daemon goes
on without the dashboard (uvicorn itself would exit the process).

A hostile client cannot hurt the daemon through it (issue 19): connections are capped when they
are accepted (over the cap: a 503 and the socket closed at once), request headers must arrive
within HEADER_TIMEOUT_S (slowloris), live-update streams have their own lower cap (app.py), and
an accept error (out of file descriptors) is one log line per interval, not one per attempt.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from daemon.settings import Settings, parse_ui_address
from daemon.ui.views import is_loopback

if TYPE_CHECKING:
    import uvicorn


HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this, however they trickle in
LOG_INTERVAL_S = 60.0  # accept errors and refused connections: one log line per interval
BUSY_BODY = b"lorad dashboard: too many connections; try again shortly\n"
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 5\r\n"
    b"connection: close\r\ncontent-length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY
)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class ConnectionCaps:
    """What the dashboard may hold at once, from the file limit (`connection_caps`)."""

    connections: int  # open connections; one over it is answered 503 and closed
    streams: int  # live-update streams (a socket and a database connection each, while a page is open)
    accept_batch: int  # connections asyncio accepts per loop tick (the listen backlog)


def connection_caps(soft_file_limit: int) -> ConnectionCaps:
    """The dashboard's share of the file limit (pure): at most a quarter for open connections, so
    it can never take the descriptors the daemon needs. asyncio accepts up to `backlog` sockets a
    loop tick and an over-cap one is closed only ticks later: a flood that reconnects at once kept
    several batches open beside the capped ones (64 + 64 a tick filled a 256 limit, and a publish
    failed with EMFILE). So a batch is an eighth of the cap; streams are an eighth too."""
    if soft_file_limit < 0:  # RLIM_INFINITY
        soft_file_limit = 1 << 20
    connections = max(4, min(64, soft_file_limit // 4))
    return ConnectionCaps(connections, max(2, connections // 8), max(2, connections // 8))


def soft_file_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class RateLimitedLog:
    """One warning line per interval for a repeated condition; the next line says how many
    occurrences were not logged in between (`suppressed`)."""

    def __init__(
        self, log, event: str, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ):
        self.log, self.event, self.interval_s, self.clock = log, event, interval_s, clock
        self.last: float | None = None
        self.suppressed = 0

    def hit(self, **fields) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            self.suppressed += 1
            return
        self.log.warning(self.event, suppressed=self.suppressed, **fields)
        self.last, self.suppressed = now, 0


class AcceptErrorLimiter:
    """The dashboard loop's exception handler: asyncio reports every failed accept() (EMFILE)
    through it, thousands a second under a flood; lorad logs one `ui.accept_failed` per interval.
    Anything else goes to asyncio's default handler."""

    def __init__(self, log, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.limited = RateLimitedLog(log, "ui.accept_failed", interval_s, clock)

    def __call__(self, loop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self.limited.hit(error=f"{type(exc).__name__}: {exc}", message=str(context.get("message", "")))
        elif loop is not None:
            loop.default_exception_handler(context)


def _guarded_protocol(max_connections: int, header_timeout_s: float, on_busy: Callable[[], None]):
    """uvicorn's h11 protocol with a connection cap at accept time and a header deadline.
    uvicorn has neither: `limit_concurrency` answers 503 only after a request's headers are
    parsed, and a connection that never finishes its headers is kept forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            if len(self.connections) >= max_connections:
                self.transport = transport
                transport.write(BUSY_RESPONSE)
                transport.close()
                on_busy()
                return
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the next request on a kept-alive connection begins
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class UIProblem(Exception):
    """Why the dashboard is not served (the daemon runs on without it)."""


def check_binding(host: str, token: str | None) -> None:
    """A non-loopback address serves the dashboard to the network: only with a token (pure)."""
    if not is_loopback(host) and not token:
        raise UIProblem(
            f"the dashboard would listen on {host}, which other machines can reach, without a token: "
            f"set ui_token (or LORAD_UI_TOKEN) to a long random string, or bind ui to 127.0.0.1"
        )


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _quiet_server_class(exception_handler: Callable):
    """uvicorn's Server with a 1 s housekeeping tick instead of 0.1 s: the idle daemon's only
    wake-ups (bench P3). The tick only checks for exit (stop() then takes up to a second) and
    refreshes the Date header; `counter` advances by ten so that happens every tick. Its loop
    reports errors through `exception_handler` (accept errors rate-limited)."""
    import asyncio

    import uvicorn

    class QuietServer(uvicorn.Server):
        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            asyncio.get_running_loop().set_exception_handler(exception_handler)
            await super().serve(sockets)

        async def main_loop(self) -> None:
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 10) % 864000
                await asyncio.sleep(1.0)
                should_exit = await self.on_tick(counter)

    return QuietServer


class UIServer:
    def __init__(self, settings: Settings, stopping: threading.Event, log, *, max_connections: int | None = None,
                 max_streams: int | None = None, header_timeout_s: float = HEADER_TIMEOUT_S):  # fmt: skip
        self.settings, self.stopping, self.log = settings, stopping, log
        caps = connection_caps(soft_file_limit())
        self.max_connections = max_connections or caps.connections
        self.max_streams = max_streams or min(caps.streams, self.max_connections)
        self.accept_batch = caps.accept_batch
        self.header_timeout_s = header_timeout_s
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self) -> bool:
        """Bind and start serving; False (with one log line and a stderr line) when it cannot."""
        s = self.settings
        assert s.ui is not None
        try:
            host, port = parse_ui_address(s.ui)
            check_binding(host, s.ui_token)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(self.accept_batch)
            except OSError:
                sock.close()
                raise
        except (UIProblem, ValueError) as exc:
            return self._refused(str(exc))
        except OSError as exc:
            return self._refused(f"cannot listen on {s.ui}: {exc.strerror or exc}; the daemon runs on without the dashboard "
                                 f"(set ui to another host:port, or ui = false)")  # fmt: skip
        port = sock.getsockname()[1]
        import uvicorn

        from daemon.ui.app import create_app

        _QuietServer = _quiet_server_class(AcceptErrorLimiter(self.log))
        busy = RateLimitedLog(self.log, "ui.busy")
        protocol = _guarded_protocol(
            self.max_connections,
            self.header_timeout_s,
            lambda: busy.hit(max_connections=self.max_connections),
        )
        app = create_app(s, token=s.ui_token, port=port, stopping=self.stopping, max_streams=self.max_streams)
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2, ws="none",
            server_header=False, http=protocol, backlog=self.accept_batch,
        )  # fmt: skip
        self.server = _QuietServer(config)
        self.url = url_of(host, port)
        self.thread = threading.Thread(target=self._serve, args=(sock,), name="lorad-ui", daemon=True)
        self.thread.start()
        self.log.info("ui.started", url=self.url, host=host, port=port, token=bool(s.ui_token),
                      max_connections=self.max_connections, max_streams=self.max_streams)  # fmt: skip
        return True

    def _serve(self, sock: socket.socket) -> None:
        try:
            assert self.server is not None
            self.server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from uvicorn included: the daemon must go on
            self.log.error("ui.crashed", error=f"{type(exc).__name__}: {exc}")

    def _refused(self, reason: str) -> bool:
        print(f"lorad: dashboard not started: {reason}", file=sys.stderr)
        self.log.error("ui.unavailable", reason=reason, ui=self.settings.ui)
        return False

    def stop(self, timeout: float = 3.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
