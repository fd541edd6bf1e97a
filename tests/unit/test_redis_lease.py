"""Pure decisions of scale-out (daemon/remote/lease.py, worker paths, settings): table tests."""

from __future__ import annotations

import pytest

from daemon.remote import lease
from daemon.remote.worker import safe_relative
from daemon.settings import SettingsError, resolve


@pytest.mark.parametrize(
    "current, event, ok",
    [
        ("1.ab", "1.ab", True),
        ("1.ab", "1.cd", False),
        (None, "1.ab", False),
        ("1.ab", None, False),
        ("", "", False),
    ],
)
def test_event_is_current(current, event, ok):
    assert lease.event_is_current(current, event) is ok


@pytest.mark.parametrize(
    "held, queued, action",
    [(True, False, "keep"), (False, True, "keep"), (True, True, "keep"), (False, False, "reclaim")],
)
def test_lease_action(held, queued, action):
    assert lease.lease_action(lease_held=held, task_queued=queued) == action


D = lease.Decline


@pytest.mark.parametrize(
    "live, declines, expected",
    [
        (set(), [], "waiting: no live worker (start one: lorad worker --queue <url>)"),
        ({"a"}, [], None),
        ({"a", "b"}, [D("a", "too small", 64, 8)], None),  # b may still take it
        (
            {"a", "b"},
            [D("a", "x", 64, 8), D("b", "y", 64, 16)],
            "waiting: needs ≥ 64 GB, largest worker has 16 GB",
        ),
        (
            {"a"},
            [D("a", "x", 64, 8), D("gone", "y", 64, 512)],
            "waiting: needs ≥ 64 GB, largest worker has 8 GB",
        ),
        (
            {"a"},
            [D("a", "model z-image missing")],
            "waiting: no live worker can train it (model z-image missing)",
        ),
    ],
)
def test_waiting_verdict(live, declines, expected):
    assert lease.waiting_verdict(live, declines) == expected


def test_tokens_are_unique_per_dispatch_and_name_the_attempt():
    tokens = {lease.new_token(3) for _ in range(100)}
    assert len(tokens) == 100 and all(t.startswith("3.") for t in tokens)


@pytest.mark.parametrize("ttl, beat", [(30, 10), (3, 1), (0.3, 0.2)])
def test_beat_interval(ttl, beat):
    assert lease.beat_interval(ttl) == pytest.approx(beat)


@pytest.mark.parametrize(
    "rel, ok",
    [("train/checkpoints/0000004_checkpoint.zip", True), ("a", True), ("../x", False), ("/etc/passwd", False),
     ("a/../../b", False), ("", False), ("a\\..\\b", False)],
)  # fmt: skip
def test_safe_relative(rel, ok):
    assert (safe_relative(rel) is not None) is ok


@pytest.mark.parametrize(
    "value, ok",
    [
        ("sqlite", True),
        ("redis://h:6379/0", True),
        ("rediss://:pw@h/0", True),
        ("http://h", False),
        ("", False),
    ],
)
def test_queue_setting(value, ok):
    if ok:
        settings = resolve(env={"LORAD_QUEUE": value})
        assert settings.queue == value and settings.scale_out is (value != "sqlite")
    else:
        with pytest.raises(SettingsError, match="queue"):
            resolve(env={"LORAD_QUEUE": value})


def test_a_bad_queue_url_never_echoes_its_password():
    with pytest.raises(SettingsError) as info:
        resolve(file_values={"queue": "http://user:s3cret@host"})
    assert "s3cret" not in str(info.value)


def test_scale_out_defaults():
    s = resolve()
    assert (s.queue, s.local_worker, s.lease_ttl_s, s.download_models) == ("sqlite", True, 30.0, False)
    assert not s.scale_out


def test_worker_rows_table():
    from daemon.commands import worker_rows

    assert worker_rows([], 0)[0].startswith("no live workers")
    rows = worker_rows([{"id": "dgx-1a2b3c", "host": "dgx", "backend": "cuda", "platform": "Linux x86_64",
                         "memory_gb": "80.0", "job": "20260101-000000-abcd", "beat": "95"}], 100)  # fmt: skip
    assert "dgx-1a2b3c" in rows[1] and "cuda" in rows[1] and "80.0 GB" in rows[1] and "5s" in rows[1]


def test_service_install_worker_renders_a_worker_unit_and_agent_without_showing_the_password(tmp_path):
    import os

    from daemon import service

    settings = resolve(flags={"assets": tmp_path / "assets"})
    url = "redis://:s3cret@mac.local:6379/0"
    paths = service.paths_for(settings, home=tmp_path, worker=True, queue=url)
    unit = service.render_systemd(settings, paths)
    assert f"worker --state-dir {paths.state}" in unit and "s3cret" not in unit
    assert f"EnvironmentFile=-{tmp_path}/.config/lorad/worker.env" in unit
    plist = service.render_launchd(settings, paths)
    assert plist["Label"] == "com.lorad.worker" and plist["ProgramArguments"][1:3] == [
        "worker",
        "--state-dir",
    ]
    assert plist["EnvironmentVariables"]["LORAD_QUEUE"] == url  # in the 0600 file only
    shown = service.Launchd(settings, paths, service.Runner(dry_run=True), uid=501).render()
    assert "s3cret" not in shown and "***" in shown

    class Recorder:  # writes files (not a dry run) but records the systemctl calls instead of running them
        dry_run = False

        def __init__(self):
            self.calls = []

        def __call__(self, *cmd, check=True):
            self.calls.append(cmd)

    recorder = Recorder()
    calls = recorder.calls
    systemd = service.Systemd(settings, paths, recorder)  # type: ignore[arg-type]
    systemd.install()
    env = tmp_path / ".config" / "lorad" / "worker.env"
    assert env.read_text() == f"LORAD_QUEUE={url}\n" and oct(os.stat(env).st_mode & 0o777) == "0o600"
    assert ("systemctl", "--user", "enable", "--now", "lorad-worker.service") in calls
    assert (tmp_path / ".config" / "systemd" / "user" / "lorad-worker.service").is_file()


def test_relocated_config_points_a_foreign_checkpoint_at_this_work_dir():
    from engines.mflux.checkpoints import relocated_config

    saved = {"data": "/Users/me/.lorad/worker/work/j/data", "model_path": "/Users/me/m", "rank": 16,
             "checkpoint": {"save_frequency": 2, "output_path": "/Users/me/.lorad/worker/work/j/train"}}  # fmt: skip
    plan = {"data": "/srv/w/work/j/data", "model_path": "/srv/m", "rank": 8,
            "checkpoint": {"save_frequency": 5, "output_path": "/srv/w/work/j/train"}}  # fmt: skip
    moved = relocated_config(saved, plan)
    assert moved == {"data": "/srv/w/work/j/data", "model_path": "/srv/m", "rank": 16,
                     "checkpoint": {"save_frequency": 2, "output_path": "/srv/w/work/j/train"}}  # fmt: skip
    assert relocated_config(moved, plan) == moved  # already here: unchanged (no rewrite)
