"""The real daemon (watcher, huey, jobs table, child processes) with the scripted engine.

The scripted engine is a real child process with mflux's checkpoint layout and the same
stop/resume protocol, so these tests run many jobs quickly; test_engine_mflux.py runs the
same paths with real mflux training on the miniature model.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time

import pytest
from conftest import hold_training_at, wait_for, wait_held

from daemon.sample import make_dataset


def drop(d, name: str, *, images: int = 2, ready: str = "", seed: int = 0):
    folder = make_dataset(d.training_data / name, images=images, seed=seed)
    (folder / "READY").write_text(ready)
    return folder


def states(d):
    return d.job_states()


def test_ready_to_done_with_markers_and_outputs(daemon_factory):
    d = daemon_factory().start()
    folder = drop(d, "ohwx_alice")
    wait_for(lambda: states(d).get("ohwx_alice") == "done", 60, message="job done")
    assert not (folder / "READY").exists()
    assert {p.name for p in folder.iterdir()} >= {"DONE"}
    assert not {"QUEUED", "TRAINING", "FAILED.txt"} & {p.name for p in folder.iterdir()}
    done = (folder / "DONE").read_text()
    assert "alice.safetensors" in done and "alice.compare.png" in done
    for suffix in (".safetensors", ".png", ".compare.png"):
        assert (d.assets / "loras" / f"alice{suffix}").is_file()
    events = [
        e["event"] for e in d.events() if e.get("dataset") == "ohwx_alice" and e["event"].startswith("job.")
    ]
    assert events[0] == "job.queued" and "job.started" in events and events[-1] == "job.done"


def test_burst_of_20_makes_20_jobs_in_order(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.01"}).start()
    names = [f"ohwx_b{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        make_dataset(d.training_data / name, images=1, seed=i)
    for name in names:
        (d.training_data / name / "READY").write_text("steps = 2\n")
        (d.training_data / name / "READY").touch()  # a burst of events per folder
    wait_for(lambda: len([s for s in states(d).values() if s == "done"]) == 20, 180, message="20 jobs done")
    jobs = d.jobs()
    assert [j["dataset"] for j in jobs] == names  # each once, in READY order
    started = [e["dataset"] for e in d.events() if e["event"] == "job.started"]
    assert started == names
    assert len(json.loads(d.registry.read_text())["loras"]) == 20


def test_ready_dropped_while_down_is_found_at_start(daemon_factory):
    d = daemon_factory()
    drop(d, "ohwx_early")
    d.start()
    wait_for(lambda: states(d).get("ohwx_early") == "done", 60, message="early job done")


def test_kill_9_while_training_then_restart_completes_exactly_once(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.3"})
    held = hold_training_at(d, 3)
    d.start()
    folder = drop(d, "ohwx_crash", ready="steps = 12\n")
    wait_held(held, 60)
    d.kill9()
    # The orphaned trainer notices its parent is gone, checkpoints and exits by itself.
    wait_for(lambda: not _workers(d), 30, message="orphan worker exit")
    assert d.jobs()[0]["state"] == "training"  # what the table said when the daemon died
    d.start()
    wait_for(lambda: states(d).get("ohwx_crash") == "done", 60, message="job done after restart")
    jobs = d.jobs()
    assert len(jobs) == 1
    assert d.log_has("job.interrupted") and d.log_has("job.resumed")
    assert [p.name for p in (d.assets / "loras").glob("crash*.safetensors")] == ["crash.safetensors"]
    assert list(json.loads(d.registry.read_text())["loras"]) == ["crash"]
    assert not list(d.state.rglob("*.tmp")) and not list((d.assets / "loras").glob(".*"))
    assert (folder / "DONE").exists()


def _workers(d) -> list[str]:
    import subprocess

    return subprocess.run(
        ["pgrep", "-f", f"--job-dir {d.state}"], capture_output=True, text=True
    ).stdout.split()


def test_sigterm_interrupts_then_resumes_from_checkpoint(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.25"})
    held = hold_training_at(d, 5)
    d.start()
    drop(d, "ohwx_term", ready="steps = 16\n")
    wait_held(held, 60)
    sent = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert time.monotonic() - sent < 30
    job = d.jobs()[0]
    assert job["state"] == "interrupted"
    stopped_at = job["step"]
    assert stopped_at == 5
    assert not _workers(d)
    d.start()
    wait_for(lambda: states(d).get("ohwx_term") == "done", 60, message="resumed job done")
    assert d.log_has("job.resumed")
    # Work lost on stop: the checkpoint written at the stop is the step the job had reached,
    # and the resumed run starts from it.
    resumes = [e for e in d.events() if e["event"] == "train.resume" and e.get("job_id") == job["id"]]
    assert resumes and resumes[-1]["step"] == stopped_at


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of another process (Linux tgkill(2)): the kernel is free to pick
    any thread for a kill(2), and this picks the case that bit."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:  # SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="tgkill's syscall number is x86_64 Linux's",
)
def test_sigterm_delivered_to_another_thread_stops_the_idle_daemon(daemon_factory):
    """A SIGTERM the kernel hands to one of the daemon's other threads (huey's, the watcher's, the
    intake loop's) still stops it promptly. CPython runs the handler only in the main thread, once
    that thread runs again; the main thread used to sit in one Event.wait of the rescan interval
    (180 s), and CI once saw a stop ignored for the test's whole 60 s."""
    d = daemon_factory().start()
    wait_for(lambda: d.log_has("daemon.started"), 30, message="daemon started")
    pid = d.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the daemon runs other threads"
    _tgkill(pid, others[0], signal.SIGTERM)
    assert d.wait(30) == 0  # the rescan interval is 180 s: without the fix, no stop before then
    assert d.log_has("daemon.stopping", signal="SIGTERM")


def test_second_daemon_is_refused(daemon_factory):
    d = daemon_factory().start()
    second = d.cli("run", timeout=30)
    assert second.returncode != 0
    assert f"pid {d.proc.pid}" in second.stderr and "already running" in second.stderr


def test_cancel_queued_and_running_then_retry(daemon_factory):
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.3"}).start()
    first = drop(d, "ohwx_run", ready="steps = 40\n")
    wait_for(lambda: states(d).get("ohwx_run") == "training", 60, message="first training")
    second = drop(d, "ohwx_wait", seed=1)
    wait_for(lambda: states(d).get("ohwx_wait") == "queued", 30, message="second queued")
    ids = {j["dataset"]: j["id"] for j in d.jobs()}
    assert d.cli("cancel", ids["ohwx_wait"]).returncode == 0
    assert states(d)["ohwx_wait"] == "cancelled" and (second / "CANCELLED").exists()
    assert d.cli("cancel", ids["ohwx_run"][:-1]).returncode == 0  # a unique prefix works too
    wait_for(lambda: states(d).get("ohwx_run") == "cancelled", 30, message="running job cancelled")
    assert (first / "CANCELLED").exists()
    wait_for(lambda: not _workers(d), 30, message="trainer stopped")
    result = d.cli("retry", ids["ohwx_wait"])
    assert result.returncode == 0, result.stderr
    wait_for(lambda: states(d).get("ohwx_wait") == "done", 60, message="retried job done")
    job = next(j for j in d.jobs() if j["dataset"] == "ohwx_wait")
    assert job["attempt"] == 2
    assert d.cli("retry", ids["ohwx_wait"]).returncode == 2  # done jobs are not retried


def test_invalid_dataset_fails_visibly_and_daemon_keeps_running(daemon_factory):
    d = daemon_factory().start()
    bad = d.training_data / "ohwx_bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "a.txt").write_text("ohwx, x")
    (bad / "READY").write_text("")
    # Intake records the refusal (FAILED.txt) before it consumes READY (a crash in between must
    # not lose the drop): wait for both, not for the first.
    wait_for(lambda: (bad / "FAILED.txt").exists() and not (bad / "READY").exists(), 30,
             message="FAILED.txt written and READY consumed")  # fmt: skip
    text = (bad / "FAILED.txt").read_text()
    assert "a.png" in text and "not an image" in text and "READY" in text
    assert (bad / "a.png").read_bytes() == b"not an image"
    assert d.log_has("dataset.invalid")
    refused = d.jobs()[0]
    assert refused["state"] == "failed" and "a.png" in refused["error"]  # lorad status shows it
    retry = d.cli("retry", refused["id"])
    assert retry.returncode == 2 and "create READY again" in retry.stderr
    drop(d, "ohwx_fine")
    wait_for(lambda: states(d).get("ohwx_fine") == "done", 60, message="next job still runs")


def test_unchanged_dataset_is_not_retrained_unless_forced(daemon_factory):
    d = daemon_factory().start()
    folder = drop(d, "ohwx_same")
    wait_for(lambda: states(d).get("ohwx_same") == "done", 60, message="first run")
    (folder / "READY").write_text("")
    wait_for(lambda: d.log_has("dataset.unchanged"), 30, message="unchanged")
    assert len(d.jobs()) == 1 and (folder / "DONE").exists() and not (folder / "READY").exists()
    (folder / "READY").write_text("force = true\n")
    wait_for(lambda: len([j for j in d.jobs() if j["state"] == "done"]) == 2, 60, message="forced rerun")


def test_status_works_without_daemon(daemon_factory):
    d = daemon_factory()
    result = d.cli("status")
    assert result.returncode == 0 and "not running" in result.stdout


def test_enqueue_writes_ready_with_overrides(daemon_factory):
    d = daemon_factory()
    folder = make_dataset(d.training_data / "ohwx_enq", images=1)
    result = d.cli("enqueue", str(folder), "--rank", "8", "--steps", "3", "--force")
    assert result.returncode == 0, result.stderr
    text = (folder / "READY").read_text()
    assert "rank = 8" in text and "steps = 3" in text and "force = true" in text
    d.start()
    wait_for(lambda: states(d).get("ohwx_enq") == "done", 60, message="enqueued job")
    assert d.jobs()[0]["total_steps"] == 3


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(daemon_factory):
    from engines.mflux import checkpoints

    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_STEP_S": "0.25"})
    held = hold_training_at(d, 7)
    d.start()
    drop(d, "ohwx_ckpt", ready="steps = 20\n")
    wait_held(held, 60)
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    job = d.jobs()[0]
    ckpt_dir = d.state / "jobs" / job["id"] / "train" / "checkpoints"
    newest, previous = checkpoints.list_checkpoints(ckpt_dir)[:2]
    newest.write_bytes(newest.read_bytes()[:-100])  # as if the stop's save was cut short
    d.start()
    wait_for(lambda: states(d).get("ohwx_ckpt") == "done", 60, message="done from the previous checkpoint")
    assert d.log_has("train.checkpoint_corrupt", checkpoint=newest.name)
    assert d.log_has("train.resume", step=checkpoints.step_of(previous))
    assert (newest.with_name(newest.name + ".corrupt")).exists()  # set aside, not deleted


# -- issue 12 item 13: markers that tell the truth ---------------------------------------------


def test_unchanged_redrop_names_the_current_path_of_the_versioned_lora(daemon_factory):
    from daemon.publish import metadata_of

    d = daemon_factory().start()
    first = drop(d, "ohwx_alice")
    wait_for(lambda: states(d).get("ohwx_alice") == "done", 60, message="first alice")
    drop(d, "ohwx_alice2", ready='name = "alice"\n', seed=1)  # other images, same LoRA name
    wait_for(lambda: states(d).get("ohwx_alice2") == "done", 60, message="second alice")
    ids = {j["dataset"]: j["id"] for j in d.jobs()}
    loras = d.assets / "loras"
    assert metadata_of(loras / "alice.v1.safetensors")["lorad.job_id"] == ids["ohwx_alice"]
    (first / "READY").write_text("")
    wait_for(
        lambda: not (first / "READY").exists() and d.log_has("dataset.unchanged"), 30, message="unchanged"
    )
    done = (first / "DONE").read_text()
    assert done.startswith(f"job {ids['ohwx_alice']} ")
    assert f"unchanged, already trained by job {ids['ohwx_alice']}" in done
    assert f"lora: {loras / 'alice.v1.safetensors'}" in done
    assert str(loras / "alice.safetensors") not in done  # that file is the second job's now
    assert len(d.jobs()) == 2


def test_folder_renamed_mid_training_gets_its_final_marker(daemon_factory, tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "trained.hold").touch()
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_HOLD_DIR": str(hold)}).start()
    folder = drop(d, "ohwx_old")
    wait_for(lambda: (hold / "trained.reached").exists(), 60, message="held in training")
    job_id = (hold / "trained.reached").read_text()
    renamed = folder.rename(d.training_data / "ohwx_new")  # the user renames it; TRAINING moves along
    assert (renamed / "TRAINING").exists()
    (hold / "trained.hold").unlink()
    # The marker is written before the old one is removed (a folder never has none): wait for both.
    wait_for(
        lambda: (renamed / "DONE").exists() and not (renamed / "TRAINING").exists(),
        60,
        message="DONE, and no TRAINING, in the renamed folder",
    )
    assert (renamed / "DONE").read_text().startswith(f"job {job_id} ")
    assert not folder.exists()  # no marker recreates the old folder
    job = d.jobs()[0]
    assert job["state"] == "done" and job["dataset_path"] == str(renamed) and job["dataset"] == "ohwx_new"
    assert d.log_has("job.dataset_moved", job_id=job_id)


def test_same_images_under_another_name_are_trained(daemon_factory):
    import shutil

    d = daemon_factory().start()
    first = drop(d, "ohwx_alice")
    wait_for(lambda: states(d).get("ohwx_alice") == "done", 60, message="alice")
    copy = d.training_data / "ohwx_bob"
    shutil.copytree(first, copy, ignore=shutil.ignore_patterns("DONE", "READY"))
    (copy / "READY").write_text("")
    wait_for(lambda: states(d).get("ohwx_bob") == "done", 60, message="bob trained")
    assert (d.assets / "loras" / "bob.safetensors").is_file()
    assert not d.log_has("dataset.unchanged")
