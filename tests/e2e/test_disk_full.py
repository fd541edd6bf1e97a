"""Issue 12 item 6: a full disk never strands a job.

Small tmpfs filesystems (we run as root; see test_faults R5) stand in for a full dataset disk and
a full state disk. Each case must end visibly (status row, marker where it can be written, a log
line with the free bytes) and be retryable without restarting the daemon.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import wait_for

from daemon import space
from daemon.sample import make_dataset

MiB = 1 << 20


# -- pure: the estimates and the classification --------------------------------------------------


@pytest.mark.parametrize(
    "phase, kwargs, low, high",
    [
        ("intake", {"dataset_bytes": 0}, 4 * MiB, 4 * MiB),
        ("intake", {"dataset_bytes": 300 * MiB}, 304 * MiB, 304 * MiB),
        ("train", {"engine_bytes": 0}, 16 * MiB, 16 * MiB),
        ("train", {"engine_bytes": 1500 * MiB}, 1516 * MiB, 1516 * MiB),
    ],
)
def test_space_needed(phase, kwargs, low, high):
    assert low <= space.space_needed(phase, **kwargs) <= high


@pytest.mark.parametrize(
    "model, rank, written, low, high",
    [
        # z-image-turbo rank 16: a 140 MB fp32 adapter, 420 MB checkpoints, three at once.
        ("z-image-turbo", 16, 0, 1400 * MiB, 1700 * MiB),
        ("z-image-turbo", 32, 0, 2800 * MiB, 3400 * MiB),
        ("unknown-model", 16, 0, 1400 * MiB, 1700 * MiB),
        ("tiny-z-image", 16, 0, 4 * MiB, 6 * MiB),
        # A resumed job already holds most of its checkpoints: it is not asked for them again.
        ("z-image-turbo", 16, 1000 * MiB, 400 * MiB, 700 * MiB),
        ("tiny-z-image", 16, 10**12, 0, 0),
    ],
)
def test_mflux_training_bytes(model, rank, written, low, high):
    from engines.mflux import disk

    assert low <= disk.training_bytes(disk.params_per_rank(model), rank, written) <= high


def test_space_problem_names_the_numbers_and_the_disk():
    assert space.space_problem("training", Path("/s/jobs/x"), 100, 100, "run: lorad retry x") is None
    text = space.space_problem("training", Path("/s/jobs/x"), 3 * MiB, 512 * 1024, "run: lorad retry x")
    assert "3.0 MB needed, 512 KB free on the disk holding /s/jobs/x" in text and "lorad retry x" in text


@pytest.mark.parametrize(
    "exc, full",
    [
        (sqlite3.OperationalError("database or disk is full"), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (sqlite3.OperationalError("database is locked"), False),
        (RuntimeError("wrapped"), False),
    ],
)
def test_is_disk_full(exc, full):
    assert space.is_disk_full(exc) is full


def test_reserve_is_created_only_with_room_and_released(tmp_path):
    assert space.ensure_reserve(tmp_path, size=4096)
    assert (tmp_path / space.RESERVE_FILE).stat().st_size == 4096
    assert space.release_reserve(tmp_path) == 4096 and space.release_reserve(tmp_path) == 0
    assert not space.ensure_reserve(tmp_path, size=10**15)  # never fills a disk to make a reserve
    assert not (tmp_path / space.RESERVE_FILE).exists()


# -- through the daemon on small filesystems -------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")


def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the disk holding `folder` until only `leave` bytes are free (0: to the last byte)."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            room = shutil.disk_usage(folder).free - leave
            if room <= 0:
                break
            os.write(fd, b"\0" * min(room, MiB))
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_dataset_disk_full_marker_failure_does_not_stop_the_job(mounts, daemon_factory):
    d = daemon_factory()
    _mount_tmpfs(d.training_data, "1m")
    mounts.append(d.training_data)
    folder = make_dataset(d.training_data / "ohwx_full", images=1)
    _fill(d.training_data)
    d.start()
    (folder / "READY").write_text("")  # an empty file needs no blocks
    wait_for(
        lambda: d.job_states().get("ohwx_full") == "done", 60, message="the job runs although QUEUED failed"
    )
    failed = [e for e in d.events() if e["event"] == "marker.write_failed"]
    assert failed and failed[0]["path"] == str(folder / "QUEUED") and failed[0]["errno"] == errno.ENOSPC
    assert (d.assets / "loras" / "full.safetensors").is_file()


def _state_on_tmpfs(mounts, daemon_factory, tmp_path, size: str = "48m", **env):
    state = tmp_path / "state"
    _mount_tmpfs(state, size)
    mounts.append(state)
    d = daemon_factory(extra_env={"LORAD_STATE_DIR": str(state), **env})
    d.state = state
    return d


def test_state_disk_full_mid_training_fails_visibly_then_retry(mounts, daemon_factory, tmp_path):
    d = _state_on_tmpfs(mounts, daemon_factory, tmp_path, SCRIPTED_ENGINE_STEP_S="0.2")
    d.start()
    assert (d.state / space.RESERVE_FILE).is_file()
    folder = make_dataset(d.training_data / "ohwx_mid", images=1)
    (folder / "READY").write_text("steps = 40\n")
    wait_for(lambda: any((j["step"] or 0) >= 3 for j in d.jobs()), 60, message="training")
    filler = _fill(d.state)
    wait_for(lambda: d.jobs()[0]["state"] == "failed", 60, message="the job fails instead of looking alive")
    job = d.jobs()[0]
    assert "full" in job["error"] and f"lorad retry {job['id']}" in job["error"]
    assert "full" in (folder / "FAILED.txt").read_text() and not (folder / "TRAINING").exists()
    lines = [e for e in d.events() if e["event"] == "job.disk_full"]
    assert len(lines) == 1 and lines[0]["free_bytes"] < 1 << 20 and lines[0]["path"].startswith(str(d.state))
    filler.unlink()
    assert d.cli("retry", job["id"]).returncode == 0  # no restart
    wait_for(lambda: d.jobs()[0]["state"] == "done", 90, message="retry succeeds once space is back")


def test_intake_refused_early_when_the_snapshot_cannot_fit(mounts, daemon_factory, tmp_path):
    d = _state_on_tmpfs(mounts, daemon_factory, tmp_path)
    d.start()
    filler = _fill(d.state, leave=2 * MiB)  # below the intake margin
    folder = make_dataset(d.training_data / "ohwx_tight", images=1)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_tight") == "failed", 60, message="refused")
    job = d.jobs()[0]
    assert "not enough free space for the dataset's snapshot" in job["error"] and "needed" in job["error"]
    assert str(d.state / "jobs") in job["error"] and "free on the disk" in (folder / "FAILED.txt").read_text()
    assert not (folder / "READY").exists() and not list((d.state / "jobs").glob(".intake-*"))
    assert d.log_has("space.refused", phase="intake")
    filler.unlink()
    (folder / "READY").write_text("")  # the next READY works, no restart
    wait_for(lambda: d.job_states().get("ohwx_tight") == "done", 60, message="done once space is back")


def test_training_refused_early_then_retry(mounts, daemon_factory, tmp_path):
    d = _state_on_tmpfs(mounts, daemon_factory, tmp_path)
    d.start()
    filler = _fill(d.state, leave=10 * MiB)  # room for the snapshot, not for training's estimate
    folder = make_dataset(d.training_data / "ohwx_train", images=1)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_train") == "failed", 60, message="refused before training")
    job = d.jobs()[0]
    assert "not enough free space for training" in job["error"] and f"lorad retry {job['id']}" in job["error"]
    assert job["step"] is None  # it never started training
    assert d.log_has("space.refused", phase="train")
    filler.unlink()
    assert d.cli("retry", job["id"]).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_train") == "done", 60, message="retry succeeds")


def test_a_marker_that_cannot_be_written_never_breaks_a_transition(tmp_path):
    from daemon.jobs import JobStore

    folder = tmp_path / "ohwx_a"
    (folder / "QUEUED").mkdir(parents=True)  # the marker's path cannot take a file: OSError on write
    store = JobStore(tmp_path / "jobs.db")
    job = store.create(
        job_id="j1",
        dataset_path=folder,
        name="a",
        trigger="ohwx",
        fingerprint="fp",
        ready_token=None,
        settings={},
    )
    assert store.get(job.id).state == "queued"  # created (and enqueued by intake) although QUEUED failed
    assert store.transition(job.id, "preparing").state == "preparing"
    assert (folder / "TRAINING").is_file()


# -- FAILED.txt's footer says what fixes this kind of failure (issue 19) -------------------------


@pytest.mark.parametrize(
    "error, refused, kind",
    [
        ("image.corrupt: a.png cannot be decoded", True, "dataset"),
        ("intake stopped: no space left on the disk holding /s/jobs", True, "dataset"),
        ("the job's snapshot is missing (/s/jobs/j); drop READY again", False, "redrop"),
        (
            "/l/alice.safetensors is published, but its registry entry in /c.json was not written",
            False,
            "retry",
        ),
        (
            "the disk holding /s is full (1 MB free): OSError. Free some space there, then run: lorad retry j",
            False,
            "retry",
        ),
        ("internal error: RuntimeError: boom", False, "retry"),
        ("test render failed: out of memory", False, "retry"),
    ],
)
def test_failure_kind(error, refused, kind):
    from daemon.intake import markers

    assert markers.failure_kind(error, refused_at_intake=refused) == kind


@pytest.mark.parametrize(
    "kind, says, never",
    [
        (
            "retry",
            ["lorad retry J1", "resumes from its last checkpoint", "only gets its registry entry"],
            ["READY"],
        ),
        (
            "dataset",
            ["fix the files above", "create READY in this folder again", "from scratch", ".v<N>"],
            ["lorad retry"],
        ),  # fmt: skip
        (
            "redrop",
            ["create READY in this folder again", "from scratch", ".v<N>"],
            ["fix the files", "run: lorad retry"],
        ),
    ],
)
def test_failed_footer_matches_the_kind(kind, says, never):
    from daemon.intake import markers

    footer = "\n".join(markers.failed_footer(kind, "J1"))
    for text in says:
        assert text in footer, (kind, text)
    for text in never:
        assert text not in footer, (kind, text)


def test_registry_disk_full_after_publish_says_lorad_retry(mounts, daemon_factory, tmp_path):
    """The LoRA is published, the registry's disk is full: FAILED.txt says `lorad retry` (which
    writes only the registry entry), not "create READY again" (a retrain that orphans it as .v1)."""
    regdir = tmp_path / "regdisk"
    _mount_tmpfs(regdir, "1m")
    mounts.append(regdir)
    d = daemon_factory(extra_env={"LORAD_REGISTRY": str(regdir / "config.json")})
    filler = _fill(regdir)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_reg", images=1)
    (folder / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_reg") == "failed", 60, message="fails on the registry write")
    job = d.jobs()[0]
    assert "is published" in job["error"] and (d.assets / "loras" / "reg.safetensors").is_file()
    text = (folder / "FAILED.txt").read_text()
    assert f"lorad retry {job['id']}" in text and "create READY" not in text, text
    filler.unlink()
    assert d.cli("retry", job["id"]).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_reg") == "done", 60, message="retry writes the registry entry")
    assert json.loads((regdir / "config.json").read_text())["loras"]["reg"]["job_id"] == job["id"]
    assert not list((d.assets / "loras").glob("reg.v*"))  # not retrained, nothing orphaned
    assert d.log_has("job.registry_only", job_id=job["id"])
