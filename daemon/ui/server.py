"""Serve the dashboard in a thread of `lorad run` (uvicorn on its own event loop).

Imported only when the `ui` setting is on, so `ui = false` loads neither Starlette nor uvicorn.
The socket is bound here first: a port in use is one `ui.unavailable` line and the daemon goes
on without the dashboard (uvicorn itself would exit the process).
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import TYPE_CHECKING

from daemon.settings import Settings, parse_ui_address
from daemon.ui.views import is_loopback

if TYPE_CHECKING:
    import uvicorn


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


def _quiet_server_class():
    """uvicorn's Server with a 1 s housekeeping tick instead of 0.1 s: the idle daemon's only
    wake-ups (bench P3). The tick only checks for exit (stop() then takes up to a second) and
    refreshes the Date header; `counter` advances by ten so that happens every tick."""
    import asyncio

    import uvicorn

    class QuietServer(uvicorn.Server):
        async def main_loop(self) -> None:
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 10) % 864000
                await asyncio.sleep(1.0)
                should_exit = await self.on_tick(counter)

    return QuietServer


class UIServer:
    def __init__(self, settings: Settings, stopping: threading.Event, log):
        self.settings, self.stopping, self.log = settings, stopping, log
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
                sock.listen(64)
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

        _QuietServer = _quiet_server_class()

        app = create_app(s, token=s.ui_token, port=port, stopping=self.stopping)
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2, ws="none",
            server_header=False,
        )  # fmt: skip
        self.server = _QuietServer(config)
        self.url = url_of(host, port)
        self.thread = threading.Thread(target=self._serve, args=(sock,), name="lorad-ui", daemon=True)
        self.thread.start()
        self.log.info("ui.started", url=self.url, host=host, port=port, token=bool(s.ui_token))
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
