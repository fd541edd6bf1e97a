"""`lorad selftest`: the whole pipeline on the miniature model, in a temp assets folder.

It starts a real `lorad run` (watcher, queue, mflux training and rendering in child processes)
with `tiny-z-image`, drops READY into a generated dataset, waits for the job and prints where
the LoRA and the renders are. The miniature model needs no memory plan, so the selftest pins
the bf16 tier (quantized kernels are slow on a CPU); `lorad plan` shows this machine's real plan.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.sample import make_dataset
from daemon.states import FINISHED, JobState


def progress_line(job) -> str:
    """`  training step 3/4`: step 0 until the first step is reported (never `None/4`)."""
    return f"  {job.state}" + (f" step {job.step or 0}/{job.total_steps}" if job.total_steps else "")


def run_selftest(*, clean: bool = False, timeout_s: float = 300) -> int:
    root = Path(tempfile.mkdtemp(prefix="lorad-selftest-"))
    assets = root / "assets"
    folder = make_dataset(assets / "training_data" / "ohwx_selftest", images=3)
    (folder / "preview_1.txt").write_text("ohwx, portrait photo, studio light\n")
    # One image without a caption: the miniature captioner (random weights, nothing downloaded)
    # captions it in its child process before training, so the captioning path is checked too.
    (folder / "img_002.txt").unlink()
    (folder / "lora.toml").write_text('missing_captions = "vlm"\ncaption_model = "tiny-vlm"\n')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAD_")},
        "LORAD_ASSETS": str(assets),
        "LORAD_REGISTRY": str(root / "config.json"),
        "LORAD_MODEL": "tiny-z-image",
        "LORAD_ENGINE": "mflux",
        "LORAD_RAM_GB": "128",
        "MLX_DISABLE_COMPILE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    started = time.monotonic()
    print(f"selftest folder: {root}")
    log = (root / "daemon.out").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    from daemon.jobs import JobStore
    from daemon.settings import Settings

    settings = Settings(assets=assets, registry=root / "config.json", model="tiny-z-image")
    job = None
    try:
        (folder / "READY").write_text("")
        last = None
        while time.monotonic() - started < timeout_s:
            time.sleep(0.5)
            if daemon.poll() is not None:
                print(f"the daemon exited early with code {daemon.returncode}; see {root / 'daemon.out'}")
                return 1
            if not settings.jobs_db.exists():
                continue
            store = JobStore(settings.jobs_db, write_markers=False, check=False)
            jobs = store.list()
            store.close()
            if not jobs:
                continue
            job = jobs[0]
            line = progress_line(job)
            if line != last:
                print(f"{time.monotonic() - started:5.1f}s{line}", flush=True)
                last = line
            if job.state in FINISHED:
                break
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        log.close()
    elapsed = time.monotonic() - started
    if job is None or job.state != JobState.DONE:
        reason = job.error if job else "no job was created"
        print(f"selftest FAILED after {elapsed:.0f}s: {reason}\nlogs: {settings.log_file}")
        return 1
    print(f"selftest passed in {elapsed:.0f}s")
    print(f"LoRA:        {job.outputs['lora']}")
    print(f"render:      {job.outputs['render']}")
    print(f"comparison:  {job.outputs['compare']}")
    print(f"registry:    {job.outputs['registry']}")
    if job.outputs.get("report"):
        print(f"captions:    {Path(job.outputs['report']) / 'captions.jsonl'}")
    if clean:
        shutil.rmtree(root, ignore_errors=True)
        print("(removed the selftest folder)")
    return 0
