"""The typed core (issue 21 item 2): `JobState` a StrEnum whose members are the stored strings,
`Job` a dataclass with a typed field per jobs-table column and no `__getattr__`."""

from __future__ import annotations

import dataclasses
import enum
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.jobs import MIGRATIONS, TRANSITIONS, Job, JobStore
from daemon.settings import SettingsError, resolve
from daemon.states import ACTIVE, FINISHED, RUNNABLE, JobState, moves_from

ROOT = Path(__file__).resolve().parents[2]


def test_job_state_is_a_str_enum_of_the_stored_strings():
    assert issubclass(JobState, enum.StrEnum)
    assert [s.value for s in JobState] == [
        "queued",
        "preparing",
        "training",
        "rendering",
        "publishing",
        "interrupted",
        "done",
        "failed",
        "cancelled",
    ]
    assert JobState.DONE == "done" and "done" in FINISHED and json.dumps(JobState.DONE) == '"done"'
    assert set(TRANSITIONS) == set(JobState) and all(isinstance(k, JobState) for k in TRANSITIONS)
    assert set(ACTIVE) | set(RUNNABLE) | set(FINISHED) == set(JobState)


@pytest.mark.parametrize(
    "old, expected",
    [
        ("queued", {"preparing", "publishing", "cancelled", "failed"}),
        ("done", set()),
        ("no-such-state", set()),
    ],
)
def test_moves_from_a_state(old, expected):
    assert moves_from(old) == expected


def test_notify_on_still_takes_the_state_strings():
    assert resolve(file_values={"notify_on": ["done", "failed"]}).notify_on == ("done", "failed")
    with pytest.raises(SettingsError, match="unknown job state 'finished'"):
        resolve(file_values={"notify_on": ["finished"]})


def _table_columns() -> list[str]:
    conn = sqlite3.connect(":memory:")
    for step in MIGRATIONS:
        conn.executescript(step)
    return [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]


def test_job_is_a_dataclass_with_a_field_per_column_and_no_getattr():
    assert dataclasses.is_dataclass(Job)
    assert "__getattr__" not in vars(Job)
    assert [f.name for f in dataclasses.fields(Job)] == _table_columns()


def test_json_columns_are_decoded_when_the_job_is_made():
    job = Job(
        id="j1", state="done", settings='{"warnings": ["w"]}', outputs='{"lora": "/x"}', plan={"rank": 4}
    )
    assert job.settings == {"warnings": ["w"]} and job.outputs == {"lora": "/x"} and job.plan == {"rank": 4}
    assert job.remote == {} and job.state is JobState.DONE


def test_a_json_column_that_is_not_an_object_is_refused_naming_it():
    with pytest.raises(ValueError, match="'outputs'"):
        Job(id="j1", outputs="[1, 2]")


def test_an_unknown_column_is_refused_naming_it():
    with pytest.raises(TypeError, match="colour"):
        Job.from_row({"id": "j1", "colour": "red"})


def test_to_dict_of_a_stored_job_has_every_column_with_plain_values(tmp_path):
    store = JobStore(tmp_path / "jobs.db", write_markers=False)
    store.create(
        job_id="j1",
        dataset_path=tmp_path / "alice",
        name="alice",
        trigger="ohwx",
        fingerprint="f",
        ready_token=None,
        settings={"model": "z-image-turbo"},
    )
    data = store.get("j1").to_dict()
    assert list(data) == _table_columns()
    assert type(data["state"]) is str and data["state"] == "queued"
    assert data["settings"] == {"model": "z-image-turbo"} and data["outputs"] == {} and data["remote"] == {}
    assert json.loads(json.dumps(data)) == data


def test_status_json_shows_the_state_strings(tmp_path):
    store = JobStore(tmp_path / ".lorad" / "jobs.db", write_markers=False)
    store.create(
        job_id="j1",
        dataset_path=tmp_path / "alice",
        name="alice",
        trigger="ohwx",
        fingerprint="f",
        ready_token=None,
        settings={},
    )
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), "status", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert [j["state"] for j in json.loads(out.stdout)["jobs"]] == ["queued"]
