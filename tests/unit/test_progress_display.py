"""The progress display: status error lines (whole words, the rest counted), the ETA counting down
from the last report and only while training, the selftest line before the first step, and the plan
warning naming the planned resolution."""

from __future__ import annotations

import pytest

from daemon.jobs import Job

NOW = 1_800_000_000.0


def _job(**fields) -> Job:
    columns = dict(
        id="20260101-000000-abcd",
        seq=1,
        dataset="ohwx_alice",
        dataset_path="/tmp/ohwx_alice",
        name="alice",
        state="training",
        step=None,
        total_steps=None,
        eta_s=None,
        loss=None,
        error=None,
        created_at=NOW - 100,
        updated_at=NOW,
        started_at=NOW - 90,
        finished_at=None,
        settings="{}",
        outputs="{}",
        plan="{}",
    )
    columns.update(fields)
    return Job(**columns)


def _status_lines(jobs: list[Job], now: float = NOW) -> list[str]:
    from daemon.status import render_status

    return render_status(jobs, show_all=True, as_json=False, daemon_pid=None, now=now).splitlines()


SIX_ERRORS = [
    f"ERROR: img_{i}.png: the image is 120x90 px, smaller than the 256 px minimum on its short side "
    f"-> use a larger photo or remove img_{i}.png from the folder"
    for i in range(6)
]


def test_status_error_keeps_whole_words_and_counts_the_rest():
    job = _job(state="failed", error="\n".join(SIX_ERRORS), finished_at=NOW)
    lines = _status_lines([job])
    shown = " ".join(line.strip() for line in lines[2:])
    assert "(+5 more: lorad status --json or FAILED.txt)" in shown
    first = shown.split("error: ", 1)[1].split("(+5 more")[0].replace("…", " ")
    words = set(SIX_ERRORS[0].split())
    assert all(word in words for word in first.split()), first
    assert "img_1.png" not in shown  # the rest are counted, not printed half


def test_status_single_short_error_printed_whole():
    job = _job(state="failed", error="training process exited with code 1", finished_at=NOW)
    lines = _status_lines([job])
    assert lines[-1].strip() == "error: training process exited with code 1"
    assert "more:" not in "\n".join(lines)


def test_status_eta_counts_down_from_the_last_report():
    # The engine reported 100 s left, 60 s ago (a long step since): status says ~40 s, not 1m40s.
    job = _job(step=16, total_steps=80, eta_s=100.0, updated_at=NOW - 60)
    row = _status_lines([job])[2]
    assert " 40s " in row, row


def test_status_eta_shown_for_training_not_for_rendering():
    training = _job(step=16, total_steps=80, eta_s=300.0)
    rendering = _job(id="20260101-000000-beef", state="rendering", step=80, total_steps=80, eta_s=0.0)
    lines = _status_lines([training, rendering])
    assert " 5m00s " in lines[2]
    assert " 0s " not in lines[3]  # the training ETA is no estimate of the render


def test_selftest_line_before_the_first_step():
    from daemon.selftest import progress_line

    assert progress_line(_job(state="preparing", step=None, total_steps=4)) == "  preparing step 0/4"
    assert progress_line(_job(state="training", step=3, total_steps=4)) == "  training step 3/4"
    assert progress_line(_job(state="queued")) == "  queued"


def test_plan_warning_names_the_planned_resolution():
    from engines.mflux.memory_plan import plan_memory

    tiny = plan_memory(model="tiny-z-image", total_gb=16, available_gb=12, image_count=3, max_side=256)
    assert tiny.max_resolution == 64
    assert tiny.warnings and all("512" not in w for w in tiny.warnings), tiny.warnings
    assert any("64 px" in w for w in tiny.warnings)
    # A 24 GB machine stepped down for lack of free memory: no "16 GB is the floor".
    turbo = plan_memory(model="z-image-turbo", total_gb=24, available_gb=12, image_count=10, max_side=1024)
    assert turbo.tier == "q4-minimal"
    assert all("16 GB is the floor" not in w for w in turbo.warnings), turbo.warnings
    assert any(f"{turbo.max_resolution} px" in w for w in turbo.warnings)
    lowered = plan_memory(
        model="z-image-turbo", total_gb=16, available_gb=14, image_count=10, max_side=1024, resolution=384
    )
    assert any("384 px" in w for w in lowered.warnings) and all("512 px" not in w for w in lowered.warnings)


@pytest.fixture
def dataset(tmp_path):
    from daemon.sample import make_dataset

    return make_dataset(tmp_path / "assets" / "training_data" / "ohwx_alice", images=3)
