"""Child for ScriptedEngine: sleeps per step, writes mflux-layout checkpoints, resumes, renders.

`SCRIPTED_ENGINE_STEP_S` overrides the per-step time and `SCRIPTED_ENGINE_RENDER_S` adds a
render time (the fault tests use them to catch a job in a given phase).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zipfile
from pathlib import Path

from engines.process.pause_hook import hold_at_step
from engines.process.worker_common import Reporter, StopFlag, worker_main
from lorad_base import safetensors_file


def _adapter_bytes(step: int, rank: int) -> bytes:
    """A small LoRA adapter in the safetensors format, its values a function of `step` (a resumed
    run ends with the same bytes as an uninterrupted one). Without numpy: the scripted child starts
    hundreds of times in the test suite, and numpy alone cost 90 ms a start."""
    rng = random.Random(step)
    tensors = {
        "diffusion_model.layers.0.attention.to_q.lora_A.weight": (
            (rank, 64),
            [rng.gauss(0.0, 1.0) for _ in range(rank * 64)],
        ),
        "diffusion_model.layers.0.attention.to_q.lora_B.weight": ((64, rank), [float(step)] * (64 * rank)),
    }
    return safetensors_file.f32_file(tensors, {"mflux_version": "scripted", "model": "z-image"})


def _save_checkpoint(out: Path, step: int, config: dict) -> Path:
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    path = ckpt / f"{step:07d}_checkpoint.zip"
    files = {
        "config": f"{step:07d}_config.json",
        "optimizer": f"{step:07d}_optimizer.safetensors",
        "lora_adapter": f"{step:07d}_adapter.safetensors",
        "iterator": f"{step:07d}_iterator.json",
        "loss": f"{step:07d}_loss.json",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(files["config"], json.dumps(config))
        zf.writestr(files["optimizer"], b"opt")
        zf.writestr(files["lora_adapter"], _adapter_bytes(step, config.get("rank", 16)))
        zf.writestr(files["iterator"], json.dumps({"num_iterations": step}))
        zf.writestr(files["loss"], json.dumps({"step_loss": []}))
        zf.writestr("checkpoint.json", json.dumps({"files": files}))
        zf.writestr("run.json", json.dumps({"version": 1, "data_root": config["data"]}))
    return path


def _dump_env_names(mode: str) -> None:
    """Test hook: with SCRIPTED_ENGINE_ENV_DUMP=<dir>, write the *names* in this child's
    environment (never the values) to <dir>/<mode>.json (tests/integration/test_child_secrets.py)."""
    folder = os.environ.get("SCRIPTED_ENGINE_ENV_DUMP")
    if folder:
        Path(folder, f"{mode}.json").write_text(json.dumps(sorted(os.environ)))


def train(args, reporter: Reporter, stop: StopFlag) -> int:
    _dump_env_names("train")
    plan = json.loads(Path(args.plan).read_text())
    config = plan["config"]
    out = Path(config["output_path"])
    total, every = int(config["total"]), int(config["save_frequency"])
    step_s = float(os.environ.get("SCRIPTED_ENGINE_STEP_S", config["step_s"]))
    start = 0
    if args.resume:
        with zipfile.ZipFile(args.resume) as zf:
            meta = json.loads(zf.read("checkpoint.json"))
            start = json.loads(zf.read(meta["files"]["iterator"]))["num_iterations"]
    reporter.emit("started", resume=args.resume, total=total)
    stop.training_started = True
    for step in range(start + 1, total + 1):
        time.sleep(step_s)
        reporter.step(step, total, loss=1.0 / step)
        hold_at_step(step, stop)  # tests only: stop exactly at a given step (engines/process/pause_hook.py)
        if step % every == 0 or step == total:
            path = _save_checkpoint(out, step, config)
            reporter.emit("checkpoint", step=step, path=str(path))
        if stop.is_set() and step < total:
            if step % every:
                path = _save_checkpoint(out, step, config)
                reporter.emit("checkpoint", step=step, path=str(path))
            reporter.emit("stopped", reason=stop.reason, step=step)
            return 0
    (out / "loss").mkdir(parents=True, exist_ok=True)
    (out / "loss" / "loss.html").write_text("<html>loss</html>")
    reporter.emit("done")
    return 0


def render(args, reporter: Reporter, stop: StopFlag) -> int:
    from PIL import Image

    from engines.process.compare import side_by_side

    _dump_env_names("render")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stop.training_started = True  # a stop while rendering is checked below, not raised
    deadline = time.monotonic() + float(os.environ.get("SCRIPTED_ENGINE_RENDER_S", "0"))
    while time.monotonic() < deadline:
        if stop.is_set():
            reporter.emit("stopped", reason=stop.reason)
            return 0
        time.sleep(0.05)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(out / "base.png")
    Image.new("RGB", (64, 64), (200, 60, 60)).save(out / "lora.png")
    side_by_side(out / "base.png", out / "lora.png", out / "compare.png", labels=("base", "with LoRA"))
    reporter.emit(
        "done", base=str(out / "base.png"), lora=str(out / "lora.png"), compare=str(out / "compare.png")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return worker_main("engines.scripted.worker", train, render, argv)


if __name__ == "__main__":
    sys.exit(main())
