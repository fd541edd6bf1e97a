"""Fault and abuse suite (R1-R6): kill -9 at every phase, bursts with a restart, hostile paths,
a full disk, corrupt databases. Real daemon, real watcher, real SQLite; the scripted engine is
a real child process (the mflux engine's kill/stop paths run in test_mflux_training.py).
docs/RELIABILITY.md lists each case with what was expected and observed.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import hold_training_at, tree_hash, wait_for, wait_held

from daemon.sample import make_dataset
from engines.mflux import checkpoints

pytestmark = pytest.mark.slow


MARKERS = ("QUEUED", "TRAINING", "DONE", "FAILED.txt", "CANCELLED")


def assert_exactly_once(d, dataset: str, name: str) -> dict:
    jobs = [j for j in d.jobs() if j["dataset"] == dataset]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert job["state"] == "done", job
    loras = d.assets / "loras"
    assert sorted(p.name for p in loras.glob(f"{name}*.safetensors")) == [f"{name}.safetensors"]
    assert list(json.loads(d.registry.read_text())["loras"]) == [name]
    leftovers = [p for p in d.assets.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".intake-")]
    assert not leftovers, leftovers
    assert not [p for p in loras.iterdir() if p.name.startswith(".")]
    ckpt_dir = d.state / "jobs" / job["id"] / "train" / "checkpoints"
    for zip_path in checkpoints.list_checkpoints(ckpt_dir):
        assert checkpoints.verify(zip_path) is None, zip_path
    return job


def workers(d) -> list[str]:
    return subprocess.run(
        ["pgrep", "-f", f"--job-dir {d.state}"], capture_output=True, text=True
    ).stdout.split()


# -- R1: kill -9 at each phase --------------------------------------------------------------


def finish_fast(d) -> None:
    """After the fault, the job only has to finish: its remaining steps and render take no time
    (the slow steps only made room for the fault; the next start reads the env)."""
    d.env["SCRIPTED_ENGINE_STEP_S"] = "0.01"
    d.env["SCRIPTED_ENGINE_RENDER_S"] = "0"


def _kill_then_finish(d, dataset: str, name: str):
    d.kill9()
    wait_for(lambda: not workers(d), 30, message="no orphan worker")
    finish_fast(d)
    d.start()
    wait_for(lambda: d.job_states().get(dataset) == "done", 90, message=f"{dataset} done after restart")
    return assert_exactly_once(d, dataset, name)


def test_r1_kill9_during_intake(daemon_factory):
    d = daemon_factory().start()
    folder = make_dataset(d.training_data / "ohwx_intake", images=40, size=768)
    (folder / "READY").write_text("")
    wait_for(
        lambda: list((d.state / "jobs").glob(".intake-*")) if (d.state / "jobs").exists() else [],
        30,
        0.005,
        message="snapshot in progress",
    )
    _kill_then_finish(d, "ohwx_intake", "intake")


def test_r1_kill9_while_queued(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.2"})
    held = hold_training_at(d, 1)  # the first stays in training until the kill
    d.start()
    first = make_dataset(d.training_data / "ohwx_first", images=1)
    (first / "READY").write_text("steps = 20\n")
    wait_held(held, 30)
    second = make_dataset(d.training_data / "ohwx_second", images=1, seed=3)
    (second / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_second") == "queued", 30, message="second queued")
    d.kill9()
    wait_for(lambda: not workers(d), 30, message="no orphan worker")
    finish_fast(d)
    d.start()
    wait_for(lambda: set(d.job_states().values()) == {"done"}, 90, message="both done")
    assert [j["dataset"] for j in d.jobs()] == ["ohwx_first", "ohwx_second"]  # one job each
    assert sorted(json.loads(d.registry.read_text())["loras"]) == ["first", "second"]
    runs = [e["dataset"] for e in d.events() if e["event"] in ("job.started", "job.resumed")]
    assert runs == ["ohwx_first", "ohwx_first", "ohwx_second"]  # started, resumed first, then the queued one


def test_r1_kill9_while_training(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.2"})
    held = hold_training_at(d, 4)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_train", images=1)
    (folder / "READY").write_text("steps = 20\n")
    wait_held(held, 30)
    _kill_then_finish(d, "ohwx_train", "train")


def test_r1_kill9_while_rendering(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_RENDER_S": "5"}).start()
    folder = make_dataset(d.training_data / "ohwx_render", images=1)
    (folder / "READY").write_text("steps = 4\n")
    wait_for(lambda: d.job_states().get("ohwx_render") == "rendering", 30, message="rendering")
    job = _kill_then_finish(d, "ohwx_render", "render")
    assert d.log_has("train.resume", job_id=job["id"], step=4)  # training was not redone


def test_r1_kill9_while_publishing(daemon_factory):
    d = daemon_factory().start()
    lock_path = d.registry.with_name(d.registry.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a concurrent registry writer holds the lock
    try:
        folder = make_dataset(d.training_data / "ohwx_pub", images=1)
        (folder / "READY").write_text("")
        wait_for(lambda: d.job_states().get("ohwx_pub") == "publishing", 30, message="publishing")
        d.kill9()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    wait_for(lambda: not workers(d), 30, message="no orphan worker")
    d.start()
    wait_for(lambda: d.job_states().get("ohwx_pub") == "done", 90, message="done after restart")
    assert_exactly_once(d, "ohwx_pub", "pub")


def test_r1_kill9_of_the_training_child_alone(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.2", "LORAD_RAM_GB": "128"})
    held = hold_training_at(d, 5)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_child", images=1)
    (folder / "READY").write_text("steps = 16\n")
    pid = wait_held(held, 30)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: d.job_states().get("ohwx_child") == "done", 90, message="done after child kill")
    job = assert_exactly_once(d, "ohwx_child", "child")
    assert d.log_has("job.stepdown") and job["plan"]["step_downs"] == 1
    resumes = [e["step"] for e in d.events() if e["event"] == "train.resume" and e.get("job_id") == job["id"]]
    assert resumes and resumes[0] >= 4  # resumed from a checkpoint, not from scratch


# -- R2: SIGTERM ------------------------------------------------------------------------------


def test_r2_sigterm_exits_0_within_30s_and_resumes(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.5"})
    held = hold_training_at(d, 3)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_term", images=1)
    (folder / "READY").write_text("steps = 30\n")
    wait_held(held, 30)
    import time

    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0 and time.monotonic() - sent < 30
    job = d.jobs()[0]
    assert job["state"] == "interrupted"
    newest = checkpoints.newest_good(d.state / "jobs" / job["id"] / "train" / "checkpoints")[0]
    assert checkpoints.step_of(newest) == job["step"]  # saved at the current step, not a periodic one
    assert "interrupted" in (folder / "QUEUED").read_text()
    finish_fast(d)
    d.start()
    wait_for(lambda: d.job_states().get("ohwx_term") == "done", 90, message="resumed")
    assert d.log_has("train.resume", job_id=job["id"], step=job["step"])


# -- R3: 50 READY in a second, restart in the middle -------------------------------------------


def test_r3_fifty_datasets_restart_midway_each_done_once_in_order(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.01"}).start()
    names = [f"ohwx_r{i:02d}" for i in range(50)]
    for i, name in enumerate(names):
        make_dataset(d.training_data / name, images=1, size=256, seed=i)
    for name in names:  # all READY within well under a second
        (d.training_data / name / "READY").write_text("steps = 1\n")
    wait_for(lambda: len([j for j in d.jobs() if j["state"] == "done"]) >= 8, 120, message="some done")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    d.start()
    wait_for(
        lambda: len([j for j in d.jobs() if j["state"] == "done"]) == 50, 300, interval=0.5, message="50 done"
    )
    jobs = d.jobs()
    assert len(jobs) == 50 and sorted(j["dataset"] for j in jobs) == names
    started = [e["dataset"] for e in d.events() if e["event"] == "job.started"]
    assert sorted(started) == names and len(started) == 50  # each started exactly once...
    assert started == names  # ...in READY order (FIFO), across the restart
    assert len(json.loads(d.registry.read_text())["loras"]) == 50


# -- R4: hostile inputs ---------------------------------------------------------------------


def test_r4_dataset_deleted_while_queued_and_while_training(daemon_factory):
    import shutil

    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.2"}).start()
    training = make_dataset(d.training_data / "ohwx_gone1", images=1)
    (training / "READY").write_text("steps = 10\n")
    wait_for(lambda: d.job_states().get("ohwx_gone1") == "training", 30, message="training")
    queued = make_dataset(d.training_data / "ohwx_gone2", images=1, seed=2)
    (queued / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_gone2") == "queued", 30, message="queued")
    shutil.rmtree(training)
    shutil.rmtree(queued)
    wait_for(lambda: set(d.job_states().values()) == {"done"}, 90, message="both done from snapshots")
    assert not training.exists() and not queued.exists()  # markers never recreate the folder
    assert (d.assets / "loras" / "gone1.safetensors").exists() and (
        d.assets / "loras" / "gone2.safetensors"
    ).exists()


def test_r4_hostile_paths_and_files(daemon_factory, tmp_path):
    d = daemon_factory().start()
    td = d.training_data
    outside = tmp_path / "outside"
    make_dataset(outside / "ohwx_real", images=1)

    # READY deleted before intake: nothing happens.
    a = make_dataset(td / "ohwx_vanish", images=1)
    (a / "READY").write_text("")
    (a / "READY").unlink()
    # READY that is a directory, READY that is a symlink.
    b = make_dataset(td / "ohwx_readydir", images=1)
    (b / "READY").mkdir()
    (b / "READY" / "keep.txt").write_text("mine")
    c = make_dataset(td / "ohwx_readylink", images=1)
    (c / "elsewhere").write_text("")
    os.symlink(c / "elsewhere", c / "READY")
    # A dataset folder that is a symlink out of assets (with a READY inside the target).
    (outside / "ohwx_real" / "READY").write_text("")
    before_outside = tree_hash(outside, skip=())  # READY included: it must stay
    os.symlink(outside / "ohwx_real", td / "ohwx_linked")
    # Unicode and '..' in names; a hidden LoRA name; a 0-byte lora.toml; a 10 MB caption.
    u = make_dataset(td / "ohwx_ünï cödé 名前", images=1)
    dots = make_dataset(td / "ohwx_..dots", images=1)  # would publish a hidden "..dots.safetensors"
    inner = make_dataset(td / "ohwx_a..b", images=1)
    hidden = make_dataset(td / "ohwx_.hidden", images=1)
    empty_toml = make_dataset(td / "ohwx_emptytoml", images=1)
    (empty_toml / "lora.toml").write_bytes(b"")
    huge = make_dataset(td / "ohwx_hugecaption", images=1)
    (huge / "img_000.txt").write_bytes(b"ohwx " + b"x" * (10 * 1024 * 1024))
    folders = [a, b, c, u, dots, inner, hidden, empty_toml, huge]
    before = {f: tree_hash(f, skip=(*MARKERS, "READY")) for f in folders}
    for f in (u, dots, inner, hidden, empty_toml, huge):
        (f / "READY").write_text("")

    wait_for(
        lambda: all((f / "FAILED.txt").exists() for f in (b, c, dots, hidden, huge)), 60, message="refusals"
    )
    wait_for(
        lambda: (
            {d.job_states().get(n) for n in ("ohwx_ünï cödé 名前", "ohwx_a..b", "ohwx_emptytoml")} == {"done"}
        ),
        90,
        message="good ones done",
    )
    assert (
        "READY is a folder" in (b / "FAILED.txt").read_text()
        and (b / "READY" / "keep.txt").read_text() == "mine"
    )
    assert "READY is a symlink" in (c / "FAILED.txt").read_text() and (c / "READY").is_symlink()
    assert "hidden file name" in (hidden / "FAILED.txt").read_text()
    assert "hidden file name" in (dots / "FAILED.txt").read_text()
    assert (
        "img_000.txt" in (huge / "FAILED.txt").read_text()
        and "10,240 KB" in (huge / "FAILED.txt").read_text()
    )
    assert not [
        p for p in a.iterdir() if p.name in ("FAILED.txt", "QUEUED", "DONE")
    ]  # READY vanished: nothing
    linked = next(j for j in d.jobs() if j["dataset"] == "ohwx_linked")
    assert linked["state"] == "failed" and "symlink" in linked["error"]  # shown in status, never trained
    assert tree_hash(outside, skip=()) == before_outside  # nothing written or removed through the symlink
    assert d.log_has("dataset.invalid")
    assert (d.assets / "loras" / "ünï cödé 名前.safetensors").exists()
    assert (d.assets / "loras" / "a..b.safetensors").exists()
    assert not list((d.assets / "loras").glob("..dots*"))
    for f in folders:
        assert tree_hash(f, skip=(*MARKERS, "READY")) == before[f], f
    assert d.proc.poll() is None  # the daemon is alive


# -- R5: output disk full ------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


def test_r5_disk_full_leaves_previous_lora_and_registry_then_retry(daemon_factory):
    d = daemon_factory()
    loras = d.assets / "loras"
    if os.geteuid() != 0 or not _mount_tmpfs(loras, "512k"):
        pytest.skip("needs root and tmpfs to make a small filesystem for assets/loras")
    try:
        d.start()
        folder = make_dataset(d.training_data / "ohwx_full", images=1)
        (folder / "READY").write_text("")
        wait_for(lambda: d.job_states().get("ohwx_full") == "done", 60, message="first publish")
        previous = (loras / "full.safetensors").read_bytes()
        registry_before = d.registry.read_bytes()
        filler = loras / "filler.bin"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            while True:
                os.write(fd, b"\0" * 1024)
        except OSError:
            pass
        finally:
            os.close(fd)
        make_dataset(folder, images=2, seed=9)  # changed content, same LoRA name
        (folder / "READY").write_text("")
        wait_for(lambda: [j["state"] for j in d.jobs()] == ["done", "failed"], 60, message="publish fails")
        job = d.jobs()[1]
        assert "No space left on device" in job["error"] and f"lorad retry {job['id']}" in job["error"]
        assert "No space left" in (folder / "FAILED.txt").read_text()
        assert (loras / "full.safetensors").read_bytes() == previous
        assert d.registry.read_bytes() == registry_before
        assert not [p for p in loras.iterdir() if p.name.startswith(".")]  # no temp files left behind
        filler.unlink()
        assert d.cli("retry", job["id"]).returncode == 0
        wait_for(lambda: [j["state"] for j in d.jobs()] == ["done", "done"], 60, message="retry succeeds")
        assert (loras / "full.v1.safetensors").read_bytes() == previous
    finally:
        d.stop()
        subprocess.run(["umount", str(loras)], capture_output=True)


# -- R6: single instance, corrupt databases -----------------------------------------------------


@pytest.mark.parametrize("db", ["jobs.db", "queue.db"])
def test_r6_corrupt_database_is_moved_aside_and_rebuilt(daemon_factory, db):
    d = daemon_factory().start()
    folder = make_dataset(d.training_data / "ohwx_db", images=1)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_db") == "done", 60, message="a job in the db")
    d.stop()
    job = d.jobs()[0]
    path = d.state / db
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(3996)  # garbage over the header and schema pages
    path.write_bytes(bytes(data))
    corrupt = path.read_bytes()
    d.start()
    moved = [p for p in d.state.iterdir() if p.name.startswith(db + ".corrupt-")]
    assert [p.read_bytes() for p in moved] == [corrupt]  # kept, byte for byte
    event = "jobs.db_rebuilt" if db == "jobs.db" else "queue.db_rebuilt"
    assert d.log_has(event, moved_to=str(moved[0]))
    assert [(j["id"], j["state"]) for j in d.jobs()] == [(job["id"], "done")]
    second = make_dataset(d.training_data / "ohwx_after", images=1, seed=5)
    (second / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_after") == "done", 60, message="the queue runs")
