"""P8 remote overhead: one miniature-model job (`tiny-z-image`, engine mflux) through a remote
`lorad worker` on loopback vs the same job on the embedded local worker (`queue = "sqlite"`).

Job time = `job.queued` to `job.done` in the daemon's log. The local run goes first and also
warms the bytecode of the training child, then the remote run, then the local run again: the
baseline is the faster local run. Target: remote / local <= 1.15.
"""

from __future__ import annotations

import argparse

from _common import Daemon, machine, result, ts
from _remote import Redis, Worker, coordinator

from daemon.sample import make_dataset

ENV = {"LORAD_ENGINE": "mflux", "LORAD_MODEL": "tiny-z-image", "LORAD_RAM_GB": "128"}


def job_time(d: Daemon, steps: int) -> float:
    folder = make_dataset(d.training_data / "ohwx_p8", images=3, seed=8)
    (folder / "READY").write_text(f"steps = {steps}\n")
    d.wait_for(lambda: any(e["event"] in ("job.done", "job.failed") for e in d.events()), 900, interval=0.2)
    events = d.events()
    failed = [e for e in events if e["event"] == "job.failed"]
    if failed:
        raise SystemExit(f"P8: the job failed: {failed[0].get('error')}")
    queued = min(ts(e) for e in events if e["event"] == "job.queued")
    return max(ts(e) for e in events if e["event"] == "job.done") - queued


def local(steps: int) -> float:
    d = Daemon(**ENV).start()
    try:
        return job_time(d, steps)
    finally:
        d.stop()


def remote(steps: int) -> float:
    redis = Redis()
    d = coordinator(redis.url, **ENV).start()
    w = Worker(d.root, "p8", redis.url, **ENV)
    try:
        return job_time(d, steps)
    finally:
        w.stop()
        d.stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    first = local(args.steps)
    far = remote(args.steps)
    again = local(args.steps)
    base = min(first, again)
    print(
        f"{machine()}\ntiny-z-image, {args.steps} steps: local {first:.1f} s / {again:.1f} s, remote worker {far:.1f} s"
    )
    result("P8", far, "s", base, "<=1.15x", far / base <= 1.15)


if __name__ == "__main__":
    main()
