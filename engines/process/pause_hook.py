"""Test-only hook: hold a training child at a given step until a stop arrives.

Tests that stop or kill a training mid-way cannot race the trainer (an H100 finishes the
miniature model's ten steps before a SIGTERM lands; a loaded 2-core CPU is slow). They set, in
the daemon's environment (not LORAD_*: the daemon refuses unknown LORAD_ settings):

- `LORADTEST_HOLD_AT_STEP=N`: after step N the child holds before its step-boundary checks;
- `LORADTEST_HOLD_FILE=path`: where it then writes `{"pid": ..., "step": N}` (atomically), the
  test's cue to send its stop;
- `LORADTEST_HOLD_MAX_S` (default 120): the bound on the hold, after which it goes on.

The child holds until its stop flag is set (SIGTERM/SIGINT, or the daemon gone) or it is killed,
so the stop lands exactly at step N on any machine. It holds once per pause file: a child that
finds the file already there (a resumed or retried run passing step N again) goes on. Unset, as
in production, this is one dictionary lookup per step.
"""

from __future__ import annotations

import json
import os
import sys
import time

PAUSE_AT_STEP = "LORADTEST_HOLD_AT_STEP"
PAUSE_FILE = "LORADTEST_HOLD_FILE"
PAUSE_MAX_S = "LORADTEST_HOLD_MAX_S"


def hold_at_step(step: int, stop, env=os.environ) -> None:
    """If the test asked for a hold at `step`, announce it and wait for `stop` (bounded)."""
    wanted = env.get(PAUSE_AT_STEP)
    if wanted is None or int(wanted) != step or stop.is_set():
        return
    path = env.get(PAUSE_FILE)
    if not path or os.path.exists(path):
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"pid": os.getpid(), "step": step}, fh)
    os.replace(tmp, path)
    bound = float(env.get(PAUSE_MAX_S, "120"))
    print(f"lorad-worker: test hold at step {step} (at most {bound:.0f} s)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + bound
    while not stop.is_set():
        if time.monotonic() >= deadline:
            print(
                f"lorad-worker: test hold at step {step}: no stop within {bound:.0f} s, going on",
                file=sys.stderr,
                flush=True,
            )
            return
        time.sleep(0.02)  # a signal handler runs between sleeps and sets the flag
