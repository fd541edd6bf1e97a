"""P11 dashboard queue page: 500 jobs in the table, the page rendered in <= 300 ms server time.

The dashboard runs as `lorad run` serves it (uvicorn in a thread, daemon/ui/server.py) and is
asked over real HTTP; the server time is the app's own `Server-Timing: app;dur=` (request in to
response start: the jobs query, the rows, the template). Median of N after one warm-up request
(template compile). Baseline in the same run: `lorad status --all`'s rendering of the same 500
jobs (render_status over store.list(), in process).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine, median, result

from daemon.jobs import JobStore
from daemon.settings import resolve
from daemon.status import render_status
from daemon.ui.server import UIServer


class _Log:
    def __getattr__(self, _level):
        return lambda *_a, **_k: None


def seed(state_store: JobStore, training_data: Path, count: int) -> None:
    """`count` jobs: most done, some failed/cancelled, a few queued, one training."""
    state_store.conn.execute("PRAGMA synchronous=OFF")  # seeding speed only
    for i in range(count):
        job = state_store.create(
            job_id=f"20260101-000000-{i:04x}",
            dataset_path=training_data / f"ohwx_{i}",
            name=f"n{i}",
            trigger="ohwx",
            fingerprint=f"fp{i}",
            ready_token=None,
            settings={"engine": "mflux", "warnings": []},
            marker=False,
        )
        if i >= count - 10:
            continue  # queued
        final = "training" if i == count - 11 else ("failed" if i % 17 == 0 else "done")
        for name in ("preparing", "training") + (
            () if final == "training" else ("rendering", "publishing") if final == "done" else ()
        ):
            state_store.transition(job.id, name)
        if final == "training":
            state_store.update(job.id, step=120, total_steps=1000, loss=0.31, eta_s=3600)
        else:
            state_store.transition(
                job.id, final, **({"error": "test render failed: out of memory"} if final == "failed" else {})
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    from daemon import logs

    logs.configure(console=False)
    root = Path(tempfile.mkdtemp(prefix="lorad-p11-"))
    settings = resolve(env={"LORAD_ASSETS": str(root / "assets"), "LORAD_REGISTRY": str(root / "config.json"),
                            "LORAD_UI": "127.0.0.1:0"})  # fmt: skip
    settings.training_data.mkdir(parents=True)
    store = JobStore(settings.jobs_db, write_markers=False)
    seed(store, settings.training_data, args.jobs)
    server = UIServer(settings, threading.Event(), _Log())
    assert server.start()
    while server.server is None or not server.server.started:
        time.sleep(0.05)
    port = server.server.servers[0].sockets[0].getsockname()[1]

    def ask() -> tuple[float, float, int]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start = time.perf_counter()
        conn.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        response = conn.getresponse()
        body = response.read()
        wall = time.perf_counter() - start
        timing = response.getheader("server-timing") or ""
        conn.close()
        assert response.status == 200 and body.count(b"<tr data-id=") == args.jobs, "every job on the page"
        return float(timing.split("dur=")[1]), wall * 1000, len(body)

    ask()  # warm-up: template compile
    server_ms, wall_ms, size = [], [], 0
    baseline_ms = []
    for _ in range(args.runs):
        app, wall, size = ask()
        server_ms.append(app)
        wall_ms.append(wall)
        start = time.perf_counter()
        render_status(store.list(), show_all=True, as_json=False, daemon_pid=None, now=time.time())
        baseline_ms.append((time.perf_counter() - start) * 1000)
    server.stop()
    print(f"machine: {machine()}")
    print(
        f"queue page, {args.jobs} jobs, {size} bytes: server median {median(server_ms):.1f} ms (wall {median(wall_ms):.1f} ms); "
        f"lorad status --all rendering the same jobs: {median(baseline_ms):.1f} ms; {args.runs} runs each"
    )
    result("P11-ui-queue", median(server_ms), "ms", median(baseline_ms), "<=300", median(server_ms) <= 300)


if __name__ == "__main__":
    sys.exit(main())
