"""P7 scale-out throughput: 8 scripted jobs through 2 `lorad worker`s vs through 1.

Makespan = first `job.queued` to last `job.done` in the coordinator's log, both runs in this
process on the same machine (a fresh redis-server, coordinator and workers each). The scripted
engine sleeps per step, so what is measured is lorad's dispatch, transfers, leases and publish
around the training time. Target: makespan(2 workers) / makespan(1 worker) <= 0.55.
"""

from __future__ import annotations

import argparse

from _common import machine, result, ts
from _remote import Redis, Worker, coordinator

from daemon.sample import make_dataset


def makespan(workers: int, jobs: int, steps: int, step_s: float) -> float:
    redis = Redis()
    d = coordinator(redis.url, LORAD_ENGINE="scripted", LORAD_MODEL="tiny-z-image")
    d.start()
    started = [Worker(d.root, str(i), redis.url, LORAD_ENGINE="scripted", SCRIPTED_ENGINE_STEP_S=str(step_s))
               for i in range(workers)]  # fmt: skip
    try:
        for i in range(jobs):
            folder = make_dataset(d.training_data / f"ohwx_p7_{i}", images=2, seed=i)
            (folder / "READY").write_text(f"steps = {steps}\n")

        def finished() -> bool:
            return sum(1 for e in d.events() if e["event"] == "job.done") >= jobs

        d.wait_for(finished, 600, interval=0.2)
        events = d.events()
        first = min(ts(e) for e in events if e["event"] == "job.queued")
        last = max(ts(e) for e in events if e["event"] == "job.done")
        return last - first
    finally:
        for w in started:
            w.stop()
        d.stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--step-s", type=float, default=0.25)
    args = parser.parse_args()
    one = makespan(1, args.jobs, args.steps, args.step_s)
    two = makespan(2, args.jobs, args.steps, args.step_s)
    print(
        f"{machine()}\n{args.jobs} jobs x {args.steps} steps x {args.step_s} s: 1 worker {one:.1f} s, 2 workers {two:.1f} s"
    )
    result("P7", two, "s", one, "<=0.55x", two / one <= 0.55)


if __name__ == "__main__":
    main()
