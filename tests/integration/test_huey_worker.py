"""The huey queue with its wakeable worker (a real consumer thread), and reconcile rebuilding huey
from the jobs table."""

from __future__ import annotations

import threading
import time

from daemon.daemon import reconcile
from daemon.jobs import JobStore
from daemon.queue import Queue


def _job(store: JobStore, tmp_path, name="ohwx_a", **kw):
    from daemon.jobs import new_job_id

    folder = tmp_path / "training_data" / name
    folder.mkdir(parents=True, exist_ok=True)
    return store.create(
        job_id=new_job_id() + name[-2:],
        dataset_path=folder,
        name=name.split("_", 1)[1],
        trigger="ohwx",
        fingerprint="fp-" + name,
        ready_token=None,
        settings={},
        **kw,
    )


def test_worker_wakes_on_enqueue_not_on_poll(tmp_path):
    ran: list[tuple[str, float]] = []
    done = threading.Event()

    def run_job(job_id):
        ran.append((job_id, time.monotonic()))
        done.set()

    queue = Queue(tmp_path / "queue.db", run_job=run_job)
    consumer = queue.consumer()
    consumer.start()
    try:
        time.sleep(3.0)  # idle long enough for huey's own backoff to reach seconds
        sent = time.monotonic()
        queue.enqueue("job-1")
        assert done.wait(5)
        # Not a benchmark (bench/ measures it): waking must beat huey's polling backoff by far.
        assert ran[0][0] == "job-1" and ran[0][1] - sent < 1.0
    finally:
        consumer.stop_flag.set()
        queue.wake.set()
        for _n, t in consumer.worker_threads:
            t.join(5)


def test_reconcile_rebuilds_huey_from_the_table(tmp_path):
    store = JobStore(tmp_path / "jobs.db", write_markers=False)
    queue = Queue(tmp_path / "queue.db")
    running = _job(store, tmp_path, "ohwx_r1", ready_at=1.0)
    store.transition(running.id, "preparing")
    store.transition(running.id, "training")
    queued_missing = _job(store, tmp_path, "ohwx_q2", ready_at=2.0)
    cancelled = _job(store, tmp_path, "ohwx_c3", ready_at=3.0)
    queue.enqueue(cancelled.id)
    store.transition(cancelled.id, "cancelled")
    summary = reconcile(store, queue)
    assert summary["interrupted"] == [running.id]
    assert summary["dropped"] == [cancelled.id]
    assert set(summary["requeued"]) == {running.id, queued_missing.id}
    assert store.get(running.id).state == "interrupted"
    assert queue.pending_job_ids() == [running.id, queued_missing.id]
