"""The job states and the moves between them (pure; no I/O, nothing of lorad imported).

On the ground floor of the daemon (tests/unit/test_layers.py) so that settings (`notify_on`), the
jobs table, the pipeline and the dashboard all read one definition. `JobState` is a `StrEnum`:
a member is the very string stored in jobs.db, shown by `lorad status --json` and accepted by
`notify_on`, so `job.state == "done"` and `JobState.DONE == "done"` both hold.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    TRAINING = "training"
    RENDERING = "rendering"
    PUBLISHING = "publishing"
    INTERRUPTED = "interrupted"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.PREPARING, JobState.TRAINING, JobState.RENDERING, JobState.PUBLISHING)
RUNNABLE = (JobState.QUEUED, JobState.INTERRUPTED)
FINISHED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

# runnable/preparing -> publishing: "a verified result is already here" (a worker's result the
# coordinator verified, or a LoRA already published whose registry entry is missing): nothing is
# trained or rendered again, so the job does not walk through the phases that would.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(
        {JobState.PREPARING, JobState.PUBLISHING, JobState.CANCELLED, JobState.FAILED}
    ),
    JobState.PREPARING: frozenset(
        {JobState.TRAINING, JobState.PUBLISHING, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    ),
    JobState.TRAINING: frozenset(
        {JobState.RENDERING, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    ),
    JobState.RENDERING: frozenset(
        {JobState.PUBLISHING, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
    ),
    JobState.PUBLISHING: frozenset({JobState.DONE, JobState.FAILED, JobState.INTERRUPTED}),
    JobState.INTERRUPTED: frozenset(
        {JobState.PREPARING, JobState.PUBLISHING, JobState.CANCELLED, JobState.FAILED, JobState.QUEUED}
    ),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.DONE: frozenset(),
}


def moves_from(state: str) -> frozenset[JobState]:
    """The states a job in `state` may move to (none from an unknown state)."""
    try:
        return TRANSITIONS[JobState(state)]
    except ValueError:
        return frozenset()
