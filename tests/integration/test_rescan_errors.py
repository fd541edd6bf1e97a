"""Nothing periodic is fatal (issue 19, case 8): an OSError reading training_data during the
periodic rescan (an NFS/SMB hiccup) is logged, backed off and retried; the daemon stays up and
takes a READY once the folder reads again."""

from __future__ import annotations

import os

import pytest
from conftest import wait_for

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
