"""The job state machine and the jobs table (SQLite): which transitions are legal and the event each
logs, transitions as compare-and-set with the marker kept in step, schema migration, a corrupt
jobs.db moved aside intact, the queue's order, when a requested cancel is honoured, the watcher's
path-to-dataset rule and the dataset fingerprint."""

from __future__ import annotations

import sqlite3

import pytest

from daemon.jobs import (
    MIGRATIONS,
    SCHEMA_VERSION,
    TRANSITIONS,
    CorruptDatabase,
    IllegalTransition,
    JobStore,
    event_for,
    is_legal,
)

STATES = list(TRANSITIONS)


LEGAL = {
    ("queued", "preparing"), ("queued", "publishing"), ("queued", "cancelled"), ("queued", "failed"),
    ("preparing", "training"), ("preparing", "publishing"), ("preparing", "failed"), ("preparing", "cancelled"), ("preparing", "interrupted"),
    ("training", "rendering"), ("training", "failed"), ("training", "cancelled"), ("training", "interrupted"),
    ("rendering", "publishing"), ("rendering", "failed"), ("rendering", "cancelled"), ("rendering", "interrupted"),
    ("publishing", "done"), ("publishing", "failed"), ("publishing", "interrupted"),
    ("interrupted", "preparing"), ("interrupted", "publishing"), ("interrupted", "cancelled"), ("interrupted", "failed"), ("interrupted", "queued"),
    ("failed", "queued"), ("cancelled", "queued"),
}  # fmt: skip


@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_transition_table(old, new):
    assert is_legal(old, new) == ((old, new) in LEGAL)


@pytest.mark.parametrize(
    "old, new, event",
    [
        ("queued", "preparing", "job.started"),
        ("interrupted", "preparing", "job.resumed"),
        ("queued", "publishing", "job.started"),  # a verified result published straight from the queue
        ("interrupted", "publishing", "job.resumed"),
        ("training", "interrupted", "job.interrupted"),
        ("publishing", "done", "job.done"),
        ("training", "failed", "job.failed"),
        ("queued", "cancelled", "job.cancelled"),
        ("failed", "queued", "job.requeued"),
        ("preparing", "training", "job.phase"),
    ],
)
def test_event_names(old, new, event):
    assert event_for(old, new) == event


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


def test_store_transitions_update_marker_and_reject_illegal(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = _job(store, tmp_path)
    folder = tmp_path / "training_data" / "ohwx_a"
    assert (folder / "QUEUED").exists()
    store.transition(job.id, "preparing")
    assert (folder / "TRAINING").exists() and not (folder / "QUEUED").exists()
    with pytest.raises(IllegalTransition):
        store.transition(job.id, "done")
    store.transition(job.id, "failed", error="a.png: broken")
    text = (folder / "FAILED.txt").read_text()
    assert "a.png: broken" in text and f"lorad retry {job.id}" in text
    again = store.transition(job.id, "queued", attempt=2)
    assert again.attempt == 2 and again.started_at is not None


def test_schema_version_and_migration_from_v1(tmp_path):
    from daemon.jobs import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = JobStore(path)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    job = _job(store, tmp_path)
    assert store.get(job.id).plan == {}
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_corrupt_jobs_db_is_reported_then_moved_aside_intact(tmp_path):
    from daemon.jobs import move_aside

    path = tmp_path / "jobs.db"
    garbage = b"SQLite format 3\x00" + b"\xde\xad" * 4000
    path.write_bytes(garbage)
    with pytest.raises(CorruptDatabase) as info:
        JobStore(path)
    assert "moves it aside" in str(info.value) and str(path) in str(info.value) and info.value.problem
    moved = move_aside(path)
    assert moved.name.startswith("jobs.db.corrupt-") and moved.read_bytes() == garbage and not path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name in ("jobs.db-wal", "jobs.db-shm")]
    assert JobStore(path).list() == []  # a fresh table in its place


def test_queue_order_priority_then_fifo(tmp_path):
    store = JobStore(tmp_path / "jobs.db", write_markers=False)
    a = _job(store, tmp_path, "ohwx_a1", ready_at=100.0)
    b = _job(store, tmp_path, "ohwx_b2", ready_at=101.0)
    c = _job(store, tmp_path, "ohwx_c3", ready_at=102.0, priority=5)
    assert [j.id for j in store.runnable_in_order()] == [c.id, a.id, b.id]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/td/ohwx_a/READY", ("/td/ohwx_a", None)),
        ("/td/ohwx_a", ("/td/ohwx_a", 1.0)),  # a folder moved/copied in: looked at a little later
        ("/td/ohwx_a/img.png", None),
        ("/td/ohwx_a/sub/READY", None),
        ("/elsewhere/READY", None),
    ],
)
def test_dataset_for_event(path, expected):
    from pathlib import Path

    from daemon.watch import dataset_for_event

    found = dataset_for_event(Path("/td"), path)
    assert (None if found is None else (str(found[0]), found[1])) == expected


@pytest.mark.parametrize(
    "old, new, requested, expected",
    [
        ("queued", "preparing", False, "preparing"),
        ("queued", "preparing", True, "cancelled"),
        ("interrupted", "preparing", True, "cancelled"),
        ("preparing", "training", True, "cancelled"),
        ("training", "rendering", True, "cancelled"),
        ("rendering", "publishing", True, "cancelled"),
        ("rendering", "publishing", False, "publishing"),
        ("publishing", "done", True, "done"),  # too late: publishing finishes
        ("training", "failed", True, "failed"),
        (
            "training",
            "interrupted",
            True,
            "interrupted",
        ),  # a stop while cancelling: cancelled at the next start
    ],
)
def test_honour_cancel(old, new, requested, expected):
    from daemon.jobs import honour_cancel

    assert honour_cancel(old, new, requested) == expected


@pytest.mark.parametrize(
    "state, action",
    [
        ("queued", "cancel"), ("interrupted", "cancel"),
        ("preparing", "request"), ("training", "request"), ("rendering", "request"),
        ("publishing", "too_late"),
        ("done", "finished"), ("failed", "finished"), ("cancelled", "finished"),
    ],
)  # fmt: skip
def test_cancel_action(state, action):
    from daemon.jobs import cancel_action

    assert cancel_action(state) == action


def test_transition_is_a_compare_and_set(tmp_path):
    from daemon.jobs import StateChanged

    store = JobStore(tmp_path / "jobs.db", write_markers=False)
    other = JobStore(tmp_path / "jobs.db", write_markers=False)  # a second process, say
    job = _job(store, tmp_path)
    store.transition(job.id, "failed", error="x")
    other.transition(job.id, "queued", expect="failed", attempt=2)
    with pytest.raises(StateChanged) as info:
        store.transition(job.id, "queued", expect="failed", attempt=2)
    assert info.value.current == "queued" and info.value.job_id == job.id
    assert store.get(job.id).attempt == 2


def test_requested_cancel_is_honoured_at_the_next_boundary(tmp_path):
    store = JobStore(tmp_path / "jobs.db", write_markers=False)
    job = _job(store, tmp_path)
    store.transition(job.id, "preparing")
    store.transition(job.id, "training")
    assert store.cancel(job.id)[0] == "request"
    assert store.transition(job.id, "rendering", expect="training").state == "cancelled"
    other = _job(store, tmp_path, "ohwx_b2")
    store.transition(other.id, "preparing")
    store.transition(other.id, "training")
    store.transition(other.id, "rendering")
    store.transition(other.id, "publishing")
    action, now = store.cancel(other.id)
    assert action == "too_late" and now.state == "publishing" and not now.cancel_requested
    assert store.transition(other.id, "done").state == "done"


def _report(folder="/td/ohwx_alice", name="alice", trigger="ohwx", images=(("a.png", "11"), ("b.png", "22"))):
    from pathlib import Path

    from daemon.intake.validate import ImageInfo, Report

    infos = [ImageInfo(n, 64, 64, "RGB", "PNG", sha, 10) for n, sha in images]
    return Report(
        folder=Path(folder), trigger=trigger, name=name, images=infos,
        captions={n: f"{trigger}, photo {n}" for n, _ in images},
    )  # fmt: skip


BASE = _report()


@pytest.mark.parametrize(
    "other, same",
    [
        (_report(), True),
        (_report(folder="/td/ohwx_copy"), True),  # the folder's path is not the dataset
        (_report(images=(("b.png", "22"), ("a.png", "11"))), True),  # listing order
        (_report(name="bob"), False),  # another name is another LoRA
        (_report(folder="/td/ohwx_bob", name="bob"), False),
        (_report(trigger="zzkw"), False),
        (_report(images=(("a.png", "11"), ("b.png", "23"))), False),
        (_report(images=(("a.png", "11"),)), False),
    ],
)
def test_fingerprint_table(other, same):
    from daemon.intake.snapshot import fingerprint

    assert (fingerprint(other, {"rank": 16}) == fingerprint(BASE, {"rank": 16})) is same


def test_fingerprint_sees_the_name_even_with_equal_captions():
    """Captions hold the trigger, not the name: the name must be hashed by itself."""
    from daemon.intake.snapshot import fingerprint

    a, b = _report(name="alice"), _report(name="alice2")
    assert a.captions == b.captions and fingerprint(a, {}) != fingerprint(b, {})


@pytest.mark.parametrize("from_version", [0, SCHEMA_VERSION - 1])
def test_two_processes_opening_a_new_jobs_db_at_once_migrate_it_once(tmp_path, monkeypatch, from_version):
    """The selftest polled jobs.db while its daemon created it, and failed with "duplicate column
    name: remote": both had read the old version, both ran the migration. Here another store
    migrates the file between this store's read of the version and its first transaction."""
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for number in range(from_version):
        conn.executescript(MIGRATIONS[number])
    conn.execute(f"PRAGMA user_version = {from_version}")
    conn.close()
    real_tx, raced = JobStore._tx, []

    def tx_after_another_process_migrated(self):
        if not raced:
            raced.append(True)
            JobStore(path, write_markers=False).close()  # the daemon, just now
        return real_tx(self)

    monkeypatch.setattr(JobStore, "_tx", tx_after_another_process_migrated)
    store = JobStore(path, write_markers=False)
    assert raced
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "remote" in {row[1] for row in store.conn.execute("PRAGMA table_info(jobs)")}
    store.close()
