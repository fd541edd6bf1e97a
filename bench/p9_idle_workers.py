"""P9 idle scale-out: a coordinator with 3 idle `lorad worker`s connected, over 60 s.

CPU seconds of each process (coordinator and workers) over the idle window, and the Redis
commands per second each idle worker costs (INFO commandstats before and after, all clients,
divided by the workers: the coordinator's own share counted against them). Targets: <= 0.5 CPU-s
per process, <= 5 commands/s per idle worker (no busy polling).
"""

from __future__ import annotations

import argparse
import time

import psutil
from _common import machine, result
from _remote import Redis, Worker, coordinator


def total_calls(client) -> int:
    return sum(int(v.get("calls", 0)) for k, v in client.info("commandstats").items())


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    redis = Redis()
    d = coordinator(redis.url, LORAD_ENGINE="scripted").start()
    workers = [Worker(d.root, str(i), redis.url, LORAD_ENGINE="scripted") for i in range(args.workers)]
    try:
        time.sleep(3)  # start-up done
        client = redis.client()
        pids = [d.proc.pid] + [w.proc.pid for w in workers]
        before = [cpu_s(p) for p in pids]
        calls_before = total_calls(client)
        time.sleep(args.idle)
        calls = total_calls(client) - calls_before - 2  # our own INFO calls
        used = [cpu_s(p) - b for p, b in zip(pids, before)]
    finally:
        for w in workers:
            w.stop()
        d.stop()
        redis.stop()
    per_worker = calls / args.idle / args.workers
    print(f"{machine()}\nidle {args.idle:.0f} s: CPU-s coordinator {used[0]:.3f}, workers "
          f"{', '.join(f'{u:.3f}' for u in used[1:])}; Redis {calls} commands = {per_worker:.2f}/s per worker")  # fmt: skip
    worst = max(used)
    result("P9-cpu", worst, "cpu-s", 0.5, "<=0.5", worst <= 0.5)
    result("P9-redis", per_worker, "cmd/s", 5.0, "<=5", per_worker <= 5)


if __name__ == "__main__":
    main()
