"""Job ids at intake: an id is its second plus 16 random bits, so datasets made READY together can
draw the same one. The real Intake with its SQLite job store; the id source is scripted to repeat."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.intake.take import Intake
from daemon.jobs import JobStore
from daemon.sample import make_dataset
from daemon.settings import Settings
from daemon.states import JobState

SAME = "20261203-133519-1516"


def _intake(tmp_path: Path, monkeypatch, ids: list[str]) -> tuple[Settings, JobStore, Intake, list]:
    settings = Settings(assets=tmp_path / "assets", engine="scripted", model="tiny-z-image")
    settings.training_data.mkdir(parents=True)
    store = JobStore(settings.jobs_db)
    queued: list = []
    draws = iter(ids)
    monkeypatch.setattr("daemon.intake.take.new_job_id", lambda: next(draws))
    return settings, store, Intake(settings, store, lambda *args: queued.append(args)), queued


def _ready(settings: Settings, name: str, seed: int) -> Path:
    folder = make_dataset(settings.training_data / name, images=1, size=256, seed=seed)
    (folder / "READY").write_text("steps = 1\n")
    return folder


def test_two_datasets_that_draw_the_same_id_are_both_queued(tmp_path, monkeypatch):
    settings, store, intake, queued = _intake(tmp_path, monkeypatch, [SAME, SAME, "20261203-133519-5eec"])
    first = intake.take(_ready(settings, "ohwx_r04", 4))
    second = intake.take(_ready(settings, "ohwx_r14", 14))
    assert (first.status, second.status) == ("queued", "queued"), second.detail
    assert first.job_id == SAME and second.job_id == "20261203-133519-5eec"
    assert [args[0] for args in queued] == [SAME, "20261203-133519-5eec"]
    assert {j.state for j in store.list()} == {JobState.QUEUED}
    assert (settings.jobs_dir / second.job_id / "data").is_dir()
    assert not (settings.training_data / "ohwx_r14" / "FAILED.txt").exists()


def test_an_id_left_by_a_snapshot_being_built_is_not_drawn_again(tmp_path, monkeypatch):
    settings, store, intake, _queued = _intake(tmp_path, monkeypatch, [SAME, "20261203-133519-0001"])
    (settings.jobs_dir / f".intake-{SAME}").mkdir(parents=True)
    outcome = intake.take(_ready(settings, "ohwx_a", 1))
    assert outcome.status == "queued" and outcome.job_id == "20261203-133519-0001"


def test_a_refused_dataset_that_draws_a_taken_id_is_still_recorded(tmp_path, monkeypatch):
    settings, store, intake, _queued = _intake(tmp_path, monkeypatch, [SAME, SAME, "20261203-133519-0002"])
    intake.take(_ready(settings, "ohwx_ok", 1))
    bad = settings.training_data / "ohwx_empty"
    bad.mkdir()
    (bad / "READY").write_text("")
    outcome = intake.take(bad)
    assert outcome.status == "invalid" and outcome.job_id == "20261203-133519-0002"
    assert store.get(outcome.job_id).state is JobState.FAILED


def test_endless_collisions_are_an_error_not_a_hang(tmp_path, monkeypatch):
    settings, store, intake, _queued = _intake(tmp_path, monkeypatch, [SAME] * 200)
    intake.take(_ready(settings, "ohwx_ok", 1))
    with pytest.raises(RuntimeError, match="no unused job id"):
        intake._fresh_job_id()
