"""Issue 12 item 1: a missing, empty or corrupt jobs.db never deletes a job's work dir.

Each work dir carries a versioned record (job.json) that rebuilds its row; the daemon re-adopts
unknown work dirs at start (`job.recovered`), resuming unfinished jobs from their newest good
checkpoint and keeping finished ones finished. Real daemon, real SQLite, scripted engine.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import wait_for

from daemon import jobrecord
from daemon.jobs import Job
from daemon.sample import make_dataset

pytestmark = pytest.mark.slow


def _three_jobs_then_stop(d) -> dict[str, dict]:
    """One job training (with a checkpoint), two queued behind it; then a graceful stop."""
    first = make_dataset(d.training_data / "ohwx_one", images=1)
    (first / "READY").write_text("steps = 40\n")
    wait_for(lambda: any((j["step"] or 0) >= 3 for j in d.jobs()), 60, message="first training")
    for i, name in enumerate(("ohwx_two", "ohwx_three"), start=1):
        folder = make_dataset(d.training_data / name, images=1, seed=i)
        (folder / "READY").write_text("steps = 2\n")
        wait_for(lambda: d.job_states().get(name) == "queued", 30, message=f"{name} queued")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    return {j["dataset"]: j for j in d.jobs()}


def _work_dirs(d) -> set[str]:
    return {p.name for p in (d.state / "jobs").iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_lost_jobs_db_readopts_every_work_dir(daemon_factory, damage):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.2"}).start()
    before = _three_jobs_then_stop(d)
    assert before["ohwx_one"]["state"] == "interrupted"
    step = before["ohwx_one"]["step"]
    dirs = _work_dirs(d)
    assert dirs == {j["id"] for j in before.values()}
    db = d.state / "jobs.db"
    if damage == "truncate":
        db.write_bytes(b"")  # `: > jobs.db`
    else:
        db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)

    d.env["SCRIPTED_ENGINE_STEP_S"] = "0.01"  # the rest only has to finish
    d.start()
    wait_for(
        lambda: set(d.job_states().values()) == {"done"} and len(d.jobs()) == 3, 90, message="all three done"
    )
    after = {j["dataset"]: j for j in d.jobs()}
    assert {k: v["id"] for k, v in after.items()} == {
        k: v["id"] for k, v in before.items()
    }  # same jobs, no new ones
    assert _work_dirs(d) >= dirs  # nothing deleted
    recovered = {e["job_id"] for e in d.events() if e["event"] == "job.recovered"}
    assert recovered == {j["id"] for j in before.values()}
    assert d.log_has("train.resume", job_id=before["ohwx_one"]["id"], step=step)  # resumed, not restarted
    assert sorted(json.loads(d.registry.read_text())["loras"]) == ["one", "three", "two"]
    for name in before:
        assert (d.training_data / name / "DONE").exists()
        assert not (d.training_data / name / "QUEUED").exists()


@pytest.mark.parametrize("damage", ["delete", "unopenable"])
def test_finished_jobs_stay_finished_after_rebuild(daemon_factory, damage):
    d = daemon_factory().start()
    done = make_dataset(d.training_data / "ohwx_done", images=1)
    (done / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_done") == "done", 60, message="done")
    d.stop()
    job = d.jobs()[0]
    for suffix in ("", "-wal", "-shm"):
        Path(str(d.state / "jobs.db") + suffix).unlink(missing_ok=True)
    if damage == "unopenable":  # SQLite cannot open it at all (we run as root: no chmod 000)
        (d.state / "jobs.db").mkdir()
        (d.state / "jobs.db" / "mine.txt").write_text("kept")
    d.start()
    if damage == "unopenable":
        moved = [p for p in d.state.iterdir() if p.name.startswith("jobs.db.corrupt-")]
        assert len(moved) == 1 and (moved[0] / "mine.txt").read_text() == "kept"
        assert d.log_has("jobs.db_rebuilt", moved_to=str(moved[0]), recovered=1)
    wait_for(lambda: d.job_states().get("ohwx_done") == "done", 30, message="recovered as done")
    again = d.jobs()[0]
    assert again["id"] == job["id"] and again["outputs"]["lora"] == job["outputs"]["lora"]
    # Its progress too (issue 19): not a blank bar in status and the dashboard.
    assert job["step"] == job["total_steps"] == 2
    assert (again["step"], again["total_steps"], again["loss"]) == (2, 2, job["loss"])
    assert again["plan"].get("total_steps") == 2
    assert len([e for e in d.events() if e["event"] == "job.started"]) == 1  # never retrained
    assert d.log_has("job.recovered", job_id=job["id"], state="done")
    # An unchanged re-drop is still recognised: the rebuilt row kept the fingerprint.
    (done / "READY").write_text("steps = 2\n")
    wait_for(lambda: not (done / "READY").exists(), 30, message="READY consumed")
    assert len(d.jobs()) == 1 and d.log_has("dataset.unchanged", job_id=job["id"])


def test_work_dir_without_record_is_left_alone(daemon_factory):
    d = daemon_factory()
    stray = d.state / "jobs" / "20260101-000000-abcd"
    (stray / "train").mkdir(parents=True)
    (stray / "train" / "keep.bin").write_bytes(b"precious")
    broken = d.state / "jobs" / "20260101-000000-beef"
    broken.mkdir(parents=True)
    (broken / "job.json").write_text("{not json")
    d.start()
    assert (stray / "train" / "keep.bin").read_bytes() == b"precious"
    assert (broken / "job.json").read_text() == "{not json"
    assert d.log_has("job.unrecoverable", path=str(stray))
    assert d.log_has("job.unrecoverable", path=str(broken))
    assert d.jobs() == []


# -- the record itself (pure) -------------------------------------------------------------------


def _job(**overrides) -> Job:
    columns = dict(
        id="20260101-000000-abcd",
        seq=1,
        dataset="ohwx_a",
        dataset_path="/x/ohwx_a",
        name="a",
        trigger_word="ohwx",
        fingerprint="f" * 64,
        ready_token="1:2:3",
        settings='{"model": "tiny-z-image"}',
        state="queued",
        attempt=1,
        priority=2,
        ready_at=10.0,
        created_at=11.0,
        updated_at=12.0,
        started_at=None,
        finished_at=None,
        step=None,
        total_steps=None,
        loss=None,
        eta_s=None,
        error=None,
        outputs="{}",
        cancel_requested=0,
        plan="{}",
    )
    columns.update(overrides)
    return Job(**columns)


@pytest.mark.parametrize(
    "state, outputs, error, expected_state",
    [
        ("queued", "{}", None, "interrupted"),
        ("training", "{}", None, "interrupted"),
        ("done", '{"lora": "/l/a.safetensors"}', None, "done"),
        ("failed", "{}", "boom", "failed"),
        ("cancelled", "{}", None, "cancelled"),
    ],
)
def test_record_round_trip(state, outputs, error, expected_state):
    job = _job(state=state, outputs=outputs, error=error)
    record = jobrecord.record_of(job)
    assert record["version"] == jobrecord.VERSION
    row, problem = jobrecord.row_from_record(json.loads(json.dumps(record)), job.id)
    assert problem is None
    assert row["state"] == expected_state
    for key in (
        "id",
        "dataset",
        "dataset_path",
        "name",
        "fingerprint",
        "ready_token",
        "priority",
        "ready_at",
        "created_at",
        "attempt",
    ):
        assert row[key] == getattr(job, key), key
    assert row["trigger_word"] == "ohwx" and json.loads(row["settings"]) == {"model": "tiny-z-image"}
    if state == "done":
        assert json.loads(row["outputs"]) == {"lora": "/l/a.safetensors"}
    if state == "failed":
        assert row["error"] == "boom"


@pytest.mark.parametrize(
    "state, step, total, loss, expected",
    [
        ("done", 40, 40, 0.125, (40, 40, 0.125)),
        ("failed", 7, 40, 0.5, (7, 40, 0.5)),
        ("cancelled", 3, 40, None, (3, 40, None)),
        ("done", None, None, None, (None, None, None)),  # a record written before the progress keys
    ],
)
def test_record_keeps_progress_of_finished_jobs(state, step, total, loss, expected):
    """After a jobs.db rebuild a finished job shows the progress it ended at (issue 19)."""
    job = _job(state=state, step=step, total_steps=total, loss=loss)
    record = json.loads(json.dumps(jobrecord.record_of(job)))
    if step is None:
        record = {k: v for k, v in record.items() if k not in ("step", "total_steps", "loss")}
    row, problem = jobrecord.row_from_record(record, job.id)
    assert problem is None
    assert (row.get("step"), row.get("total_steps"), row.get("loss")) == expected


@pytest.mark.parametrize(
    "record, problem",
    [
        ("not a dict", "not a JSON object"),
        ({"version": 99}, "version 99"),
        ({"version": 1, "id": "other"}, "belongs to job 'other'"),
        ({"version": 1, "id": "j"}, "missing"),
    ],
)
def test_unusable_records_are_named(record, problem):
    row, why = jobrecord.row_from_record(record, "j")
    assert row is None and problem in why


def test_store_keeps_the_record_in_step_and_never_fails_for_it(tmp_path):
    from daemon.jobs import JobStore

    jobs_dir = tmp_path / "jobs"
    store = JobStore(tmp_path / "jobs.db", write_markers=False, jobs_dir=jobs_dir)
    (jobs_dir / "j1").mkdir(parents=True)

    def record():
        return json.loads((jobs_dir / "j1" / "job.json").read_text())

    store.create(
        job_id="j1",
        dataset_path=tmp_path / "ohwx_a",
        name="a",
        trigger="ohwx",
        fingerprint="fp",
        ready_token="1:2:3",
        settings={"model": "m"},
        priority=1,
        ready_at=5.0,
    )
    assert record()["state"] == "queued" and record()["fingerprint"] == "fp" and record()["version"] == 1
    store.transition("j1", "preparing")
    store.transition("j1", "failed", error="boom")
    assert record()["state"] == "failed" and record()["error"] == "boom"
    store.transition("j1", "queued", attempt=2, error=None)
    assert record()["state"] == "queued" and record()["attempt"] == 2
    # A refused intake has no work dir: nothing is created for it.
    store.create(
        job_id="j2",
        dataset_path=tmp_path / "ohwx_b",
        name="b",
        trigger="ohwx",
        fingerprint="",
        ready_token=None,
        settings={},
    )
    assert not (jobs_dir / "j2").exists()
    # A record that cannot be written (here: job.json is a folder) is logged; the move still happens.
    (jobs_dir / "j1" / "job.json").unlink()
    (jobs_dir / "j1" / "job.json").mkdir()
    assert store.transition("j1", "cancelled").state == "cancelled"


def test_stale_registry_temp_beside_a_symlinked_registrys_target_is_removed(tmp_path):
    """A kill -9 mid-publish leaves the registry's temp beside its *target* (writes go through the
    link): start-up cleaning must look there, not only beside the link."""
    from daemon.daemon import clean_work_dirs
    from daemon.jobs import JobStore
    from daemon.settings import Settings

    app = tmp_path / "app"
    app.mkdir()
    (app / "config.json").write_text("{}")
    link = tmp_path / "project" / "config.json"
    link.parent.mkdir()
    link.symlink_to(app / "config.json")
    dead_pid = 2**22 + 1  # above pid_max's default: no such process
    stale = app / f".config.json.{dead_pid}.0123abcd.tmp"
    stale.write_text("{half")
    settings = Settings(assets=tmp_path / "assets", registry=link)
    store = JobStore(settings.jobs_db)
    removed = clean_work_dirs(settings, store)
    assert not stale.exists(), removed
    assert (app / "config.json").read_text() == "{}" and link.is_symlink()
