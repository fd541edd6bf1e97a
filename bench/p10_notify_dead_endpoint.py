"""P10 notifications off the job path: READY -> done with a notification target that hangs.

The target accepts the connection and never answers (`json://127.0.0.1:PORT/`, a listening socket
nobody reads; `notify_timeout_s = 600`, so the delivery is stuck for the whole run). Each job's
READY -> `job.done` time is measured with `notify_on = ["done", ...]` pointing at it, and, as the
baseline in the same run, on a daemon without `notify`. The scripted engine stands in for the
trainer (10 steps of 10 ms). Target: median ratio <= 1.2 (the job does not wait on delivery).
"""

from __future__ import annotations

import argparse
import socket
import threading

from _common import Daemon, machine, median, result, ts

from daemon.sample import make_dataset


def hanging_endpoint() -> tuple[socket.socket, list]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list = []

    def accept() -> None:
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock, held


def run(jobs: int, **env: str) -> list[float]:
    import time

    d = Daemon(LORAD_ENGINE="scripted", LORAD_MODEL="tiny-z-image", SCRIPTED_ENGINE_STEP_S="0.01", **env)
    for i in range(jobs):
        make_dataset(d.training_data / f"ohwx_n{i:02d}", images=1, seed=i)
    d.start()
    took = []
    try:
        for i in range(jobs):
            name = f"ohwx_n{i:02d}"
            t0 = time.time()
            (d.training_data / name / "READY").write_text("steps = 10\n")
            done = d.wait_for(
                lambda: [e for e in d.events() if e["event"] == "job.done" and e.get("dataset") == name],
                120,
                0.01,
            )
            took.append(ts(done[0]) - t0)
    finally:
        d.stop()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    sock, held = hanging_endpoint()
    try:
        hang = run(args.jobs, LORAD_NOTIFY=f"json://127.0.0.1:{sock.getsockname()[1]}/",
                   LORAD_NOTIFY_TIMEOUT_S="600")  # fmt: skip
        connections = len(held)
    finally:
        sock.close()
    plain = run(args.jobs)
    print(f"machine: {machine()}")
    print(f"hanging endpoint ({connections} connection(s) held, none answered): "
          + " ".join(f"{v * 1000:.0f}" for v in hang) + " ms")  # fmt: skip
    print("no notify: " + " ".join(f"{v * 1000:.0f}" for v in plain) + " ms")
    value, baseline = median(hang), median(plain)
    result(
        "P10", value * 1000, "ms", baseline * 1000, "ratio<=1.2", value / baseline <= 1.2 and connections > 0
    )


if __name__ == "__main__":
    main()
