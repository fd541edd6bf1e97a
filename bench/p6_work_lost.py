"""P6 work lost on stop: SIGTERM mid-training on `tiny-z-image` with a large checkpoint interval.

With `checkpoint_every = 1000` mflux would only save at the end, so without lorad's stop
checkpoint a stop at step N redoes N steps (the baseline printed). lorad turns SIGTERM into
mflux's StopTrainingException, which saves at the step reached. Steps redone = the step the
worker stopped at minus the step the resumed run starts from. Target <= 1.
"""

from __future__ import annotations

import re
import signal

from _common import Daemon, result

from daemon.sample import make_dataset


def main() -> None:
    d = Daemon(
        LORAD_ENGINE="mflux",
        LORAD_MODEL="tiny-z-image",
        LORAD_RAM_GB="128",
        LORAD_ENGINES_MFLUX_CHECKPOINT_EVERY="1000",
    ).start()
    folder = make_dataset(d.training_data / "ohwx_stop", images=2)
    (folder / "READY").write_text("steps = 30\n")
    try:
        d.wait_for(lambda: any((j["step"] or 0) >= 8 for j in d.jobs()), 600, 0.05)
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(120)
        job = d.jobs()[0]
        log = (d.state / "jobs" / job["id"] / "train.log").read_text()
        stopped_at = int(re.search(r"stopped at step (\d+)/", log).group(1))
        d.start()
        d.wait_for(lambda: d.jobs()[0]["state"] == "done", 600, 0.5)
        resume = [e for e in d.events() if e["event"] == "train.resume"][-1]["step"]
    finally:
        d.stop()
    lost = stopped_at - resume
    print(
        f"daemon exit code {code}; worker stopped at step {stopped_at}, resumed from checkpoint step {resume}"
    )
    result("P6-lost", lost, "steps", stopped_at, "<=1", lost <= 1)


if __name__ == "__main__":
    main()
