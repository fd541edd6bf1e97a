"""A registry shared or held: refused names never train, two daemons share a symlinked registry
without clobbering, a held or killed registry lock ends in a publish-only retry, case-variant
dataset names are one LoRA. Real daemons."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import wait_for

from daemon import registry
from daemon.publish import metadata_of
from daemon.sample import make_dataset


@pytest.fixture
def daemons(daemon_factory):
    """Daemons with their own assets folders under one tmp_path (conftest's daemon_factory)."""
    return daemon_factory


def test_refused_names_never_train_and_leave_other_loras_alone(daemons):
    d = daemons("one").start()
    alice = make_dataset(d.training_data / "ohwx_alice", images=1)
    (alice / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 60, message="alice done")
    compare = d.assets / "loras" / "alice.compare.png"
    before = compare.read_bytes()
    clash = make_dataset(d.training_data / "ohwx_other", images=1, seed=3)
    (clash / "READY").write_text('name = "alice.compare"\n')
    emoji = make_dataset(d.training_data / "ohwx_emoji", images=1, seed=4)
    (emoji / "READY").write_text('name = "' + "😀" * 100 + '"\n')
    wait_for(
        lambda: (clash / "FAILED.txt").exists() and (emoji / "FAILED.txt").exists(), 60, message="refusals"
    )
    assert "alice.compare.png" in (clash / "FAILED.txt").read_text()
    assert "400 bytes" in (emoji / "FAILED.txt").read_text()
    assert compare.read_bytes() == before
    assert sorted(p.name for p in (d.assets / "loras").iterdir()) == [
        "alice.compare.png",
        "alice.png",
        "alice.report",
        "alice.safetensors",
    ]
    assert not d.log_has("job.started", dataset="ohwx_other") and not d.log_has(
        "job.started", dataset="ohwx_emoji"
    )


def test_two_daemons_share_a_symlinked_registry_without_clobbering(daemons, tmp_path):
    shared = tmp_path / "shared" / "config.json"
    shared.parent.mkdir()
    shared.write_text(json.dumps({"app": {"theme": "dark"}, "loras": {}}))
    shared.chmod(0o640)
    ds = []
    for sub in ("a", "b"):
        link = tmp_path / sub / "config.json"
        link.parent.mkdir()
        link.symlink_to(shared)
        ds.append(daemons(sub, extra_env={"LORAD_REGISTRY": str(link)}).start())
    for i, d in enumerate(ds):
        folder = make_dataset(d.training_data / "ohwx_alice", images=1, seed=i)
        (folder / "READY").write_text("")
    for d in ds:
        wait_for(lambda d=d: d.job_states().get("ohwx_alice") == "done", 90, message="both done")
    for sub in ("a", "b"):
        assert (tmp_path / sub / "config.json").is_symlink()  # still a link: the target got the entries
    assert shared.stat().st_mode & 0o777 == 0o640
    data = json.loads(shared.read_text())
    assert data["app"] == {"theme": "dark"}
    entries = data["loras"]
    assert len(entries) == 2, entries
    keys = sorted(entries, key=len)
    assert keys[0] == "alice" and keys[1].startswith("alice@")
    for d in ds:
        lora = d.assets / "loras" / "alice.safetensors"
        (mine,) = [e for e in entries.values() if e["path"] == str(lora)]
        assert mine["job_id"] == metadata_of(lora)["lorad.job_id"]
    later = next(d for d in ds if str(d.assets) in entries[keys[1]]["path"])
    assert later.log_has("registry.clash", key="alice", kept_as=keys[1])
    assert not [p for p in shared.parent.iterdir() if p.name.endswith(".tmp")]


def _hold_lock(lock: Path) -> subprocess.Popen:
    """`flock -x <lock> sleep 300`: another program holding the registry lock (its own group, so
    the sleep that inherits the lock goes too)."""
    return subprocess.Popen(["flock", "-x", str(lock), "sleep", "300"], start_new_session=True)


def _release(holder: subprocess.Popen) -> None:
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()


def _lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_held_registry_lock_fails_the_job_next_job_runs_retry_completes_registry_only(daemons):
    d = daemons("one", extra_env={"LORAD_LOCK_TIMEOUT_S": "1", "SCRIPTED_ENGINE_STEP_S": "0.2"})
    lock = d.registry.with_name(d.registry.name + ".lock")
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        d.start()
        first = make_dataset(d.training_data / "ohwx_first", images=1)
        (first / "READY").write_text("steps = 2\n")
        wait_for(lambda: "ohwx_first" in d.job_states(), 30, message="first queued")
        second = make_dataset(d.training_data / "ohwx_second", images=1, seed=2)
        (second / "READY").write_text("steps = 60\n")
        wait_for(lambda: d.job_states().get("ohwx_first") == "failed", 60, message="first fails on the lock")
        job = next(j for j in d.jobs() if j["dataset"] == "ohwx_first")
        assert str(lock) in job["error"] and f"pid {holder.pid}" in job["error"] and "flock" in job["error"]
        assert f"lorad retry {job['id']}" in job["error"]
        assert d.log_has("registry.lock_wait", job_id=job["id"]) and d.log_has(
            "registry.lock_timeout", job_id=job["id"]
        )
        lora = d.assets / "loras" / "first.safetensors"
        assert metadata_of(lora)["lorad.job_id"] == job["id"]  # the LoRA itself is published
        assert not d.registry.exists()  # the registry was never written
        # The queue is not stalled: the next job runs while the lock is still held.
        wait_for(
            lambda: d.job_states().get("ohwx_second") in ("training", "rendering", "publishing"),
            60,
            message="second runs while the lock is held",
        )
        assert holder.poll() is None
    finally:
        _release(holder)
    wait_for(lambda: d.job_states().get("ohwx_second") == "done", 90, message="second done")
    lora_bytes = lora.read_bytes()
    children = len([e for e in d.events() if e["event"] == "job.child" and e.get("job_id") == job["id"]])
    assert d.cli("retry", job["id"]).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_first") == "done", 60, message="first done after retry")
    events = [e for e in d.events() if e.get("job_id") == job["id"]]
    assert len([e for e in events if e["event"] == "job.child"]) == children  # no retraining, no re-render
    assert not [e for e in events if e["event"] == "train.resume"]
    assert d.log_has("job.registry_only", job_id=job["id"])
    assert lora.read_bytes() == lora_bytes
    assert sorted(p.name for p in (d.assets / "loras").glob("first*")) == [
        "first.compare.png",
        "first.png",
        "first.report",
        "first.safetensors",
    ]  # no .v1 of its own file
    entries = json.loads(d.registry.read_text())["loras"]
    assert set(entries) == {"first", "second"}
    assert entries["first"]["job_id"] == job["id"] and entries["first"]["path"] == str(lora)
    done = next(j for j in d.jobs() if j["dataset"] == "ohwx_first")
    assert done["outputs"]["lora"] == str(lora)


def test_kill9_while_waiting_for_the_registry_lock_next_start_completes_registry_only(daemons):
    d = daemons("one").start()
    lock = d.registry.with_name(d.registry.name + ".lock")
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        folder = make_dataset(d.training_data / "ohwx_pub", images=1)
        (folder / "READY").write_text("")
        wait_for(lambda: d.log_has("registry.lock_wait"), 60, message="waiting for the lock (files renamed)")
        d.kill9()
    finally:
        _release(holder)
    job = d.jobs()[0]
    lora = d.assets / "loras" / "pub.safetensors"
    assert metadata_of(lora)["lorad.job_id"] == job["id"]
    lora_bytes = lora.read_bytes()
    d.start()
    wait_for(lambda: d.job_states().get("ohwx_pub") == "done", 60, message="done after restart")
    assert d.log_has("job.registry_only", job_id=job["id"]) and not d.log_has(
        "train.resume", job_id=job["id"]
    )
    assert lora.read_bytes() == lora_bytes and not list((d.assets / "loras").glob("pub.v*"))
    assert json.loads(d.registry.read_text())["loras"]["pub"]["job_id"] == job["id"]


def test_lock_timeout_names_the_holder(tmp_path):
    path = tmp_path / "config.json"
    lock = tmp_path / "config.json.lock"
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        with pytest.raises(registry.RegistryLockTimeout) as info:
            with registry.Transaction(path, timeout_s=0.3):
                pass
        assert (
            f"pid {holder.pid}" in str(info.value)
            and "flock" in str(info.value)
            and str(lock) in str(info.value)
        )
    finally:
        _release(holder)
    with registry.Transaction(path, timeout_s=5) as txn:  # free again
        txn.prepare({"x": {"path": "p"}})
        txn.commit()
    assert json.loads(path.read_text())["loras"] == {"x": {"path": "p"}}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_datasets_differing_only_in_case_are_one_lora_name(daemons):
    """`ohwx_Alice` then `ohwx_alice`: the second publishes under the first's spelling and keeps
    it as `Alice.v1` with its renders (on APFS the two spellings are one file, and the second
    publish silently replaced the first's LoRA and renders)."""
    d = daemons("case").start()
    first = make_dataset(d.training_data / "ohwx_Alice", images=1)
    (first / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_Alice") == "done", 60, message="Alice done")
    loras = d.assets / "loras"
    before = {p.name: p.read_bytes() for p in loras.iterdir() if p.is_file()}
    second = make_dataset(d.training_data / "ohwx_alice", images=1, seed=7)
    (second / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 60, message="alice done")
    jobs = {j["dataset"]: j for j in d.jobs()}
    assert sorted(p.name for p in loras.iterdir()) == [
        "Alice.compare.png",
        "Alice.png",
        "Alice.report",
        "Alice.safetensors",
        "Alice.v1.compare.png",
        "Alice.v1.png",
        "Alice.v1.report",
        "Alice.v1.safetensors",
    ]
    for name, data in before.items():
        assert (loras / name.replace("Alice", "Alice.v1", 1)).read_bytes() == data, name
    assert metadata_of(loras / "Alice.safetensors")["lorad.job_id"] == jobs["ohwx_alice"]["id"]
    entries = json.loads(d.registry.read_text())["loras"]
    assert {k: v["job_id"] for k, v in entries.items()} == {
        "Alice": jobs["ohwx_alice"]["id"],
        "Alice.v1": jobs["ohwx_Alice"]["id"],
    }
    assert jobs["ohwx_alice"]["outputs"]["lora"] == str(loras / "Alice.safetensors")
    assert d.log_has("publish.spelling", name="alice", published_as="Alice")
    assert "is the LoRA 'Alice' already published" in (second / "DONE").read_text()  # said up front
