"""Notifications (issue 15): message building, masking, settings, delivery to a real local HTTP
server through apprise's json:// target, `lorad notify test`, and a real daemon that notifies per
job end. macOS Notification Center cannot exist here: `macosx://` is checked only as a URL."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT, wait_for

from daemon import notify
from daemon.notify import Message, Notifier, build_message, duration_text, mask, outcomes_from, scrub
from daemon.sample import make_dataset
from daemon.settings import SettingsError, resolve, split_list

SECRET = "s3cr3t-Passw0rd"
TOKEN = "tk_9f8e7d6c5b4a"


# -- local endpoints -----------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on a free loopback port that records every JSON POST."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Hanging:
    """Accepts connections and never answers (a target that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            self.event.set()

    def close(self):
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def dead_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hanging():
    h = Hanging()
    yield h
    h.close()


class Recorder:
    """A log sink: the events a Notifier writes, as (level, event, fields)."""

    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))

    def events(self, name):
        return [f for _l, e, f in self.lines if e == name]


# -- the message (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [(None, ""), (-1, ""), (0, "0s"), (12.4, "12s"), (59.6, "1m 00s"), (185, "3m 05s"), (3720, "1h 02m")],
)
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


BASE = {"id": "J1", "name": "alice", "step": 40, "total_steps": 100, "started_at": 1000.0, "ended_at": 1185.0,
        "error": None, "render": None}  # fmt: skip


@pytest.mark.parametrize(
    "view, title, body, attach, kind",
    [
        ({**BASE, "state": "done", "step": 100, "render": "/a/alice.png"}, "lorad: LoRA ready",
         "alice: done, 100 steps in 3m 05s (job J1)", "/a/alice.png", "success"),
        ({**BASE, "state": "done", "total_steps": None, "started_at": None}, "lorad: LoRA ready",
         "alice: done (job J1)", None, "success"),
        ({**BASE, "state": "failed", "error": "\n  out of memory at step 40\nTraceback ..."},
         "lorad: LoRA training failed", "alice: failed at step 40/100 after 3m 05s: out of memory at step 40 (job J1)",
         None, "failure"),
        ({**BASE, "state": "failed", "step": None, "started_at": None, "error": None, "render": "/x.png"},
         "lorad: LoRA training failed", "alice: failed: unknown error (job J1)", None, "failure"),
        ({**BASE, "state": "interrupted"}, "lorad: LoRA training interrupted",
         "alice: interrupted at step 40/100; it resumes from its last checkpoint when lorad runs (job J1)", None, "warning"),
        ({**BASE, "state": "cancelled"}, "lorad: LoRA training cancelled", "alice: cancelled at step 40/100 (job J1)",
         None, "info"),
        ({**BASE, "state": "training"}, "lorad: training", "alice: training at step 40/100 (job J1)", None, "info"),
    ],
)  # fmt: skip
def test_build_message(view, title, body, attach, kind):
    assert build_message(view) == Message(title, body, attach, kind)


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, text, items",
    [
        ("notify", "", []),
        ("notify", "ntfy://ntfy.sh/topic", ["ntfy://ntfy.sh/topic"]),
        ("notify", "ntfy://ntfy.sh/a, json://127.0.0.1:9/", ["ntfy://ntfy.sh/a", "json://127.0.0.1:9/"]),
        # a comma inside a URL stays there: only a comma before the next scheme:// splits
        (
            "notify",
            "mailto://u:p@x.org?to=a@x.org,b@x.org,macosx://",
            ["mailto://u:p@x.org?to=a@x.org,b@x.org", "macosx://"],
        ),
        ("notify_on", "done, failed,,interrupted", ["done", "failed", "interrupted"]),
    ],
)
def test_split_list(key, text, items):
    assert split_list(key, text) == items


@pytest.mark.parametrize(
    "file_values, env, notify, notify_on",
    [
        ({}, {}, (), ("done", "failed", "interrupted")),
        ({"notify": ["ntfy://ntfy.sh/a", "macosx://"], "notify_on": ["done"]}, {}, ("ntfy://ntfy.sh/a", "macosx://"), ("done",)),
        ({"notify": ["ntfy://ntfy.sh/a"]}, {"LORAD_NOTIFY": "json://h.example/x,ntfy://ntfy.sh/b"},
         ("json://h.example/x", "ntfy://ntfy.sh/b"), ("done", "failed", "interrupted")),
        ({}, {"LORAD_NOTIFY": "", "LORAD_NOTIFY_ON": "cancelled,done,done"}, (), ("cancelled", "done")),
        ({"notify_on": []}, {}, (), ()),
    ],
)  # fmt: skip
def test_notify_settings(file_values, env, notify, notify_on):
    s = resolve(file_values=file_values, env=env)
    assert (s.notify, s.notify_on) == (notify, notify_on)


@pytest.mark.parametrize(
    "file_values, env, words",
    [
        (
            {"notify_on": ["done", "finished"]},
            {},
            ["'notify_on'", "lorad.toml", "'finished'", "known:", "interrupted"],
        ),
        ({}, {"LORAD_NOTIFY_ON": "done,nope"}, ["'notify_on'", "LORAD_NOTIFY_ON", "'nope'"]),
        ({"notify": "ntfy://a/b"}, {}, []),  # a string in the file is one URL (comma rules apply): fine
        ({"notify": [1, 2]}, {}, ["'notify'", "list of strings"]),
        ({"notify": {"a": 1}}, {}, ["'notify'", "list of strings"]),
        ({"notify_timeout_s": 0}, {}, ["'notify_timeout_s'", "greater than 0"]),
    ],
)
def test_notify_settings_errors_name_the_key(file_values, env, words):
    if not words:
        assert resolve(file_values=file_values, env=env).notify == ("ntfy://a/b",)
        return
    with pytest.raises(SettingsError) as err:
        resolve(file_values=file_values, env=env)
    for word in words:
        assert word in str(err.value)


# -- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown, hidden",
    [
        (f"ntfy://lorad:{SECRET}@ntfy.sh/mytopic", "ntfy://lorad:****@ntfy.sh/m...c", [SECRET, "mytopic"]),
        (f"ntfys://{TOKEN}@ntfy.sh/mytopic", None, [TOKEN, "mytopic"]),
        (f"ntfy://127.0.0.1:{8080}/{TOKEN}", "ntfy://127.0.0.1:8080/t...a", [TOKEN]),
        ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#general", None,
         ["A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7FQ"]),
        ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", None, ["4174216298", "JHMHI8qBe7bk2ZwO5U711o3dV_js"]),
        ("tgram://123456789:AABBCCddeeff00112233/987654", None, ["AABBCCddeeff00112233"]),
        (f"mailtos://lorad:{SECRET}@gmail.com?to=me@example.com", None, [SECRET]),
        (f"json://127.0.0.1:8080/hooks/{TOKEN}", "json://127.0.0.1:8080/****", [TOKEN]),
        (f"jsons://user:{SECRET}@hooks.example.com/in/{TOKEN}?-key={TOKEN}", "jsons://user:****@hooks.example.com/****",
         [SECRET, TOKEN]),
        ("json://127.0.0.1:8080/", "json://127.0.0.1:8080/", []),
        # unknown to apprise (or macosx:// off macOS): scheme and host only
        (f"bogus://user:{SECRET}@host.example/{TOKEN}", "bogus://host.example/****", [SECRET, TOKEN]),
        ("macosx://", None, []),
        ("not a url", "****", []),
    ],
)  # fmt: skip
def test_mask_hides_passwords_and_tokens(url, shown, hidden):
    masked = mask(url)
    if shown is not None:
        assert masked == shown
    assert masked.split("://")[0] == url.split("://")[0] or masked == "****"
    for secret in hidden:
        assert secret not in masked


def test_scrub_removes_every_secret_part_from_free_text():
    url = f"jsons://user:{SECRET}@hooks.example.com/in/{TOKEN}?-key=abcdef123"
    text = f"POST to {url} failed; auth {SECRET}; path /in/{TOKEN}; key abcdef123"
    cleaned = scrub(text, url)
    for secret in (SECRET, TOKEN, "abcdef123", url):
        assert secret not in cleaned


def test_outcomes_from_a_child_that_stopped_half_way():
    lines = ['{"masked": ["json://a/", "json://b/****"]}', '{"index": 0, "target": "json://a/", "ok": true, "reason": ""}',
             "garbage"]  # fmt: skip
    assert outcomes_from(lines, ["json://a/", f"json://b/{TOKEN}"], "no answer within 5s") == [
        notify.Outcome("json://a/", True, ""),
        notify.Outcome("json://b/****", False, "no answer within 5s"),
    ]
    assert outcomes_from([], [f"json://u:{SECRET}@b/{TOKEN}"], "x") == [
        notify.Outcome("json://b/****", False, "x")
    ]


# -- delivery to a real HTTP server ------------------------------------------------------------


def test_json_target_receives_title_message_and_attachment(receiver, tmp_path):
    render = tmp_path / "alice.png"
    render.write_bytes(b"\x89PNG fake render bytes")
    message = Message(
        "lorad: LoRA ready", "alice: done, 100 steps in 3m 05s (job J1)", str(render), "success"
    )
    outcome = notify.deliver_one(f"json://lorad:{SECRET}@127.0.0.1:{receiver.port}/hook", message, 5)
    assert outcome == notify.Outcome(f"json://lorad:****@127.0.0.1:{receiver.port}/****", True, "")
    (got,) = receiver.received
    assert got["path"] == "/hook"
    body = got["json"]
    assert body["title"] == message.title and body["message"] == message.body and body["type"] == "success"
    (attachment,) = body["attachments"]
    assert attachment["filename"] == "alice.png"
    assert base64.b64decode(attachment["base64"]) == render.read_bytes()


def test_missing_render_is_sent_without_attachment(receiver, tmp_path):
    message = Message("t", "b", str(tmp_path / "gone.png"))
    assert notify.deliver_one(f"json://127.0.0.1:{receiver.port}/", message, 5).ok
    assert not receiver.received[0]["json"].get("attachments")


def test_notifier_retries_then_logs_one_failed_line_per_target(receiver):
    log = Recorder()
    dead = f"json://u:{SECRET}@127.0.0.1:{dead_port()}/{TOKEN}"
    good = f"json://127.0.0.1:{receiver.port}/"
    n = Notifier([dead, good], ["done"], timeout_s=5, log=log, backoff_s=(0.05, 0.05))
    outcomes = n.send(Message("t", "b"), job_id="J1")
    assert [o.ok for o in outcomes] == [False, True]
    assert len(receiver.received) == 1  # the good target is not sent again when the other is retried
    (failed,) = log.events("notify.failed")
    assert (
        failed["attempts"] == 3
        and failed["target"] == f"json://u:****@127.0.0.1:{dead.split(':')[3].split('/')[0]}/****"
    )
    assert "Connection error" in failed["reason"]
    (sent,) = log.events("notify.sent")
    assert sent["target"] == good and sent["attempt"] == 1
    assert SECRET not in repr(log.lines) and TOKEN not in repr(log.lines)


def test_a_target_that_never_answers_is_cut_off_and_the_queue_never_blocks(hanging):
    """The job thread's call returns at once whatever the target does; the sender gives up on a
    hanging target at its timeout, and a stop drains for a bounded time (logged)."""
    log = Recorder()
    n = Notifier(
        [f"json://127.0.0.1:{hanging.port}/"], ["done"], timeout_s=600, log=log, queue_size=2
    ).start()

    class Job:
        id, name, state, step, total_steps, started_at, finished_at, updated_at, error, outputs = (
            "J1", "alice", "done", 5, 5, 1.0, 2.0, 2.0, None, {})  # fmt: skip

    for _ in range(5):  # 1 being sent, 2 queued, 2 dropped: never blocks
        n.on_transition(Job, "publishing", "done")
    n.on_transition(Job, "training", "rendering")  # not in notify_on: nothing
    assert hanging.event.wait(60), "the delivery child reached the hanging target"
    assert len(log.events("notify.dropped")) >= 2
    assert n.stop(drain_s=0.5) is False
    assert log.events("notify.gave_up") and not log.events("notify.sent")


# -- lorad notify test ---------------------------------------------------------------------------


def _cli(tmp_path, env_notify: str | None, *extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAD_")}
    env["LORAD_ASSETS"] = str(tmp_path / "assets")
    if env_notify is not None:
        env["LORAD_NOTIFY"] = env_notify
    return subprocess.run([sys.executable, "-m", "daemon.cli", "notify", "test", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_notify_test_reports_each_target_and_exit_codes(receiver, tmp_path):
    good = f"json://lorad:{SECRET}@127.0.0.1:{receiver.port}/"
    ok = _cli(tmp_path, good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"[ok  ] json://lorad:****@127.0.0.1:{receiver.port}/" in ok.stdout
    assert receiver.received[0]["json"]["title"] == "lorad: test notification"

    dead = f"ntfy://u:{SECRET}@127.0.0.1:{dead_port()}/{TOKEN}"
    mixed = _cli(tmp_path, f"{good},{dead},macosx://")
    assert mixed.returncode == 1
    lines = mixed.stdout.splitlines()
    assert lines[1].startswith("[ok  ]") and lines[2].startswith("[FAIL] ntfy://u:****@127.0.0.1:")
    assert "Connection error" in lines[2]
    assert lines[3].startswith("[FAIL] macosx://") and "off macOS" in lines[3]
    assert "2 of 3 target(s) failed" in mixed.stdout
    assert SECRET not in mixed.stdout + mixed.stderr and TOKEN not in mixed.stdout + mixed.stderr

    none = _cli(tmp_path, None)
    assert none.returncode == 2 and "no notification targets" in none.stderr


# -- a real daemon -------------------------------------------------------------------------------


def _drop(d, name, **kw):
    folder = make_dataset(d.training_data / name, **kw)
    (folder / "READY").write_text("")
    return folder


def _bad(d, name):
    bad = d.training_data / name
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "a.txt").write_text("ohwx, x")
    (bad / "READY").write_text("")


def test_daemon_notifies_once_per_job_end_in_notify_on_and_keeps_secrets_out_of_logs(
    daemon_factory, receiver
):
    dead = f"json://hook:{SECRET}@127.0.0.1:{dead_port()}/{TOKEN}"
    d = daemon_factory(
        extra_env={
            "LORAD_NOTIFY": f"json://lorad:{SECRET}@127.0.0.1:{receiver.port}/lorad, {dead}",
            "LORAD_NOTIFY_ON": "done,failed",
            "SCRIPTED_ENGINE_STEP_S": "0.01",
        }
    ).start()
    _bad(d, "ohwx_bad")
    wait_for(lambda: d.job_states().get("ohwx_bad") == "failed", 60, message="invalid dataset failed")
    _drop(d, "ohwx_alice")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 90, message="job done")
    # The dead target: three attempts (2 s + 8 s apart), then one notify.failed per message.
    wait_for(
        lambda: len([e for e in d.events() if e["event"] == "notify.failed"]) == 2,
        120,
        message="notify.failed x2",
    )
    bodies = [r["json"] for r in receiver.received]
    assert len(bodies) == 2, bodies  # one per job end; none for queued/preparing/training/... moves
    by_title = {b["title"]: b for b in bodies}
    failed, done = by_title["lorad: LoRA training failed"], by_title["lorad: LoRA ready"]
    assert (
        failed["message"].startswith("bad: failed")
        and "a.png" in failed["message"]
        and failed["type"] == "failure"
    )
    assert done["message"].startswith("alice: done, ") and " steps in " in done["message"]
    (attachment,) = done["attachments"]
    assert attachment["filename"] == "alice.png"
    assert base64.b64decode(attachment["base64"]) == (d.assets / "loras" / "alice.png").read_bytes()

    events = d.events()
    sent = [e for e in events if e["event"] == "notify.sent"]
    assert len(sent) == 2 and {e["job_id"] for e in sent} == {j["id"] for j in d.jobs()}
    assert all(e["target"] == f"json://lorad:****@127.0.0.1:{receiver.port}/****" for e in sent)
    started = next(e for e in events if e["event"] == "daemon.started")
    assert started["notify_targets"] == 2 and started["notify_on"] == ["done", "failed"]
    status = d.cli("status", "--json", "--all").stdout + d.cli("status").stdout
    d.stop()
    log_text = (d.state / "logs" / "lorad.jsonl").read_text()
    markers = "".join(p.read_text() for p in d.training_data.rglob("*") if p.name in ("DONE", "FAILED.txt"))
    for secret in (SECRET, TOKEN):
        assert secret not in log_text and secret not in status and secret not in markers


def test_a_hanging_target_does_not_hold_up_the_queue(daemon_factory, hanging):
    """While the sender waits on a target that accepted the connection and never answers, the
    next job still runs to done (no timing asserted: bench/p10_notify_dead_endpoint.py measures it);
    the stop drains for a bounded time and says it gave up."""
    d = daemon_factory(
        extra_env={
            "LORAD_NOTIFY": f"json://127.0.0.1:{hanging.port}/",
            "LORAD_NOTIFY_TIMEOUT_S": "600",
            "SCRIPTED_ENGINE_STEP_S": "0.01",
        }  # fmt: skip
    ).start()
    _drop(d, "ohwx_one")
    wait_for(lambda: d.job_states().get("ohwx_one") == "done", 90, message="first job done")
    assert hanging.event.wait(60), "the notification reached the hanging target"
    _drop(d, "ohwx_two", seed=1)
    wait_for(
        lambda: d.job_states().get("ohwx_two") == "done", 90, message="second job done while the target hangs"
    )
    assert not d.log_has("notify.sent") and not d.log_has("notify.failed")  # still waiting on it
    d.stop()
    assert d.proc.returncode == 0
    assert d.log_has("notify.gave_up") and d.log_has("daemon.stopped")


def test_child_entry_point_runs_as_module(receiver):
    request = {
        "targets": [f"json://127.0.0.1:{receiver.port}/"],
        "message": Message("t", "b")._asdict(),
        "timeout_s": 5,
    }
    out = subprocess.run([sys.executable, "-m", "daemon.notify"], input=json.dumps(request), capture_output=True,
                         text=True, cwd=ROOT, timeout=60).stdout.splitlines()  # fmt: skip
    assert json.loads(out[0]) == {"masked": [f"json://127.0.0.1:{receiver.port}/"]}
    assert json.loads(out[1])["ok"] is True
