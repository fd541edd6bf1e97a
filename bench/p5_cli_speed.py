"""P5 CLI speed: `lorad status` wall time vs `python -c pass`, same interpreter, 50 jobs in the db.

Runs alternate (30 each) and medians are compared. Target: ratio <= 6 (issue 21; was 3). Bytecode caching is on
for the measured runs (PYTHONDONTWRITEBYTECODE removed, one warm-up run writes the .pyc files),
as on a user's machine; with it off every run recompiles lorad's modules from source.

Beside the venv's script it measures the README's own invocation, `uv run lorad status`, from the
project root (uv checks the lock and the venv first: that check is what it adds). It must not
byte-compile anything on a no-change run (issue 12 item 17: `compile-bytecode = true` made every
`uv run` recompile ~7000 files); `--uv-compile` measures that old behaviour for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, median, result
from p3_idle import seed_jobs


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def uv_compiles(cmd: list[str], env: dict) -> bool:
    """Does this no-change `uv run` byte-compile anything? (uv says so on stderr.)"""
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return "Bytecode compiled" in run.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--uv-compile",
        action="store_true",
        help="measure uv run with UV_COMPILE_BYTECODE=1 (the old setting)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorad-p5-"))
    state = root / "assets" / ".lorad"
    state.mkdir(parents=True)
    seed_jobs(state, 50)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("LORAD_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    lorad = str(Path(sys.executable).parent / "lorad")
    status = [lorad, "--assets", str(root / "assets"), "status", "--all"]
    bare = [sys.executable, "-c", "pass"]
    timed(status, env), timed(bare, env)  # warm caches (.pyc, page cache)
    ours, base = [], []
    for _ in range(args.runs):
        ours.append(timed(status, env))
        base.append(timed(bare, env))
    print(
        f"lorad status median {median(ours) * 1000:.1f} ms, python -c pass median {median(base) * 1000:.1f} ms"
    )
    ratio = median(ours) / median(base)
    result("P5-status", median(ours) * 1000, "ms", median(base) * 1000, "<=6x", ratio <= 6)

    uv = shutil.which("uv")
    if uv is None:
        print("uv is not on PATH: `uv run lorad status` not measured")
        return
    uv_env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "UV_COMPILE_BYTECODE")}
    if args.uv_compile:
        uv_env["UV_COMPILE_BYTECODE"] = "1"
    uv_status = [uv, "run", "lorad", "--assets", str(root / "assets"), "status", "--all"]
    timed(uv_status, uv_env, ROOT)  # the first run may sync
    compiles = uv_compiles(uv_status, uv_env)
    via_uv, script = [], []
    for _ in range(args.runs):
        via_uv.append(timed(uv_status, uv_env, ROOT))
        script.append(timed(status, env))
    print(
        f"uv run lorad status median {median(via_uv) * 1000:.1f} ms, venv script median {median(script) * 1000:.1f} ms; "
        f"a no-change uv run {'byte-compiles the venv' if compiles else 'compiles nothing'}"
    )
    result(
        "P5-uv-run-status", median(via_uv) * 1000, "ms", median(script) * 1000, "no recompile", not compiles
    )


if __name__ == "__main__":
    main()
