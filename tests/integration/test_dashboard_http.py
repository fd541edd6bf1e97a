"""The dashboard over real HTTP (uvicorn in a thread, stdlib http.client sending raw paths):
files only from lorad's folders, the token off loopback, the Host check on loopback, CSRF and
Origin on every action, and the pure rules behind them."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
from conftest import wait_for

from daemon.jobs import JobStore
from daemon.settings import SettingsError, parse_ui_address, resolve
from daemon.ui import views
from daemon.ui.server import UIProblem, UIServer, check_binding

SECRET = "root:x:0:0 secret outside lorad"


class Log:
    """Collects the server's log calls (the real daemon logs them through structlog)."""

    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def _settings(tmp_path: Path, **env: str):
    return resolve(
        env={"LORAD_ASSETS": str(tmp_path / "assets"), "LORAD_REGISTRY": str(tmp_path / "config.json"), **env}
    )


@pytest.fixture
def served(tmp_path):
    """start(**env) -> (settings, port, store): a real dashboard on a free port of this machine."""
    servers: list[UIServer] = []

    def start(limits: dict | None = None, **env: str):
        env.setdefault("LORAD_UI", "127.0.0.1:0")
        s = _settings(tmp_path, **env)
        s.training_data.mkdir(parents=True, exist_ok=True)
        s.loras.mkdir(parents=True, exist_ok=True)
        store = JobStore(s.jobs_db, jobs_dir=s.jobs_dir)
        server = UIServer(s, threading.Event(), Log(), **(limits or {}))
        assert server.start(), server.log.lines
        servers.append(server)
        wait_for(lambda: server.server is not None and server.server.started, 10, message="uvicorn started")
        port = server.server.servers[0].sockets[0].getsockname()[1]
        return s, port, store

    yield start
    for server in servers:
        server.stop()


def get(port: int, path: str, headers: dict | None = None, method: str = "GET", body: str | None = None):
    """One raw request to 127.0.0.1 (the path is sent exactly as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _job(store: JobStore, s, name: str = "alice", state: str = "training"):
    folder = s.training_data / f"ohwx_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    job = store.create(job_id=f"20260101-000000-{name[:4]}", dataset_path=folder, name=name, trigger="ohwx",
                       fingerprint=f"fp-{name}", ready_token=None, settings={"engine": "scripted"})  # fmt: skip
    if state != "queued":
        for step in ("preparing", "training"):
            store.transition(job.id, step)
    return store.get(job.id)


# -- files ----------------------------------------------------------------------------------

TRAVERSALS = [
    "/files/../../etc/passwd",
    "/files/loras/../../../../etc/passwd",
    "/files/loras/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/files/loras/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    "/files/loras/..%2f..%2fsecret.txt",
    "/files/loras/%252e%252e%252fsecret.txt",  # double-encoded: decoded once, then taken literally
    "/files/loras/%2fetc%2fpasswd",
    "/files/loras//etc/passwd",
    "/files/loras/..\\..\\secret.txt",
    "/files/loras/a.png%00.png",
    "/files/loras/escape.png",  # a symlink out of the loras folder
    "/files/loras/sub/escape.png",  # a symlinked folder out of it
    "/files/jobs/20260101-000000-alic/render/../../../../secret.txt",
    "/files/jobs/20260101-000000-alic/data/0001.png",  # work dir, but not its render folder
    "/files/jobs/20260101-000000-alic/render/snapshot.png",  # a link from render/ into data/
    "/files/jobs/../../secret.txt",
    "/files/state/jobs.db",
    "/files/loras",
]


def test_files_are_served_only_from_lorads_folders(served, tmp_path):
    s, port, store = served()
    job = _job(store, s)
    secret = tmp_path / "assets" / "secret.txt"  # beside the loras folder, not in it
    secret.write_text(SECRET)
    (s.loras / "a.png").write_bytes(b"\x89PNG lora render")
    (s.loras / "escape.png").symlink_to(secret)
    (s.loras / "sub").symlink_to(tmp_path / "assets")
    render = s.jobs_dir / job.id / "render"
    render.mkdir(parents=True)
    (render / "compare.png").write_bytes(b"\x89PNG compare")
    (s.jobs_dir / job.id / "data").mkdir()
    (s.jobs_dir / job.id / "data" / "0001.png").write_bytes(b"\x89PNG user image")
    (render / "snapshot.png").symlink_to(s.jobs_dir / job.id / "data" / "0001.png")

    assert get(port, "/files/loras/a.png")[2] == b"\x89PNG lora render"
    status, headers, body = get(port, f"/files/jobs/{job.id}/render/compare.png")
    assert (status, body) == (200, b"\x89PNG compare")
    assert headers["content-security-policy"] == "sandbox"
    for path in TRAVERSALS:
        status, _headers, body = get(port, path)
        assert status in (307, 400, 404), (path, status)  # 307: /files/loras -> /files/loras/ (404)
        assert b"secret" not in body and b"root:" not in body and b"user image" not in body, path


@pytest.mark.parametrize(
    "relative, ok",
    [("a.png", True), ("sub/b.png", True), ("../a.png", False), ("sub/../a.png", False), ("./a.png", False),
     ("", False), ("/etc/passwd", False), ("a.png/", False), ("sub\\b.png", False), ("a\x00.png", False),
     ("missing.png", False), ("sub", False), ("link.png", False), ("inner.png", True)],
)  # fmt: skip
def test_inside_table(tmp_path, relative, ok):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    (tmp_path / "outside.png").write_bytes(b"o")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "inner.png").symlink_to(root / "a.png")  # a link that stays inside is fine
    assert (views.inside(root, relative) is not None) is ok


# -- token and Host ---------------------------------------------------------------------------


def test_non_loopback_address_without_token_is_refused(tmp_path):
    with pytest.raises(UIProblem, match="ui_token"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "t0ken")
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    s = _settings(tmp_path, LORAD_UI="0.0.0.0:0")
    log = Log()
    assert UIServer(s, threading.Event(), log).start() is False
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("error", "ui.unavailable")]
    assert "ui_token" in log.lines[0][2]["reason"]


def test_token_checked_on_every_request_when_bound_to_all_addresses(served):
    token = "t0ken-" + os.urandom(8).hex()
    s, port, store = served(LORAD_UI="0.0.0.0:0", LORAD_UI_TOKEN=token)  # the client only talks to 127.0.0.1
    job = _job(store, s)
    (s.loras / "a.png").write_bytes(b"png")
    for path in ("/", f"/jobs/{job.id}", "/loras", "/events", "/files/loras/a.png", "/static/app.js",
                 f"/jobs/{job.id}/confirm/cancel", "/nothing-here"):  # fmt: skip
        assert get(port, path)[0] == 401, path
        assert get(port, path, {"Authorization": "Bearer wrong"})[0] == 401, path
        assert get(port, path, {"Cookie": "lorad_token=wrong"})[0] == 401, path
    assert get(port, "/?token=wrong")[0] == 401
    assert get(port, f"/jobs/{job.id}/cancel", method="POST", body="")[0] == 401
    assert get(port, "/", {"Authorization": f"Bearer {token}", "Host": "lorad.lan:8765"})[0] == 200
    status, headers, _ = get(port, f"/jobs/{job.id}?token={token}&x=1")
    assert status == 303 and headers["location"] == f"/jobs/{job.id}?x=1"  # the token leaves the URL...
    cookie = headers["set-cookie"]
    assert f"lorad_token={token}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert get(port, "/loras", {"Cookie": f"lorad_token={token}"})[0] == 200  # ...for a cookie
    assert store.get(job.id).state == "training" and not store.get(job.id).cancel_requested


def test_loopback_dashboard_answers_only_to_loopback_host_names(served):
    _s, port, _store = served()
    assert get(port, "/")[0] == 200
    assert get(port, "/", {"Host": f"localhost:{port}"})[0] == 200
    for host in (
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1.evil.example:{port}",
        f"127.0.0.1:{port + 1}",
    ):
        assert get(port, "/", {"Host": host})[0] == 403, host


@pytest.mark.parametrize(
    "host, port, ok",
    [("127.0.0.1:8765", 8765, True), ("localhost:8765", 8765, True), ("[::1]:8765", 8765, True),
     ("localhost", 8765, True), ("127.0.0.1:8766", 8765, False), ("evil.com:8765", 8765, False),
     ("10.0.0.1:8765", 8765, False), (None, 8765, False), ("", 8765, False)],
)  # fmt: skip
def test_host_allowed_table(host, port, ok):
    assert views.host_allowed(host, port) is ok


# -- CSRF and Origin on actions ---------------------------------------------------------------


def _csrf(port: int, job_id: str, action: str) -> tuple[str, str]:
    status, headers, body = get(port, f"/jobs/{job_id}/confirm/{action}")
    assert status == 200
    cookie = re.search(r"lorad_csrf=([^;]+)", headers["set-cookie"]).group(1)
    field = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    assert field == cookie
    return cookie, field


def test_actions_need_the_csrf_token_and_the_dashboards_origin(served):
    s, port, store = served()
    job = _job(store, s, state="queued")
    cookie, field = _csrf(port, job.id, "cancel")
    own = f"http://127.0.0.1:{port}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = [
        ({**form, "Origin": own}, ""),  # no token at all
        ({**form, "Origin": own, "Cookie": f"lorad_csrf={cookie}"}, ""),  # cookie without the field
        ({**form, "Origin": own}, f"csrf={field}"),  # field without the cookie
        ({**form, "Origin": own, "Cookie": f"lorad_csrf={cookie}"}, "csrf=wrong"),
        ({**form, "Origin": own, "Cookie": "lorad_csrf=other"}, f"csrf={field}"),
        ({**form, "Origin": "http://evil.example", "Cookie": f"lorad_csrf={cookie}"}, f"csrf={field}"),
        ({**form, "Origin": "null", "Cookie": f"lorad_csrf={cookie}"}, f"csrf={field}"),
        ({**form, "Referer": "http://evil.example/x", "Cookie": f"lorad_csrf={cookie}"}, f"csrf={field}"),
        ({**form, "Cookie": f"lorad_csrf={cookie}"}, f"csrf={field}"),  # neither Origin nor Referer
    ]
    for headers, body in refused:
        status, _h, text = get(port, f"/jobs/{job.id}/cancel", headers, method="POST", body=body)
        assert status == 403, (headers, body, status)
        assert store.get(job.id).state == "queued"
    assert get(port, f"/jobs/{job.id}/cancel")[0] == 405  # a GET never acts
    status, headers, _ = get(port, f"/jobs/{job.id}/cancel", {**form, "Origin": own, "Cookie": f"lorad_csrf={cookie}"},
                             method="POST", body=f"csrf={field}")  # fmt: skip
    assert status == 303 and headers["location"].startswith(f"/jobs/{job.id}?msg=cancelled")
    assert store.get(job.id).state == "cancelled"
    assert (Path(job.dataset_path) / "CANCELLED").is_file()


def test_retry_and_retrain_go_through_the_cli_code(served):
    s, port, store = served()
    job = _job(store, s, state="queued")
    store.cancel(job.id)
    own = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/x-www-form-urlencoded"}
    cookie, field = _csrf(port, job.id, "retry")
    status, headers, _ = get(
        port, f"/jobs/{job.id}/retry", {**own, "Cookie": f"lorad_csrf={cookie}"}, "POST", f"csrf={field}"
    )
    assert status == 303 and "queued" in headers["location"]
    assert store.get(job.id).state == "queued" and store.get(job.id).attempt == 2
    # Retrying a queued job is refused with the CLI's words.
    status, headers, _ = get(
        port, f"/jobs/{job.id}/retry", {**own, "Cookie": f"lorad_csrf={cookie}"}, "POST", f"csrf={field}"
    )
    assert status == 303 and "only+failed%2C+cancelled+or+interrupted" in headers["location"]
    status, _h, _ = get(
        port, f"/jobs/{job.id}/retrain", {**own, "Cookie": f"lorad_csrf={cookie}"}, "POST", f"csrf={field}"
    )
    assert status == 303
    assert (Path(job.dataset_path) / "READY").read_text() == "force = true\n"


def test_same_origin_table():
    assert views.same_origin("http://127.0.0.1:8765", None, "127.0.0.1:8765", "http")
    assert not views.same_origin("http://127.0.0.1:8766", None, "127.0.0.1:8765", "http")
    assert not views.same_origin("https://127.0.0.1:8765", None, "127.0.0.1:8765", "http")
    assert views.same_origin(None, "http://127.0.0.1:8765/jobs/x", "127.0.0.1:8765", "http")
    assert not views.same_origin(None, "http://127.0.0.1:8765.evil.example/", "127.0.0.1:8765", "http")
    assert not views.same_origin(None, None, "127.0.0.1:8765", "http")
    assert not views.same_origin("http://127.0.0.1:8765", None, None, "http")


# -- pages, live stream, settings -------------------------------------------------------------


def test_pages_show_the_job_and_the_stream_sends_progress(served):
    s, port, store = served()
    job = _job(store, s)
    store.update(job.id, step=3, total_steps=10, loss=0.25, eta_s=40)
    workdir = s.jobs_dir / job.id
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "progress.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n{"step": 3, "loss": 0.25}\n{"step": 4, "lo'
    )
    status, _h, body = get(port, "/")
    assert status == 200 and job.id.encode() in body and b"3/10" in body
    status, _h, body = get(port, f"/jobs/{job.id}")
    assert status == 200 and b"[[1, 0.5], [3, 0.25]]" in body  # the torn last line is skipped
    assert get(port, "/jobs/nope")[0] == 404
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    reader = conn.makefile("rb")

    def next_event() -> dict:
        while True:
            line = reader.readline()
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    first = next_event()
    assert first["full"] and first["rows"][0]["step"] == 3
    store.update(job.id, step=4, loss=0.2)
    update = next_event()
    assert not update["full"] and [(r["id"], r["step"], r["pct"]) for r in update["rows"]] == [
        (job.id, 4, 40)
    ]
    conn.close()


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:8765", "127.0.0.1:8765"), ("false", None), ("off", None), ("0.0.0.0:9000", "0.0.0.0:9000"),
     ("[::1]:8765", "[::1]:8765")],
)  # fmt: skip
def test_ui_setting(value, expected):
    assert resolve(env={"LORAD_UI": value}).ui == expected


def test_ui_setting_from_the_file_and_bad_values():
    assert resolve().ui == "127.0.0.1:8765" and resolve().ui_token is None
    assert resolve(file_values={"ui": False}).ui is None
    assert resolve(file_values={"ui": True}).ui == "127.0.0.1:8765"
    for bad in ("8765", "localhost", "host:port", "127.0.0.1:70000", ""):
        with pytest.raises(SettingsError, match="setting 'ui'"):
            resolve(env={"LORAD_UI": bad})
    assert parse_ui_address("[::1]:8765") == ("::1", 8765)


def test_series_is_thinned_to_its_limit(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 1001)))
    points = views.read_series(path, limit=100)
    assert len(points) == 100 and points[0] == [1, 1.0] and points[-1][0] == 1000


def test_lora_groups_collect_versions(tmp_path):
    for name in (
        "alice.safetensors",
        "alice.v1.safetensors",
        "alice.v2.safetensors",
        "alice.png",
        "bob.v1.safetensors",
    ):
        (tmp_path / name).write_bytes(b"")
    assert views.lora_groups(tmp_path) == [
        {"name": "alice", "current": "alice", "versions": ["alice.v2", "alice.v1"]},
        {"name": "bob", "current": None, "versions": ["bob.v1"]},
    ]


def test_port_in_use_is_one_log_line_and_the_daemon_runs_on(daemon_factory):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        d = daemon_factory(extra_env={"LORAD_UI": f"127.0.0.1:{port}"}).start()
        lines = [e for e in d.events() if e.get("event", "").startswith("ui.")]
        assert [e["event"] for e in lines] == ["ui.unavailable"] and "in use" in lines[0]["reason"]
        assert d.log_has("daemon.started", ui=None) and d.proc.poll() is None
    finally:
        busy.close()


# -- hostile peers (issue 19: cases 1, 2 and 10) ----------------------------------------------


def _half_open(port: int, count: int) -> list[socket.socket]:
    """Connections that send a partial request line and never finish their headers."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        socks.append(sock)
    return socks


def _closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before it closed the connection; None while it is still open."""
    sock.settimeout(0.05)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except OSError:
        pass
    return data


def test_headers_must_arrive_within_the_deadline(served):
    _s, port, _store = served(limits={"header_timeout_s": 0.5})
    (slow,) = _half_open(port, 1)
    trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
    trickle.sendall(b"GET / HTTP/1.1\r\n")
    # A byte now and then does not extend the deadline; the server closes both.
    wait_for(lambda: trickle.sendall(b"X") or _closed_by_server(slow) is not None, 10, message="slow closed")
    wait_for(lambda: _closed_by_server(trickle) is not None, 10, message="trickling connection closed")
    assert get(port, "/")[0] == 200  # a whole request in time is served


def test_connections_over_the_cap_are_refused_at_once(served):
    _s, port, _store = served(limits={"max_connections": 4, "header_timeout_s": 60})
    held = _half_open(port, 4)
    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
    answer = wait_for(lambda: _closed_by_server(extra), 10, message="the fifth connection answered")
    assert answer.startswith(b"HTTP/1.1 503 ")
    for sock in held:
        sock.close()
    wait_for(lambda: get(port, "/")[0] == 200, 10, message="served again below the cap")


def test_live_update_streams_have_their_own_lower_cap(served):
    _s, port, _store = served(limits={"max_streams": 2})
    streams = []
    for _ in range(2):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 200")
        streams.append(conn)
    status, headers, _ = get(port, "/events")
    assert status == 503 and "retry-after" in {k.lower() for k in headers}
    assert get(port, "/")[0] == 200  # pages are still served
    streams[0].close()
    wait_for(lambda: _stream_opens(port), 10, message="a stream slot is free again")
    for conn in streams[1:]:
        conn.close()


def _stream_opens(port: int) -> bool:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        conn.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return conn.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    finally:
        conn.close()


def test_accept_errors_are_one_log_line_per_interval():
    from daemon.ui.server import AcceptErrorLimiter

    log = Log()
    clock = [100.0]
    limiter = AcceptErrorLimiter(log, interval_s=60, clock=lambda: clock[0])
    error = OSError(24, "Too many open files")
    context = {"message": "socket.accept() out of system resource", "exception": error}
    for _ in range(4000):
        limiter(None, context)
    clock[0] += 61
    limiter(None, context)
    assert [(lvl, ev, kw.get("suppressed")) for lvl, ev, kw in log.lines] == [
        ("warning", "ui.accept_failed", 0),
        ("warning", "ui.accept_failed", 3999),
    ]


def test_lorad_ui_url_encodes_the_token_and_the_dashboard_accepts_it(served, monkeypatch, capsys):
    import types
    import webbrowser

    from daemon.commands import cmd_ui

    token = "a+b/c=d+" + "x" * 16 + "=="
    s, port, _store = served(LORAD_UI="0.0.0.0:0", LORAD_UI_TOKEN=token)
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    at_port = _settings(s.assets.parent, LORAD_UI=f"127.0.0.1:{port}", LORAD_UI_TOKEN=token)
    assert cmd_ui(at_port, types.SimpleNamespace(print_only=False)) == 0
    assert token not in capsys.readouterr().out  # printed masked
    (url,) = opened
    path = url.split(f":{port}", 1)[1]
    status, headers, _ = get(port, path)
    assert status == 303 and headers["location"] == "/", (status, path)
    assert "lorad_token=" in headers["set-cookie"]


@pytest.mark.parametrize(
    "path, query, location",
    [("/jobs/x", "", "/jobs/x"), ("//evil.example/x", "", "/evil.example/x"),
     ("/\\evil.example/x", "a=1", "/%5Cevil.example/x?a=1"), ("///a//b", "", "/a//b"),
     ("/a b?#", "", "/a%20b%3F%23"), ("", "", "/")],
)  # fmt: skip
def test_redirect_location_is_same_origin(path, query, location):
    assert views.local_location(path, query) == location


def test_token_redirect_never_leaves_the_dashboard(served):
    token = "t0ken-" + os.urandom(8).hex()
    _s, port, _store = served(LORAD_UI="0.0.0.0:0", LORAD_UI_TOKEN=token)
    for path in (f"//evil.example/x?token={token}", f"/\\evil.example/x?token={token}"):
        status, headers, _ = get(port, path)
        assert status == 303
        location = headers["location"]
        assert location.startswith("/") and not location.startswith(("//", "/\\")), location
        assert urllib.parse.urlsplit(location).netloc == "", location


@pytest.mark.parametrize("token", ["x", "short-token-15ch"[:15], "   " + "y" * 10])
def test_ui_token_must_be_at_least_16_characters(token):
    with pytest.raises(SettingsError, match="ui_token"):
        resolve(env={"LORAD_UI_TOKEN": token})
    assert resolve(env={"LORAD_UI_TOKEN": "z" * 16}).ui_token == "z" * 16


def test_lora_images_work_for_names_with_url_characters(served):
    s, port, _store = served()
    names = ["a?b", "c#d", "e%41f", "g h"]
    for i, name in enumerate(names):
        (s.loras / f"{name}.safetensors").write_bytes(b"not a real header")
        (s.loras / f"{name}.png").write_bytes(f"png-{i}".encode())
    status, _h, body = get(port, "/loras")
    assert status == 200
    sources = re.findall(r'<img src="([^"]+)"', body.decode())
    assert len(sources) == len(names), sources
    served_bytes = set()
    for src in sources:
        src = src.replace("&amp;", "&")
        status, _h, data = get(port, src)
        assert status == 200, src
        served_bytes.add(data)
    assert served_bytes == {f"png-{i}".encode() for i in range(len(names))}


def test_an_action_body_too_large_is_refused_before_it_is_read(served):
    s, port, store = served()
    job = _job(store, s)
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(
        f"POST /jobs/{job.id}/cancel HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000000\r\n\r\n".encode()
    )
    conn.sendall(b"csrf=" + b"x" * 8000)  # past the limit; the rest never comes
    assert conn.makefile("rb").readline().startswith(b"HTTP/1.1 413")
    conn.close()
    assert not store.get(job.id).cancel_requested


# -- learning made visible (issue 22) -------------------------------------------------------


def test_sample_grid_table(tmp_path):
    samples = tmp_path / "samples"
    assert views.sample_grid(samples, "/u") == {"prompts": [], "rows": []}
    samples.mkdir()
    (samples / "prompts.json").write_text('["a red square", "a red circle"]')
    for name in ("0000000_1.png", "0000000_2.png", "0000040_1.png", ".0000080_1.png.tmp", "x.png"):
        (samples / name).write_bytes(b"\x89PNG")
    assert views.sample_grid(samples, "/u") == {
        "prompts": ["a red square", "a red circle"],
        "rows": [
            {"step": 0, "images": ["/u/0000000_1.png", "/u/0000000_2.png"]},
            {"step": 40, "images": ["/u/0000040_1.png", None]},  # the second prompt not rendered yet
        ],
    }
    (samples / "prompts.json").unlink()  # no prompts file: numbered columns
    assert views.sample_grid(samples, "/u")["prompts"] == ["prompt 1", "prompt 2"]


def test_metrics_line():
    assert views.metrics_line(None) == ""
    line = views.metrics_line({"steps": 120, "loss_start": 1.2087, "loss_end": 0.903, "lora_effect": 0.0425})
    assert line == "120 steps · loss 1.21 → 0.903, LoRA effect 0.043"


def _published(s, store, name: str = "alice"):
    """A done job with a published LoRA, its report (metrics, loss.html, samples) and renders."""
    from daemon.safetensors_file import write as write_safetensors

    job = _job(store, s, name)
    for state in ("rendering", "publishing"):
        store.transition(job.id, state)
    raw = s.loras / "raw.bin"
    header = {"__metadata__": {"modelspec.trigger_phrase": "ohwx", "lorad.job_id": job.id}}
    raw.write_bytes(b"")
    write_safetensors(raw, s.loras / f"{name}.safetensors", header, offset=0, data_len=0)
    raw.unlink()
    (s.loras / f"{name}.png").write_bytes(b"\x89PNG render")
    (s.loras / f"{name}.compare.png").write_bytes(b"\x89PNG compare")
    report = s.loras / f"{name}.report"
    (report / "samples").mkdir(parents=True)
    metrics = {"steps": 120, "loss_start": 1.2, "loss_end": 0.9, "loss_curve": [[1, 1.2], [120, 0.9]],
               "lora_effect": 0.004, "warnings": ["the LoRA barely changes the picture (train longer or raise the learning rate)"]}  # fmt: skip
    (report / "metrics.json").write_text(json.dumps(metrics))
    (report / "loss.html").write_text("<script>1</script>")
    (report / "samples" / "prompts.json").write_text('["ohwx, portrait photo"]')
    (report / "samples" / "0000040_1.png").write_bytes(b"\x89PNG sample")
    outputs = {"lora": str(s.loras / f"{name}.safetensors"), "report": str(report), "metrics": metrics}
    store.transition(job.id, "done", outputs=outputs)
    return store.get(job.id)


def test_job_page_shows_metrics_report_links_and_samples(served):
    s, port, store = served()
    job = _published(s, store)
    status, _h, body = get(port, f"/jobs/{job.id}")
    page = body.decode()
    assert status == 200
    assert "120 steps · loss 1.2 → 0.9, LoRA effect 0.004" in page
    assert "the LoRA barely changes the picture" in page
    assert (
        'href="/files/loras/alice.report/loss.html"' in page
        and "/files/loras/alice.report/metrics.json" in page
    )
    assert 'src="/files/loras/alice.report/samples/0000040_1.png"' in page and 'data-step="40"' in page
    status, headers, body = get(port, "/files/loras/alice.report/loss.html")
    assert status == 200 and "sandbox allow-scripts" in headers["content-security-policy"]
    grid = json.loads(get(port, f"/jobs/{job.id}/samples.json")[2])
    assert grid["rows"] == [{"step": 40, "images": ["/files/loras/alice.report/samples/0000040_1.png"]}]


def test_samples_of_a_training_job_are_served_from_its_work_dir_only(served):
    s, port, store = served()
    job = _job(store, s)
    samples = s.jobs_dir / job.id / "samples"
    samples.mkdir(parents=True)
    (samples / "0000000_1.png").write_bytes(b"\x89PNG live sample")
    (s.jobs_dir / job.id / "secret.txt").write_text(SECRET)
    grid = json.loads(get(port, f"/jobs/{job.id}/samples.json")[2])
    assert grid["rows"][0]["images"] == [f"/files/jobs/{job.id}/samples/0000000_1.png"]
    assert get(port, f"/files/jobs/{job.id}/samples/0000000_1.png")[2] == b"\x89PNG live sample"
    assert get(port, f"/files/jobs/{job.id}/samples/../secret.txt")[0] == 404


def test_library_page_shows_trigger_metrics_downloads_and_connects_live(served):
    s, port, store = served()
    _published(s, store)
    status, _h, body = get(port, "/loras")
    page = body.decode()
    assert status == 200 and 'data-page="loras"' in page  # app.js connects the live marker there too
    assert "trigger word: <code>ohwx</code>" in page
    assert "120 steps · loss 1.2 → 0.9, LoRA effect 0.004" in page
    for name in ("alice.safetensors", "alice.png", "alice.compare.png"):
        assert f'href="/files/loras/{name}" download' in page
