"""P1 pickup latency: READY dropped into an idle daemon -> the job's training child spawned.

20 drops into prepared one-image datasets, each after the daemon has been idle >= 5 s, with
lorad's wakeable worker and, as the baseline in the same run, huey's stock polling consumer
(`queue_wake = false`). The scripted engine stands in for the trainer: what is timed ends when
the child process is spawned. Target: median <= 150 ms, p95 <= 300 ms.
"""

from __future__ import annotations

import argparse
import time

from _common import Daemon, median, percentile, result, ts

from daemon.sample import make_dataset


def run(wake: bool, drops: int, idle_s: float) -> list[float]:
    d = Daemon(LORAD_ENGINE="scripted", LORAD_MODEL="tiny-z-image", LORAD_QUEUE_WAKE=str(wake).lower())
    for i in range(drops):
        make_dataset(d.training_data / f"ohwx_p{i:02d}", images=1, seed=i)
    d.start()
    latencies = []
    try:
        for i in range(drops):
            time.sleep(idle_s)
            name = f"ohwx_p{i:02d}"
            ready = d.training_data / name / "READY"
            t0 = time.time()
            ready.write_text("steps = 1\n")
            spawned = d.wait_for(
                lambda: [e for e in d.events() if e["event"] == "job.child" and e.get("dataset") == name],
                60,
                0.01,
            )
            latencies.append(ts(spawned[0]) - t0)
            d.wait_for(lambda: any(j["dataset"] == name and j["state"] == "done" for j in d.jobs()), 60)
    finally:
        d.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--idle", type=float, default=5.0)
    args = parser.parse_args()
    lorad = run(True, args.drops, args.idle)
    stock = run(False, args.drops, args.idle)
    for label, values in (("lorad", lorad), ("stock huey", stock)):
        print(f"{label}: " + " ".join(f"{v * 1000:.0f}" for v in values) + " ms")
    med, p95 = median(lorad) * 1000, percentile(lorad, 0.95) * 1000
    result("P1-median", med, "ms", median(stock) * 1000, "<=150", med <= 150)
    result("P1-p95", p95, "ms", percentile(stock, 0.95) * 1000, "<=300", p95 <= 300)


if __name__ == "__main__":
    main()
