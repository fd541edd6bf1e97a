"""A real, throwaway `redis-server` per test: free loopback port, own temp dir and config.

Tests kill it (`kill9`), stop it (`pause`/`resume`: SIGSTOP, a Redis that hangs) and start it again
on the same port with or without its data (`restart(keep_data=...)`). Options: append-only file on
(`appendonly=True`, fsync always, so a kill -9 loses nothing that was acknowledged) or off (nothing
is kept across a kill: `--save ''`), a password, TLS (`tls=True`: a throwaway CA from trustme;
the URL is `rediss://...?ssl_ca_certs=...`).

Fixtures (registered in tests/conftest.py): `redis_server` (plain, no persistence) and
`redis_factory` (call it with options; every server it made is stopped at teardown).
redis-server is Debian's `redis-server` package; .ci/run installs it when missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import pytest

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_path() -> str:
    """The redis-server binary; a test fails (not skips) without it: CI installs it."""
    if REDIS_SERVER is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (Debian/Ubuntu) or "
            "`brew install redis` (macOS); .ci/run installs it in CI"
        )
    return REDIS_SERVER


class RedisServer:
    """One redis-server process the test owns. `url` stays the same across restarts."""

    def __init__(
        self,
        folder: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        tls: bool = False,
        port: int | None = None,
    ):
        self.folder = Path(folder)
        self.data_dir = self.folder / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca_file: Path | None = None
        if tls:
            self._make_certs()

    # ---- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.folder / "redis.log"

    def client(self, **kwargs):
        """A redis-py client with short timeouts (for test set-up and inspection)."""
        from daemon.remote.redisurl import make_client

        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("connect_timeout", 2.0)
        return make_client(self.url, **kwargs)

    # ---- life cycle --------------------------------------------------------------------------
    def _make_certs(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.folder / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.folder / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(self.folder / "server.crt"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.folder / "server.crt"), append=True)

    def _argv(self) -> list[str]:
        argv = [
            redis_server_path(),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.tls:
            argv += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.folder / "server.crt"),
                "--tls-key-file", str(self.folder / "server.key"),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def start(self) -> "RedisServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        client = self.client(socket_timeout=1.0, connect_timeout=1.0, retries=0)
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        # With the AOF on, wait until it is loaded (PING answers during loading).
                        if int(client.info("persistence").get("loading", 0)) == 0:
                            return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                    last = exc
                time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError(
            f"redis-server on port {self.port} not ready in {START_TIMEOUT_S} s ({last}): {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL, as a crash or power loss of the Redis machine looks to its clients."""
        if self.alive():
            assert self.proc is not None
            self.resume()
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung or unreachable Redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, keep_data: bool) -> "RedisServer":
        """Stop (kill -9 when still running) and start again on the same port; keep_data=False
        starts from an empty data dir, as a Redis that lost its disk (or never persisted)."""
        self.kill9()
        if not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir.mkdir(parents=True)
        return self.start()

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def redis_factory(tmp_path_factory) -> Iterator[Callable[..., RedisServer]]:
    """Make (and start) redis-servers with options; all are stopped at teardown."""
    servers: list[RedisServer] = []

    def make(*, appendonly: bool = False, password: str | None = None, tls: bool = False) -> RedisServer:
        folder = tmp_path_factory.mktemp("redis")
        server = RedisServer(folder, appendonly=appendonly, password=password, tls=tls)
        servers.append(server)
        last: Exception | None = None
        for _ in range(3):  # the free port can be taken between probe and bind: try another
            try:
                return server.start()
            except RuntimeError as exc:
                last = exc
                server.kill9()
                server.port = _free_port()
        raise RuntimeError(f"could not start redis-server: {last}")

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    """A plain redis-server (no password, no persistence) for one test."""
    return redis_factory()
