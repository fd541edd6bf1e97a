"""The job state machine: which transitions are legal, the event each one logs, when a requested
cancel is honoured and what a cancel does in each state. Table tests."""

from __future__ import annotations

import pytest

from daemon.jobs import TRANSITIONS, event_for, is_legal

STATES = list(TRANSITIONS)


LEGAL = {
    ("queued", "preparing"), ("queued", "cancelled"), ("queued", "failed"),
    ("preparing", "training"), ("preparing", "publishing"), ("preparing", "failed"), ("preparing", "cancelled"), ("preparing", "interrupted"),
    ("training", "rendering"), ("training", "failed"), ("training", "cancelled"), ("training", "interrupted"),
    ("rendering", "publishing"), ("rendering", "failed"), ("rendering", "cancelled"), ("rendering", "interrupted"),
    ("publishing", "done"), ("publishing", "failed"), ("publishing", "interrupted"),
    ("interrupted", "preparing"), ("interrupted", "cancelled"), ("interrupted", "failed"), ("interrupted", "queued"),
    ("failed", "queued"), ("cancelled", "queued"),
}  # fmt: skip


@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_transition_table(old, new):
    assert is_legal(old, new) == ((old, new) in LEGAL)


@pytest.mark.parametrize(
    "old, new, event",
    [
        ("queued", "preparing", "job.started"),
        ("interrupted", "preparing", "job.resumed"),
        ("training", "interrupted", "job.interrupted"),
        ("publishing", "done", "job.done"),
        ("training", "failed", "job.failed"),
        ("queued", "cancelled", "job.cancelled"),
        ("failed", "queued", "job.requeued"),
        ("preparing", "training", "job.phase"),
    ],
)
def test_event_names(old, new, event):
    assert event_for(old, new) == event


@pytest.mark.parametrize(
    "old, new, requested, expected",
    [
        ("queued", "preparing", False, "preparing"),
        ("queued", "preparing", True, "cancelled"),
        ("interrupted", "preparing", True, "cancelled"),
        ("preparing", "training", True, "cancelled"),
        ("training", "rendering", True, "cancelled"),
        ("rendering", "publishing", True, "cancelled"),
        ("rendering", "publishing", False, "publishing"),
        ("publishing", "done", True, "done"),  # too late: publishing finishes
        ("training", "failed", True, "failed"),
        (
            "training",
            "interrupted",
            True,
            "interrupted",
        ),  # a stop while cancelling: cancelled at the next start
    ],
)
def test_honour_cancel(old, new, requested, expected):
    from daemon.jobs import honour_cancel

    assert honour_cancel(old, new, requested) == expected


@pytest.mark.parametrize(
    "state, action",
    [
        ("queued", "cancel"), ("interrupted", "cancel"),
        ("preparing", "request"), ("training", "request"), ("rendering", "request"),
        ("publishing", "too_late"),
        ("done", "finished"), ("failed", "finished"), ("cancelled", "finished"),
    ],
)  # fmt: skip
def test_cancel_action(state, action):
    from daemon.jobs import cancel_action

    assert cancel_action(state) == action
