"""The progress sink of a running job: the last ETA kept when the engine sends none, the TRAINING
marker following progress within marker_refresh_s (a real timer thread), no marker written after close."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import wait_for


def test_progress_sink_keeps_last_eta_when_engine_sends_none(tmp_path):
    """After a resume the first step has no rate yet: the known ETA stays instead of vanishing."""
    from daemon.jobs import JobStore
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    sink = ProgressSink(store, "job1", marker_refresh_s=3600)
    sink(Progress(10, 80, 0.5, 700.0))
    sink(Progress(11, 80, 0.5, None))  # held back (one db write a second), then written by the timer
    try:
        wait_for(lambda: store.get("job1").step == 11, timeout=10, message="step 11 in the table")
    finally:
        sink.close()
    assert store.get("job1").eta_s == 700.0
    assert isinstance(store, JobStore)


def _store_with_training_job(tmp_path: Path):
    from daemon.jobs import JobStore

    folder = tmp_path / "ohwx_alice"
    folder.mkdir()
    store = JobStore(tmp_path / "jobs.db")
    store.create(
        job_id="job1",
        dataset_path=folder,
        name="alice",
        trigger="ohwx",
        fingerprint="f",
        ready_token=None,
        settings={},
    )
    store.transition("job1", "preparing")
    store.transition("job1", "training")
    return store


def test_training_marker_follows_progress_within_refresh_interval(tmp_path):
    """Steps 2..16 arrive quickly after step 1, then the trainer is busy (a long step, a preview):
    the marker must not stay at step 1 while the table says 16."""
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    marker = tmp_path / "ohwx_alice" / "TRAINING"
    sink = ProgressSink(store, "job1", marker_refresh_s=0.5)
    sink(Progress(1, 80, 1.0, None))
    assert "step 1/80" in marker.read_text()
    for step in range(2, 17):
        sink(Progress(step, 80, 1.0, 100.0))
    try:
        wait_for(lambda: "step 16/80" in marker.read_text(), timeout=10, message="marker at step 16")
        assert store.get("job1").step == 16
    finally:
        sink.close()


def test_progress_sink_close_stops_pending_marker_writes(tmp_path):
    """After close (training over), a pending refresh must not rewrite TRAINING over a newer marker."""
    from daemon.pipeline import ProgressSink
    from engines.base import Progress

    store = _store_with_training_job(tmp_path)
    folder = tmp_path / "ohwx_alice"
    sink = ProgressSink(store, "job1", marker_refresh_s=0.3)
    sink(Progress(1, 80, 1.0, None))
    sink(Progress(2, 80, 1.0, 50.0))  # throttled: a refresh is pending
    sink.close()
    store.transition("job1", "failed", error="boom")
    time.sleep(0.8)  # longer than the refresh interval: a leftover timer would have fired
    assert (folder / "FAILED.txt").is_file() and not (folder / "TRAINING").exists()
