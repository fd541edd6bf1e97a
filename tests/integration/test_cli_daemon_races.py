"""Races between the daemon and the CLI, and between CLIs (issue 12, items 11 and 12).

Every race is arranged, not hoped for: the scripted engine pauses at a phase boundary while a
hold file exists (SCRIPTED_ENGINE_HOLD_DIR), the registry lock holds a job in `publishing`, and
CLI processes wait at a barrier file right after they read the job, so they all act on the
same (stale) view at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from daemon.jobs import JobStore, new_job_id
from daemon.sample import make_dataset

FINISHED = ("done", "failed", "cancelled")

# A `lorad` CLI that stops right after it has looked the job up (its view of the state is then
# fixed) and goes on only when the barrier file appears: N of them act on the same view at once.
GATED_CLI = """
import os, sys, time, pathlib
from daemon import cli, commands
barrier = pathlib.Path(sys.argv[1])
real = commands._find_job
def gated(store, ref):
    job = real(store, ref)
    (barrier.parent / f"arrived-{os.getpid()}").touch()
    while not barrier.exists():
        time.sleep(0.005)
    return job
commands._find_job = gated
sys.exit(cli.main(sys.argv[2:]))
"""


def gated_cli(d, barrier: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", GATED_CLI, str(barrier), *args],
        cwd=d.root,
        env=d.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def arrived(barrier: Path) -> int:
    return len(list(barrier.parent.glob("arrived-*")))


def drop(d, name: str, *, ready: str = "", seed: int = 0) -> Path:
    folder = make_dataset(d.training_data / name, images=1, seed=seed)
    (folder / "READY").write_text(ready)
    return folder


def nothing_published(d, name: str) -> bool:
    loras = d.assets / "loras"
    files = list(loras.glob(f"{name}*")) if loras.exists() else []
    entries = json.loads(d.registry.read_text()).get("loras", {}) if d.registry.exists() else {}
    return not files and name not in entries


def held(tmp_path: Path, *phases: str) -> Path:
    hold = tmp_path / "hold"
    hold.mkdir(exist_ok=True)
    for phase in phases:
        (hold / f"{phase}.hold").touch()
    return hold


def reached(hold: Path, phase: str) -> str | None:
    path = hold / f"{phase}.reached"
    return path.read_text() if path.exists() else None


# -- item 12: concurrent CLIs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "command, start_state, final_state, message",
    [
        ("retry", "failed", "queued", "already queued again"),
        ("cancel", "queued", "cancelled", "already cancelled"),
    ],
)
def test_six_concurrent_clis_one_wins_the_others_say_why(
    daemon_factory, tmp_path, command, start_state, final_state, message
):
    d = daemon_factory()  # no daemon: the CLIs race each other on the jobs table
    folder = make_dataset(d.training_data / "ohwx_race", images=1)
    store = JobStore(d.state / "jobs.db")
    job = store.create(
        job_id=new_job_id(), dataset_path=folder, name="race", trigger="ohwx", fingerprint="fp",
        ready_token=None, settings={},
    )  # fmt: skip
    if start_state == "failed":
        store.transition(job.id, "failed", error="boom")
    store.close()
    barrier = tmp_path / "barrier" / "go"
    barrier.parent.mkdir()
    procs = [gated_cli(d, barrier, command, job.id) for _ in range(6)]
    wait_for(lambda: arrived(barrier) == 6, 120, message="six CLIs at the barrier")
    barrier.touch()
    results = [(p.wait(60), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    assert len(losers) == 5
    for _code, out, err in results:
        assert "Traceback" not in out + err
    for _code, out, err in losers:
        assert message in out + err, (out, err)
    store = JobStore(d.state / "jobs.db")
    final = store.get(job.id)
    assert final.state == final_state
    if command == "retry":
        assert final.attempt == 2


# -- item 12: cancel at every phase boundary ---------------------------------------------------


@pytest.mark.parametrize(
    "phase, state", [("plan", "preparing"), ("trained", "training"), ("rendered", "rendering")]
)
def test_cancel_at_a_phase_boundary_ends_cancelled_and_publishes_nothing(
    daemon_factory, tmp_path, phase, state
):
    hold = held(tmp_path, phase)
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_HOLD_DIR": str(hold)}).start()
    folder = drop(d, "ohwx_cx")
    wait_for(lambda: reached(hold, phase), 60, message=f"job held at {phase}")
    job_id = reached(hold, phase)
    assert d.job_states()["ohwx_cx"] == state
    result = d.cli("cancel", job_id)
    assert result.returncode == 0, result.stderr
    (hold / f"{phase}.hold").unlink()  # go
    wait_for(lambda: d.job_states().get("ohwx_cx") in FINISHED, 60, message="job finished")
    assert d.job_states()["ohwx_cx"] == "cancelled"
    assert (folder / "CANCELLED").exists() and not (folder / "DONE").exists()
    assert nothing_published(d, "cx")
    assert not d.log_has("job.crashed")


def test_cancel_racing_queued_to_preparing_is_honoured(daemon_factory, tmp_path):
    """The CLI reads the job while it is queued; the daemon starts it before the CLI acts."""
    hold = held(tmp_path, "trained")
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_HOLD_DIR": str(hold)}).start()
    drop(d, "ohwx_first")
    wait_for(lambda: reached(hold, "trained"), 60, message="first job held in training")
    drop(d, "ohwx_second", seed=1)
    wait_for(lambda: d.job_states().get("ohwx_second") == "queued", 30, message="second queued")
    second = next(j["id"] for j in d.jobs() if j["dataset"] == "ohwx_second")
    (hold / "plan.hold").touch()
    barrier = tmp_path / "barrier" / "go"
    barrier.parent.mkdir()
    cancel = gated_cli(d, barrier, "cancel", second)
    wait_for(lambda: arrived(barrier) == 1, 60, message="cancel read the queued job")
    (hold / "trained.hold").unlink()  # the first job finishes; the second starts and is held in preparing
    wait_for(lambda: reached(hold, "plan") == second, 60, message="second job preparing")
    barrier.touch()
    code, out, err = cancel.wait(60), *cancel.communicate()
    assert code == 0 and "Traceback" not in out + err, (out, err)
    (hold / "plan.hold").unlink()
    wait_for(lambda: d.job_states().get("ohwx_second") in FINISHED, 60, message="second finished")
    assert d.job_states() == {"ohwx_first": "done", "ohwx_second": "cancelled"}
    assert nothing_published(d, "second")
    assert not d.log_has("job.crashed")


def test_cancel_while_publishing_is_too_late_and_says_so(daemon_factory):
    d = daemon_factory().start()
    lock_path = d.registry.with_name(d.registry.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another registry writer holds the job in publishing
    try:
        drop(d, "ohwx_late")
        wait_for(lambda: d.job_states().get("ohwx_late") == "publishing", 60, message="publishing")
        job_id = d.jobs()[0]["id"]
        result = d.cli("cancel", job_id)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert result.returncode != 0
    assert "too late" in result.stdout + result.stderr and "Traceback" not in result.stderr
    wait_for(lambda: d.job_states().get("ohwx_late") == "done", 60, message="published")
    assert (d.assets / "loras" / "late.safetensors").is_file()


# -- item 11: the same dataset dropped again while it is queued or training ---------------------


def test_same_dataset_dropped_again_while_queued_or_training_is_not_queued_twice(daemon_factory, tmp_path):
    hold = held(tmp_path, "trained")
    d = daemon_factory(extra_env={"SCRIPTED_ENGINE_HOLD_DIR": str(hold)}).start()
    first = drop(d, "ohwx_one")
    wait_for(lambda: reached(hold, "trained"), 60, message="first job held in training")
    second = drop(d, "ohwx_two", seed=1)
    wait_for(lambda: d.job_states().get("ohwx_two") == "queued", 30, message="second queued")
    ids = {j["dataset"]: j["id"] for j in d.jobs()}
    for folder in (second, first):  # the queued one, then the training one
        (folder / "READY").write_text("")
        wait_for(lambda: not (folder / "READY").exists(), 30, message=f"{folder.name} READY taken")
    assert len(d.jobs()) == 2
    for name, marker in (("ohwx_one", "TRAINING"), ("ohwx_two", "QUEUED")):
        assert d.log_has("dataset.already_queued", job_id=ids[name])
        assert (d.training_data / name / marker).read_text().startswith(f"job {ids[name]} ")
    (hold / "trained.hold").unlink()
    wait_for(lambda: set(d.job_states().values()) == {"done"}, 60, message="both done")
    assert len(d.jobs()) == 2
    assert [e["dataset"] for e in d.events() if e["event"] == "job.started"] == ["ohwx_one", "ohwx_two"]
