"""Nothing periodic is fatal (issue 19, case 8): an OSError reading training_data during the
periodic rescan (an NFS/SMB hiccup) is logged, backed off and retried; the daemon stays up and
takes a READY once the folder reads again. Also: one flood of a repeated log event is collapsed
(case 1's log half) and lorad's file-limit and service-limit rules."""

from __future__ import annotations

import io
import json
import logging
import os
import resource

import pytest
from conftest import wait_for

from daemon import logs
from daemon.sample import make_dataset

pytestmark = pytest.mark.slow


def test_rescan_oserror_is_logged_backed_off_and_retried(daemon_factory):
    d = daemon_factory(extra_env={"LORAD_RESCAN_INTERVAL_S": "1", "SCRIPTED_ENGINE_STEP_S": "0.01"}).start()
    real = d.training_data.with_name("training_data.real")
    d.training_data.rename(real)
    # A link to itself: listing it fails with ELOOP whoever runs the daemon (root included).
    os.symlink(d.training_data.name, d.training_data)
    with pytest.raises(OSError):
        os.listdir(d.training_data)
    wait_for(
        lambda: (
            len([e for e in d.events() if e.get("event") == "daemon.rescan_failed"]) >= 2
            or d.proc.poll() is not None
        ),
        60,
        message="two failed rescans",
    )
    assert d.proc.poll() is None, "the daemon exited on a rescan error"
    failed = [e for e in d.events() if e.get("event") == "daemon.rescan_failed"]
    assert "ELOOP" in failed[0]["error"] or "symbolic links" in failed[0]["error"]
    assert failed[1]["retry_in_s"] >= failed[0]["retry_in_s"]  # backed off, never hot
    make_dataset(real / "ohwx_after", images=1)
    (real / "ohwx_after" / "READY").write_text("steps = 2\n")
    d.training_data.unlink()
    real.rename(d.training_data)
    wait_for(
        lambda: d.log_has("job.queued", dataset="ohwx_after"), 60, message="READY taken after the hiccup"
    )
    # The watcher may take the READY before the next rescan runs: wait for that rescan too.
    wait_for(lambda: d.log_has("daemon.rescan_recovered"), 60, message="the rescan recovered")
    wait_for(lambda: d.log_has("job.done", dataset="ohwx_after"), 90, message="job done")
    assert d.proc.poll() is None


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_a_flood_of_one_event_is_collapsed_and_others_pass(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(logs, "_monotonic", lambda: clock[0])
    stream = io.StringIO()
    logs.configure(level="DEBUG", stream=stream)
    try:
        log = logs.get_logger()
        log.info("job.queued", job_id="j1", dataset="ohwx_a")
        for _ in range(5000):
            logging.getLogger("asyncio").error("socket.accept() out of system resource")
        for i in range(100):
            log.info("job.queued", job_id=f"k{i}", dataset=f"ohwx_{i}")  # distinct jobs: all kept
        clock[0] += logs.REPEAT_WINDOW_S + 1
        log.info("job.done", job_id="j1", dataset="ohwx_a")
        lines = _lines(stream)
    finally:
        logs.configure(level="INFO", console=False)
    floods = [e for e in lines if e["event"] == "socket.accept() out of system resource"]
    assert len(floods) == logs.REPEAT_BURST
    (summary,) = [e for e in lines if e["event"] == "log.repeated"]
    assert summary["repeated_event"] == "socket.accept() out of system resource"
    assert summary["count"] == 5000 - logs.REPEAT_BURST
    assert f"repeated {5000 - logs.REPEAT_BURST} times" in summary["message"]
    assert len([e for e in lines if e["event"] == "job.queued"]) == 101
    assert lines[-1]["event"] == "job.done"


@pytest.mark.parametrize(
    "soft, hard, platform, target",
    [(256, 256, "linux", None), (256, 4096, "linux", 4096), (1024, 524288, "linux", 524288),
     (256, resource.RLIM_INFINITY, "darwin", 10240), (256, resource.RLIM_INFINITY, "linux", 1048576),
     (4096, 1024, "linux", None), (20000, 20000, "linux", None)],
)  # fmt: skip
def test_file_limit_target(soft, hard, platform, target):
    from daemon.daemon import file_limit_target

    assert file_limit_target(soft, hard, platform) == target


def test_service_files_raise_the_file_limit(tmp_path):
    from daemon import service
    from daemon.settings import resolve

    settings = resolve(env={"LORAD_ASSETS": str(tmp_path / "assets")})
    paths = service.paths_for(settings, home=tmp_path)
    plist = service.render_launchd(settings, paths)
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 4096
    unit = service.render_systemd(settings, paths)
    assert "\nLimitNOFILE=" in unit
    worker = service.paths_for(settings, home=tmp_path, worker=True, queue="redis://h:6379/0")
    assert "\nLimitNOFILE=" in service.render_systemd(settings, worker)
    assert service.render_launchd(settings, worker)["SoftResourceLimits"]["NumberOfFiles"] >= 4096
