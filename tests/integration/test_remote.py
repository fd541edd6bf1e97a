"""Scale-out with real components: a real redis-server (tests/redis_fixture.py), `lorad run` as
the coordinator and `lorad worker` subprocesses with their own state dirs standing in for
machines. The scripted engine trains; holds (LORADTEST_HOLD_AT_STEP, SCRIPTED_ENGINE_HOLD_DIR)
put every kill and restart at an exact point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, DaemonProc, LoradProc, assert_no_orphans, wait_for

from daemon.sample import make_dataset


class WorkerProc(LoradProc):
    """A real `lorad worker --queue URL` with its own state dir (another machine)."""

    def __init__(self, root: Path, name: str, url: str, extra_env: dict | None = None):
        self.root, self.name, self.url = root, name, url
        self.state = root / f"worker-{name}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LORAD_")},
            "LORAD_STATE_DIR": str(self.state),
            "LORAD_ENGINE": "scripted",
            "LORAD_MODEL": "tiny-z-image",
            "LORAD_LOG_LEVEL": "DEBUG",
            "LORAD_LEASE_TTL_S": "3",
            "LORAD_STOP_TIMEOUT_S": "30",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProc":
        self.state.mkdir(parents=True, exist_ok=True)
        self._seed_model()
        self.out = (self.root / f"worker-{self.name}-{time.time_ns()}.out").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "worker", "--queue", self.url],
            cwd=ROOT, env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        pid = self.proc.pid
        wait_for(
            lambda: self.log_has("worker.started", pid=pid) or self.proc.poll() is not None,
            30,
            message="worker start",
        )
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
        return self


@pytest.fixture
def cluster(tmp_path, redis_factory):
    """(make_coordinator, make_worker, redis): every process is stopped at teardown, and no
    training child may outlive the test."""
    made: list = []

    def coordinator(redis, *, local_worker: bool = False, extra_env: dict | None = None) -> DaemonProc:
        env = {"LORAD_QUEUE": redis.url, "LORAD_LOCAL_WORKER": str(local_worker).lower(), "LORAD_LEASE_TTL_S": "3",
               **(extra_env or {})}  # fmt: skip
        d = DaemonProc(tmp_path, extra_env=env)
        made.append(d)
        return d

    def worker(redis, name: str, extra_env: dict | None = None) -> WorkerProc:
        w = WorkerProc(tmp_path, name, redis.url, extra_env)
        made.append(w)
        return w

    yield coordinator, worker
    for p in reversed(made):
        p.stop()
    assert_no_orphans(tmp_path)


def drop(d, name: str, *, images: int = 2, ready: str = "", seed: int = 0) -> Path:
    folder = make_dataset(d.training_data / name, images=images, seed=seed)
    (folder / "READY").write_text(ready)
    return folder


def published(d, name: str) -> list[str]:
    return sorted(p.name for p in (d.assets / "loras").glob(f"{name}*.safetensors"))


def lora_job_id(d, name: str) -> str:
    from daemon.publish import metadata_of

    return metadata_of(d.assets / "loras" / f"{name}.safetensors")["lorad.job_id"]


def test_remote_worker_trains_and_the_coordinator_publishes(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    w = make_worker(redis_server, "a").start()
    folder = drop(d, "ohwx_alice")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 90, message="remote job done")
    job = d.jobs()[0]
    assert job["worker"] and job["worker"].startswith(os.uname().nodename.split(".")[0])
    assert published(d, "alice") == ["alice.safetensors"]
    assert lora_job_id(d, "alice") == job["id"]
    for suffix in (".png", ".compare.png"):
        assert (d.assets / "loras" / f"alice{suffix}").is_file()
    assert list(json.loads(d.registry.read_text())["loras"]) == ["alice"]
    assert (folder / "DONE").exists()
    # The learning metrics of a remote job: the losses the coordinator received, and the base
    # render the worker sent back (not the LoRA render twice, which would make lora_effect 0).
    metrics = json.loads((d.assets / "loras" / "alice.report" / "metrics.json").read_text())
    assert metrics["loss_start"] is not None and metrics["loss_end"] is not None
    assert metrics["lora_effect"] is not None and metrics["lora_effect"] > 0
    assert job["metrics"] == metrics
    # The worker trained it; nothing of the job is left on the worker, and it never published.
    assert w.log_has("worker.claimed", job_id=job["id"]) and w.log_has("worker.delivered", job_id=job["id"])
    assert not (w.state / "work" / job["id"]).exists()
    assert not (w.state.parent / "assets").exists() or not list(w.state.rglob("*.safetensors"))
    # Its transfers left Redis when it ended.
    client = redis_server.client()
    assert not list(client.scan_iter(match="lorad:xfer:job:*"))
    assert not client.exists(f"lorad:token:{job['id']}") and not client.exists(f"lorad:lease:{job['id']}")
    # `lorad workers` lists it, idle again.
    out = d.cli("workers").stdout
    assert "idle" in out and "lorad:" not in out


def count_events(proc, event: str, **fields) -> int:
    return sum(
        1 for e in proc.events() if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    )


def hold_env(root: Path, name: str, step: int) -> tuple[dict, Path]:
    held = root / f"held-{name}-{step}.json"
    return {"LORADTEST_HOLD_AT_STEP": str(step), "LORADTEST_HOLD_FILE": str(held)}, held


def test_worker_killed_mid_training_another_resumes_from_the_last_checkpoint(cluster, redis_server, tmp_path):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    env, held = hold_env(tmp_path, "a", 5)
    a = make_worker(redis_server, "a", {**env, "SCRIPTED_ENGINE_STEP_S": "0.05"}).start()
    drop(d, "ohwx_crash", ready="steps = 12\n")
    wait_for(held.exists, 60, message="worker a holding at step 5")
    wait_for(
        lambda: d.log_has("job.checkpoint_received", step=4),
        30,
        message="checkpoint 4 reached the coordinator",
    )
    a.kill9()
    b = make_worker(redis_server, "b").start()
    wait_for(lambda: d.job_states().get("ohwx_crash") == "done", 90, message="job done on worker b")
    job_id = d.jobs()[0]["id"]
    assert d.log_has("job.lease_lapsed", job_id=job_id) and d.log_has("job.resumed", job_id=job_id)
    assert b.log_has("worker.claimed", job_id=job_id) and b.log_has("train.resume", step=4)
    assert published(d, "crash") == ["crash.safetensors"] and lora_job_id(d, "crash") == job_id
    assert count_events(d, "job.done", job_id=job_id) == 1
    assert list(json.loads(d.registry.read_text())["loras"]) == ["crash"]


def test_worker_whose_lease_lapsed_comes_back_and_stops_without_publishing(cluster, redis_server, tmp_path):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    env, held = hold_env(tmp_path, "a", 3)
    a = make_worker(redis_server, "a", env).start()
    drop(d, "ohwx_fence", ready="steps = 8\n")
    wait_for(held.exists, 60, message="worker a holding at step 3")
    job_id = d.jobs()[0]["id"]
    os.kill(a.proc.pid, signal.SIGSTOP)  # the worker "disappears" (network gone, laptop lid closed)
    try:
        wait_for(lambda: d.log_has("job.lease_lapsed", job_id=job_id), 30, message="lease lapsed")
        b = make_worker(redis_server, "b").start()
        wait_for(lambda: d.job_states().get("ohwx_fence") == "done", 90, message="job done on worker b")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)  # it comes back, still holding its old token
    wait_for(lambda: a.log_has("worker.fenced_stop", job_id=job_id), 60, message="worker a fenced out")
    wait_for(lambda: not (a.state / "work" / job_id).exists(), 30, message="worker a cleaned up")
    assert b.log_has("worker.claimed", job_id=job_id) and not a.log_has("worker.delivered", job_id=job_id)
    assert count_events(d, "job.done", job_id=job_id) == 1 and published(d, "fence") == ["fence.safetensors"]
    assert lora_job_id(d, "fence") == job_id


def test_a_job_no_worker_can_fit_waits_with_the_reason_then_a_bigger_worker_takes_it(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    small = {"LORAD_RAM_GB": "8", "LORAD_ENGINES_SCRIPTED_NEEDS_GB": "64"}
    make_worker(redis_server, "small", small).start()
    make_worker(redis_server, "small2", {**small, "LORAD_RAM_GB": "16"}).start()
    drop(d, "ohwx_big")
    expected = "waiting: needs ≥ 64 GB, largest worker has 16 GB"
    wait_for(lambda: expected in d.cli("status").stdout, 60, message="waiting reason in lorad status")
    assert d.job_states()["ohwx_big"] == "queued"
    assert d.jobs()[0]["waiting"] == expected
    # No bouncing: each small worker declined it once and left it queued.
    job_id = d.jobs()[0]["id"]
    big = make_worker(
        redis_server, "big", {"LORAD_RAM_GB": "128", "LORAD_ENGINES_SCRIPTED_NEEDS_GB": "64"}
    ).start()
    wait_for(lambda: d.job_states().get("ohwx_big") == "done", 90, message="the big worker trains it")
    assert big.log_has("worker.claimed", job_id=job_id)
    big_name = next(e["worker"] for e in big.events() if "worker" in e)  # a client debug line may come first
    assert d.jobs()[0]["worker"] == big_name and not d.jobs()[0]["waiting"]


def test_a_job_nobody_fits_fails_after_wait_timeout(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server, extra_env={"LORAD_WAIT_TIMEOUT_S": "2"}).start()
    make_worker(redis_server, "small", {"LORAD_RAM_GB": "8", "LORAD_ENGINES_SCRIPTED_NEEDS_GB": "64"}).start()
    drop(d, "ohwx_never")
    wait_for(
        lambda: d.job_states().get("ohwx_never") == "failed", 60, message="job failed after the wait timeout"
    )
    error = d.jobs()[0]["error"]
    assert "needs ≥ 64 GB, largest worker has 8 GB" in error and "lorad retry" in error


@pytest.mark.parametrize("keep_data", [True, False], ids=["with-data", "without-data"])
def test_redis_killed_mid_job_and_restarted_loses_and_duplicates_nothing(
    cluster, redis_factory, tmp_path, keep_data
):
    make_coordinator, make_worker = cluster
    redis = redis_factory(appendonly=keep_data)
    d = make_coordinator(redis).start()
    env, held = hold_env(tmp_path, "a", 3)
    a = make_worker(redis, "a", {**env, "LORADTEST_HOLD_MAX_S": "300"}).start()
    drop(d, "ohwx_redis", ready="steps = 8\n")
    drop(d, "ohwx_queued", ready="steps = 4\n", seed=1)
    wait_for(held.exists, 60, message="worker a holding at step 3")
    wait_for(
        lambda: d.log_has("job.checkpoint_received", step=2), 30, message="checkpoint 2 at the coordinator"
    )
    redis.kill9()
    wait_for(lambda: d.log_has("coordinator.redis_unreachable"), 30, message="coordinator notices")
    redis.restart(keep_data=keep_data)
    wait_for(lambda: d.log_has("coordinator.redis_back"), 60, message="coordinator reconnects")
    if not keep_data:  # Redis forgot the token: the worker is fenced out and stops its child
        wait_for(lambda: a.log_has("worker.fenced_stop"), 60, message="worker fenced out")
    try:  # with its data, the job goes on: end the hold (the child checkpoints at step 3 and stops;
        os.kill(json.loads(held.read_text())["pid"], signal.SIGTERM)  # the job is resumed from it)
    except ProcessLookupError:
        pass
    wait_for(lambda: set(d.job_states().values()) == {"done"}, 120, message="both jobs done")
    # The daemon logs job.done just after it commits the state: wait for the two lines, then count.
    wait_for(
        lambda: len([e for e in d.events() if e.get("event") == "job.done"]) >= 2, 30, message="job.done"
    )
    jobs = d.jobs()
    assert len(jobs) == 2
    for job in jobs:
        assert count_events(d, "job.done", job_id=job["id"]) == 1
    assert published(d, "redis") == ["redis.safetensors"] and published(d, "queued") == ["queued.safetensors"]
    assert sorted(json.loads(d.registry.read_text())["loras"]) == ["queued", "redis"]


def test_coordinator_restart_while_two_remote_jobs_run_publishes_each_once(cluster, redis_server, tmp_path):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    holds = {}
    workers = []
    for name in ("a", "b"):
        folder = tmp_path / f"hold-{name}"
        folder.mkdir()
        (folder / "trained.hold").write_text("")
        holds[name] = folder
        workers.append(make_worker(redis_server, name, {"SCRIPTED_ENGINE_HOLD_DIR": str(folder)}).start())
    drop(d, "ohwx_one", ready="steps = 4\n")
    drop(d, "ohwx_two", ready="steps = 4\n", seed=1)
    for folder in holds.values():
        wait_for((folder / "trained.reached").exists, 60, message="a worker finished training, holding")
    d.kill9()
    d.start()
    wait_for(lambda: d.log_has("coordinator.attached"), 30, message="re-attached")
    attached = [e for e in d.events() if e.get("event") == "coordinator.attached"][-1]
    assert len(attached["attached"]) == 2 and not attached["interrupted"]
    for folder in holds.values():
        (folder / "trained.hold").unlink()
    wait_for(
        lambda: set(d.job_states().values()) == {"done"} and len(d.job_states()) == 2, 90, message="both done"
    )
    for job in d.jobs():
        assert count_events(d, "job.done", job_id=job["id"]) == 1
        assert (
            sum(count_events(w, "worker.claimed", job_id=job["id"]) for w in workers) == 1
        )  # never trained twice
    assert published(d, "one") == ["one.safetensors"] and published(d, "two") == ["two.safetensors"]


# -- the coordinator refuses what does not check out -------------------------------------------


def _result_parts(tmp_path: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image
    from safetensors.numpy import save_file

    adapter = tmp_path / "adapter.safetensors"
    save_file({"x.lora_A.weight": np.ones((4, 8), dtype=np.float32)}, str(adapter))
    png = tmp_path / "render.png"
    Image.new("RGB", (8, 8)).save(png)
    return {"adapter": adapter, "render": png, "compare": png}


def _coordinator(tmp_path: Path, url: str):
    import threading

    from daemon.jobs import JobStore
    from daemon.remote.coordinator import Coordinator
    from daemon.settings import resolve

    settings = resolve(flags={"assets": tmp_path / "assets", "queue": url, "engine": "scripted"})
    store = JobStore(settings.jobs_db, write_markers=False)
    return Coordinator(settings, store, threading.Event())


def _upload(store, parts: dict[str, Path], case: str = "t") -> dict:
    return {
        name: store.put_file(f"job:j1:{case}:result:{name}", path).to_dict() for name, path in parts.items()
    }


def test_coordinator_refuses_a_tampered_or_malformed_result(tmp_path, redis_server):
    from daemon.jobs import Job
    from daemon.remote.coordinator import ResultRefused

    c = _coordinator(tmp_path, redis_server.url)
    job = Job(id="j1", plan={})
    parts = _result_parts(tmp_path)
    refs = _upload(c.files, parts)
    assert c.collect_result(job, {"files": refs, "report": []}).is_dir()  # the intact one passes

    client = redis_server.client()
    chunk = "lorad:xfer:job:j1:t:result:adapter:~c:0"
    data = bytearray(client.get(chunk))
    data[-1] ^= 0xFF
    client.set(chunk, bytes(data))  # one flipped bit in Redis
    with pytest.raises(ResultRefused, match="(?i)sha256|integrity|hash"):
        c.collect_result(job, {"files": refs, "report": []})

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14 + b"abcd"
    )  # hashes fine, holds nothing
    refs = _upload(c.files, {**parts, "adapter": junk}, "junk")
    with pytest.raises(ResultRefused, match="not a valid safetensors"):
        c.collect_result(job, {"files": refs, "report": []})

    refs = _upload(c.files, {**parts, "compare": junk}, "png")
    with pytest.raises(ResultRefused, match="not a PNG"):
        c.collect_result(job, {"files": refs, "report": []})

    good = _upload(c.files, parts, "good")
    for hostile in ("../x", "/etc/passwd", "a/b"):
        report = [{"name": hostile, "ref": good["render"]}]
        with pytest.raises(ResultRefused, match="plain file name"):
            c.collect_result(job, {"files": good, "report": report})
    assert not (tmp_path / "x").exists() and not (tmp_path / "assets" / "loras").exists()


def test_a_result_may_carry_samples_in_its_one_subfolder(tmp_path, redis_server):
    from daemon.jobs import Job
    from daemon.remote.coordinator import ResultRefused

    c = _coordinator(tmp_path, redis_server.url)
    job = Job(id="j1", plan={})
    good = _upload(c.files, _result_parts(tmp_path))
    report = [{"name": "samples/0000040_1.png", "ref": good["render"]}]
    folder = c.collect_result(job, {"files": good, "report": report})
    assert (folder / "report" / "samples" / "0000040_1.png").is_file()
    for hostile in ("samples/../x", "samples/a/b", "other/x", "/samples/x"):
        with pytest.raises(ResultRefused, match="plain file name"):
            c.collect_result(job, {"files": good, "report": [{"name": hostile, "ref": good["render"]}]})


def test_a_refused_result_fails_the_job_and_publishes_nothing(cluster, redis_server, tmp_path):
    """End to end: the adapter is damaged on the worker after training (its upload then hashes
    fine, but it is no safetensors file any more): the coordinator refuses to publish it."""
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "rendered.hold").write_text("")
    w = make_worker(redis_server, "a", {"SCRIPTED_ENGINE_HOLD_DIR": str(holds)}).start()
    drop(d, "ohwx_tamper", ready="steps = 2\n")
    wait_for((holds / "rendered.reached").exists, 60, message="worker holding after its render")
    job_id = d.jobs()[0]["id"]
    (w.state / "work" / job_id / "adapter.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not a header....")
    (holds / "rendered.hold").unlink()
    wait_for(lambda: d.job_states().get("ohwx_tamper") == "failed", 90, message="job failed")
    error = d.jobs()[0]["error"]
    assert "was refused" in error and "not a valid safetensors" in error and "Nothing was published" in error
    assert d.log_has("job.artifact_refused", job_id=job_id)
    assert not list((d.assets / "loras").glob("*")) and not d.registry.exists()


def test_safetensors_problem_table():
    import struct as st

    from daemon.remote.coordinator import safetensors_problem

    def blob(header: dict, data: bytes) -> bytes:
        raw = json.dumps(header).encode()
        return st.pack("<Q", len(raw)) + raw + data

    good = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    cases = [
        (blob(good, b"\0" * 8), None),
        (blob(good, b"\0" * 4), "data section"),
        (blob({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "do not match"),
        (blob({"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad dtype"),
        (blob({"__metadata__": {}}, b""), "no tensors"),
        (b"\xff" * 4, "not a safetensors"),
    ]
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for i, (data, expected) in enumerate(cases):
            path = Path(folder) / f"{i}.safetensors"
            path.write_bytes(data)
            problem = safetensors_problem(path)
            assert (problem is None) if expected is None else (expected in (problem or "")), (i, problem)


def test_local_worker_is_the_default_with_a_redis_queue(cluster, redis_server):
    make_coordinator, _ = cluster
    d = make_coordinator(redis_server, local_worker=True).start()
    drop(d, "ohwx_local")
    wait_for(lambda: d.job_states().get("ohwx_local") == "done", 90, message="job done on the local worker")
    assert d.jobs()[0]["worker"] and published(d, "local") == ["local.safetensors"]
    assert d.log_has("worker.claimed") and (d.state / "worker" / "worker.id").is_file()


@pytest.mark.slow
def test_miniature_model_trains_on_a_remote_worker_and_is_published(cluster, redis_server):
    from daemon.publish import metadata_of, read_header

    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server, extra_env={"LORAD_ENGINE": "mflux", "LORAD_MODEL": "tiny-z-image"})
    d.env["LORAD_ENGINE"] = "mflux"
    d.start()
    make_worker(redis_server, "gpu", {"LORAD_ENGINE": "mflux", "LORAD_MODEL": "tiny-z-image", "LORAD_RAM_GB": "128",
                                       "LORAD_LEASE_TTL_S": "10"}).start()  # fmt: skip
    folder = make_dataset(d.training_data / "ohwx_alice", images=3)
    (folder / "READY").write_text("steps = 6\n")
    wait_for(
        lambda: d.job_states().get("ohwx_alice") in ("done", "failed"), 300, interval=0.5, message="job end"
    )
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    lora = d.assets / "loras" / "alice.safetensors"
    meta = metadata_of(lora)
    assert meta["lorad.job_id"] == job["id"] and meta["modelspec.trigger_phrase"] == "ohwx"
    assert meta["ss_network_dim"] == "16" and json.loads(meta["lorad.plan"])["engine"] == "mflux"
    header, _ = read_header(lora)
    assert any(k.endswith(".lora_A.weight") for k in header) and any(k.endswith(".alpha") for k in header)
    assert (d.assets / "loras" / "alice.compare.png").is_file() and (folder / "DONE").exists()
    # The final checkpoint reached the coordinator too (a lost result never means training again).
    assert list((d.state / "jobs" / job["id"] / "train" / "checkpoints").glob("*_checkpoint.zip"))


def test_password_url_works_and_the_secret_never_reaches_logs_status_or_markers(cluster, redis_factory):
    make_coordinator, make_worker = cluster
    redis = redis_factory(password="s3cret-pw")
    assert "s3cret-pw" in redis.url
    d = make_coordinator(redis).start()
    w = make_worker(redis, "a").start()
    folder = drop(d, "ohwx_secret")
    wait_for(lambda: d.job_states().get("ohwx_secret") == "done", 90, message="job done")
    seen = [d.cli("status", "--json", "--all").stdout, d.cli("status").stdout, d.cli("workers").stdout,
            d.cli("workers", "--json").stdout, (folder / "DONE").read_text()]  # fmt: skip
    for path in [*d.state.rglob("*.jsonl"), *w.state.rglob("*.jsonl"), *d.root.glob("*.out")]:
        seen.append(path.read_text(errors="replace"))
    assert all("s3cret-pw" not in text for text in seen)
    assert "***" in d.cli("workers").stdout and d.log_has("daemon.started")


def test_cancel_of_a_remote_job_stops_its_worker_and_publishes_nothing(cluster, redis_server, tmp_path):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    env, held = hold_env(tmp_path, "a", 3)
    w = make_worker(redis_server, "a", env).start()
    drop(d, "ohwx_stop", ready="steps = 8\n")
    wait_for(held.exists, 60, message="worker holding at step 3")
    job_id = d.jobs()[0]["id"]
    assert "on worker" in d.cli("status").stdout
    assert d.cli("cancel", job_id).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_stop") == "cancelled", 30, message="job cancelled")
    wait_for(lambda: w.log_has("worker.fenced_stop", job_id=job_id), 30, message="worker stopped the job")
    assert not list((d.assets / "loras").glob("*")) if (d.assets / "loras").exists() else True
    # The worker is free again: the next job runs on it.
    drop(d, "ohwx_next", ready="steps = 2\n", seed=2)
    wait_for(lambda: d.job_states().get("ohwx_next") == "done", 60, message="next job done")


@pytest.mark.slow
def test_miniature_model_resumes_on_another_worker_from_the_checkpoint_that_reached_the_coordinator(
    cluster, redis_server, tmp_path
):
    """mflux keeps absolute paths in its checkpoints: the next worker's state dir differs, so the
    checkpoint is relocated there (engines/mflux/checkpoints.py relocate) and training resumes."""
    make_coordinator, make_worker = cluster
    env = {"LORAD_ENGINE": "mflux", "LORAD_MODEL": "tiny-z-image", "LORAD_RAM_GB": "128", "LORAD_LEASE_TTL_S": "4",
           "LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY": "2"}  # fmt: skip
    d = make_coordinator(redis_server, extra_env=env)
    d.env["LORAD_ENGINE"] = "mflux"
    d.start()
    hold, held = hold_env(tmp_path, "a", 3)
    a = make_worker(redis_server, "a", {**env, **hold}).start()
    folder = make_dataset(d.training_data / "ohwx_move", images=3)
    (folder / "READY").write_text("steps = 6\n")
    wait_for(held.exists, 300, interval=0.5, message="worker a holding at step 3")
    wait_for(
        lambda: d.log_has("job.checkpoint_received", step=2), 60, message="checkpoint 2 at the coordinator"
    )
    a.kill9()
    b = make_worker(redis_server, "b", env).start()
    wait_for(
        lambda: d.job_states().get("ohwx_move") in ("done", "failed"), 300, interval=0.5, message="job end"
    )
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    # Worker b wrote its checkpoints in its own work dir (not in a's, which its kill left behind),
    # and the final one (step 6, not the resumed step 2) reached the coordinator.
    a_ckpts = sorted(p.name for p in (a.state / "work" / job["id"]).rglob("*_checkpoint.zip"))
    assert all(not name.startswith(("0000004", "0000006")) for name in a_ckpts), a_ckpts
    assert (d.state / "jobs" / job["id"] / "train" / "checkpoints" / "0000006_checkpoint.zip").is_file()
    assert b.log_has("train.checkpoint_relocated") and b.log_has("train.resume", step=2)
    assert published(d, "move") == ["move.safetensors"] and count_events(d, "job.done", job_id=job["id"]) == 1


def test_worker_stopped_gracefully_sends_its_stop_checkpoint_and_another_resumes_there(
    cluster, redis_server, tmp_path
):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    env, held = hold_env(tmp_path, "a", 3)
    a = make_worker(redis_server, "a", env).start()
    drop(d, "ohwx_term", ready="steps = 10\n")
    wait_for(held.exists, 60, message="worker a holding at step 3")
    job_id = d.jobs()[0]["id"]
    a.stop()  # SIGTERM: the child checkpoints at step 3 (not a multiple of 2), it travels, then `stopped`
    assert a.proc.returncode == 0
    wait_for(lambda: d.log_has("job.checkpoint_received", step=3), 30, message="the stop checkpoint arrived")
    wait_for(lambda: d.job_states().get("ohwx_term") == "interrupted", 30, message="job interrupted")
    b = make_worker(redis_server, "b").start()
    wait_for(lambda: d.job_states().get("ohwx_term") == "done", 60, message="job done on b")
    assert b.log_has("train.resume", step=3)
    # The row says done before the job.done line is in the log: wait for the line, then count.
    wait_for(lambda: count_events(d, "job.done", job_id=job_id) >= 1, 30, message="job.done logged")
    assert count_events(d, "job.done", job_id=job_id) == 1


def test_tls_queue_url_works_end_to_end(cluster, redis_factory):
    make_coordinator, make_worker = cluster
    redis = redis_factory(tls=True, password="tls-s3cret")
    assert redis.url.startswith("rediss://")
    d = make_coordinator(redis).start()
    make_worker(redis, "a").start()
    drop(d, "ohwx_tls", ready="steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_tls") == "done", 90, message="job done over TLS")
    assert published(d, "tls") == ["tls.safetensors"]


@pytest.mark.slow
def test_cloud_fallback_sends_a_job_no_worker_fits_to_the_cloud_engine(cluster, redis_server, tmp_path):
    """`cloud_fallback = true` with workers: the job every live worker declines goes to fal (against
    the local stand-in of the service) instead of waiting, and is published once."""
    from fal_standin import FalStandIn

    fal = FalStandIn(tmp_path / "fal")
    try:
        make_coordinator, make_worker = cluster
        d = make_coordinator(redis_server, extra_env={"LORAD_CLOUD_FALLBACK": "true"}).start()
        small = {"LORAD_RAM_GB": "8", "LORAD_ENGINES_SCRIPTED_NEEDS_GB": "64", "LORAD_ENGINES_FAL_POLL_S": "0.05",
                 **fal.env()}  # fmt: skip
        w = make_worker(redis_server, "small", small).start()
        drop(d, "ohwx_cloud", ready="steps = 20\n")
        wait_for(
            lambda: d.job_states().get("ohwx_cloud") in ("done", "failed"),
            300,
            message="fallback job finished",
        )
        job = d.jobs()[0]
        assert job["state"] == "done", job["error"]
        assert job["settings"]["engine"] == "fal" and job["settings"]["fallback_from"] == "scripted"
        assert (
            d.log_has("job.cloud_fallback", job_id=job["id"], to_engine="fal") and len(fal.submissions) == 1
        )
        assert w.log_has("worker.claimed", job_id=job["id"])
        assert (d.assets / "loras" / "cloud.safetensors").is_file()
    finally:
        fal.close()


def test_a_job_waiting_for_the_captioner_is_refused_by_the_coordinator_saying_why(cluster, redis_server):
    """missing_captions = "vlm" captions in the embedded pipeline only: a coordinator fails such a
    job with the reason instead of sending uncaptioned images to a worker."""
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    make_worker(redis_server, "a").start()
    folder = make_dataset(d.training_data / "ohwx_alice", images=2)
    (folder / "img_001.txt").unlink()
    (folder / "lora.toml").write_text('missing_captions = "vlm"\ncaption_model = "tiny-vlm"\n')
    (folder / "READY").touch()
    wait_for(lambda: d.job_states().get("ohwx_alice") == "failed", 90, message="job refused")
    assert (
        "several machines" in d.jobs()[0]["error"] and 'missing_captions = "trigger"' in d.jobs()[0]["error"]
    )
