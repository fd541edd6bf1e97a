"""P4 engine overhead: the training phase of a job through the daemon vs direct `mflux-train`.

Daemon side: from the job entering `training` to it leaving it (child spawn, mflux's whole run,
checkpoint pruning, adapter extraction), on `tiny-z-image`. Direct side: `mflux-train --config`
on the identical train.json the job used (fresh output folder), with the same miniature-model
patch, timed as a subprocess. Rounds alternate the two; medians are compared. Target <= 1.05.
A warm-up job runs first and is not counted: it writes the miniature model (a one-time set-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import ROOT, Daemon, median, result, ts

from daemon.sample import make_dataset

DIRECT = (
    "import sys\n"
    "from engines.mflux.tiny_model import install_patch\n"
    "install_patch(sys.argv[1])\n"
    "sys.argv = ['mflux-train', '--config', sys.argv[2]]\n"
    "from mflux.models.common.cli.train import main\n"
    "main()\n"
)


def phase_seconds(events: list[dict], job_id: str) -> float:
    start = next(e for e in events if e.get("job_id") == job_id and e.get("state") == "training")
    end = next(e for e in events if e.get("job_id") == job_id and e.get("state") == "rendering")
    return ts(end) - ts(start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    d = Daemon(LORAD_ENGINE="mflux", LORAD_MODEL="tiny-z-image", LORAD_RAM_GB="128").start()
    folder = make_dataset(d.training_data / "ohwx_bench", images=3)
    ours, direct = [], []
    try:
        (folder / "READY").write_text("steps = 1\n")  # warm-up: writes the miniature model once
        d.wait_for(lambda: len([j for j in d.jobs() if j["state"] == "done"]) == 1, 600, 0.5)
        for round_ in range(args.rounds):
            (folder / "READY").write_text(f"steps = {args.steps}\nforce = true\n")
            d.wait_for(lambda: len([j for j in d.jobs() if j["state"] == "done"]) == round_ + 2, 600, 0.5)
            job = d.jobs()[-1]
            ours.append(phase_seconds(d.events(), job["id"]))
            workdir = d.state / "jobs" / job["id"]
            config = json.loads((workdir / "train.json").read_text())
            config["checkpoint"]["output_path"] = str(d.root / f"direct-{round_}")
            config_path = d.root / f"direct-{round_}.json"
            config_path.write_text(json.dumps(config))
            start = time.monotonic()
            subprocess.run(
                [sys.executable, "-c", DIRECT, config["model_path"], str(config_path)],
                cwd=ROOT,
                env=d.env,
                check=True,
                capture_output=True,
            )
            direct.append(time.monotonic() - start)
            print(f"round {round_ + 1}: daemon {ours[-1]:.2f}s, direct {direct[-1]:.2f}s", flush=True)
    finally:
        d.stop()
    result("P4-overhead", median(ours), "s", median(direct), "<=1.05", median(ours) / median(direct) <= 1.05)


if __name__ == "__main__":
    main()
