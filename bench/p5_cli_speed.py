"""P5 CLI speed: `lorad status` wall time vs `python -c pass`, same interpreter, 50 jobs in the db.

Runs alternate (30 each) and medians are compared. Target: ratio <= 3. Bytecode caching is on
for the measured runs (PYTHONDONTWRITEBYTECODE removed, one warm-up run writes the .pyc files),
as on a user's machine; with it off every run recompiles lorad's modules from source.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median, result
from p3_idle import seed_jobs


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorad-p5-"))
    state = root / "assets" / ".lorad"
    state.mkdir(parents=True)
    seed_jobs(state, 50)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAD_") and k != "PYTHONDONTWRITEBYTECODE"}
    lorad = str(Path(sys.executable).parent / "lorad")
    status = [lorad, "--assets", str(root / "assets"), "status", "--all"]
    bare = [sys.executable, "-c", "pass"]
    timed(status, env), timed(bare, env)  # warm caches (.pyc, page cache)
    ours, base = [], []
    for _ in range(args.runs):
        ours.append(timed(status, env))
        base.append(timed(bare, env))
    print(f"lorad status median {median(ours) * 1000:.1f} ms, python -c pass median {median(base) * 1000:.1f} ms")
    ratio = median(ours) / median(base)
    result("P5-status", median(ours) * 1000, "ms", median(base) * 1000, "<=3x", ratio <= 3)


if __name__ == "__main__":
    main()
