"""P3 idle footprint: `lorad run` with 50 finished jobs in its db, idle for 60 s.

Peak RSS (VmHWM) and CPU seconds of the daemon process over the idle window, against a bare
`python -c "time.sleep(...)"` measured in the same run. Target: <= 80 MB and <= 0.5 CPU-s; the
daemon must be event-driven and must not import mlx/mflux.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import Daemon, result

from daemon.jobs import JobStore


def seed_jobs(state: Path, count: int) -> None:
    from daemon import logs

    logs.configure(console=False)  # the job events of the seeding are not the bench's output
    store = JobStore(state / "jobs.db", write_markers=False)
    for i in range(count):
        job = store.create(
            job_id=f"20260101-000000-{i:04x}",
            dataset_path=state.parent / "training_data" / f"ohwx_{i}",
            name=f"n{i}",
            trigger="ohwx",
            fingerprint=f"fp{i}",
            ready_token=None,
            settings={"engine": "mflux"},
        )
        for state_name in ("preparing", "training", "rendering", "publishing", "done"):
            store.transition(job.id, state_name)
    store.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 1024**2


def measure(pid: int, idle_s: float) -> tuple[float, float]:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(idle_s)
    after = proc.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    return peak_rss_mb(pid), cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument(
        "--ui", default="127.0.0.1:0", help="the dashboard's address (on by default, as in lorad); false: off"
    )
    args = parser.parse_args()
    d = Daemon(LORAD_ENGINE="mflux", LORAD_UI=args.ui)
    d.state.mkdir(parents=True, exist_ok=True)
    seed_jobs(d.state, 50)
    d.start()
    time.sleep(2)  # start-up done
    rss, cpu = measure(d.proc.pid, args.idle)
    modules = subprocess.run(
        ["grep", "-c", "mlx\\|mflux", f"/proc/{d.proc.pid}/maps"], capture_output=True, text=True
    ).stdout.strip()
    d.stop()
    bare = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({args.idle + 5})"])
    time.sleep(1)
    bare_rss, bare_cpu = measure(bare.pid, args.idle)
    bare.kill()
    print(f"dashboard: {args.ui}")
    print(
        f"daemon: peak RSS {rss:.1f} MB, {cpu:.3f} CPU-s in {args.idle:.0f}s idle; mlx/mflux mappings: {modules}"
    )
    print(f"bare python: peak RSS {bare_rss:.1f} MB, {bare_cpu:.3f} CPU-s")
    result("P3-rss", rss, "MB", bare_rss, "<=80", rss <= 80)
    result("P3-cpu", cpu, "cpu-s", max(bare_cpu, 0.001), "<=0.5", cpu <= 0.5)


if __name__ == "__main__":
    main()
