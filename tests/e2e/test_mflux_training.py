"""Real mflux training on the miniature model through the real daemon, plus the pure parts.

The slow tests here each run mflux's training loop in a child process on `tiny-z-image`.
`LORAD_RAM_GB=128` picks the bf16 tier: quantized kernels are several times slower on the
Linux CPU, and one test covers the quantized tier explicitly.
"""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path

import pytest
from conftest import hold_training_at, wait_for, wait_held

from daemon.publish import metadata_of, read_header
from daemon.sample import make_dataset
from engines.mflux import checkpoints
from engines.mflux.memory_plan import TIERS, InsufficientMemory, plan_memory

# -- memory plan (pure) --------------------------------------------------------------------

PLAN_TABLE = [
    # model, total, available, images, max side, resolution -> tier, quantize, batch, low_ram, ckpt, max res
    ("z-image-turbo", 384, 320, 15, 1024, None, "bf16", None, 2, False, False, 1024),
    ("z-image-turbo", 256, 250, 40, 1024, None, "bf16", None, 1, False, False, 1024),
    ("z-image-turbo", 256, 250, 15, 2048, None, "bf16", None, 1, False, False, 1024),
    ("z-image-turbo", 256, 200, 15, 1024, None, "bf16", None, 1, False, False, 1024),  # batch 2 does not fit
    ("z-image-turbo", 128, 110, 15, 1024, None, "q8-checkpointed", 8, 1, False, True, 1024),
    ("z-image-turbo", 192, 155, 15, 1024, None, "q8", 8, 1, False, False, 1024),  # not enough free for bf16
    ("z-image-turbo", 64, 60, 15, 1024, None, "q8-checkpointed", 8, 1, False, True, 1024),
    ("z-image-turbo", 48, 40, 15, 1024, None, "q8-checkpointed", 8, 1, False, True, 1024),
    ("z-image-turbo", 36, 30, 15, 1024, None, "q8-checkpointed", 8, 1, False, True, 1024),
    ("z-image-turbo", 32, 20, 15, 1024, None, "q4-lowram", 4, 1, True, True, 768),
    ("z-image-turbo", 24, 20, 15, 1024, None, "q4-lowram", 4, 1, True, True, 768),
    ("z-image-turbo", 24, 20, 15, 1024, 512, "q4-lowram", 4, 1, True, True, 512),
    ("z-image-turbo", 24, 20, 15, 1024, 1024, "q4-lowram", 4, 1, True, True, 768),
    ("z-image-turbo", 16, 14, 15, 1024, None, "q4-minimal", 4, 1, True, True, 512),
    ("flux2-klein-9b", 256, 250, 10, 1024, None, "q8", 8, 1, False, False, 1024),  # never bf16
    ("flux2-klein-4b", 24, 9, 10, 1024, None, "q4-minimal", 4, 1, True, True, 512),
    (
        "flux2-klein-4b",
        24,
        13,
        10,
        1024,
        None,
        "q4-lowram",
        4,
        1,
        True,
        True,
        768,
    ),  # smaller model, smaller need
    ("tiny-z-image", 24, 20, 3, 256, None, "q4-lowram", 4, 1, True, True, 64),
    ("tiny-z-image", 128, 100, 3, 256, None, "bf16", None, 2, False, False, 64),
]


@pytest.mark.parametrize(
    "model, total, avail, n, side, res, tier, q, batch, low_ram, ckpt, max_res", PLAN_TABLE
)
def test_memory_plan_table(model, total, avail, n, side, res, tier, q, batch, low_ram, ckpt, max_res):
    plan = plan_memory(
        model=model, total_gb=total, available_gb=avail, image_count=n, max_side=side, resolution=res
    )
    assert (
        plan.tier,
        plan.quantize,
        plan.batch_size,
        plan.low_ram,
        plan.gradient_checkpointing,
        plan.max_resolution,
    ) == (tier, q, batch, low_ram, ckpt, max_res)
    assert plan.reason.startswith(tier)


def test_memory_plan_floor_and_warnings():
    with pytest.raises(InsufficientMemory, match="needs at least 11 GB free, have 6"):
        plan_memory(model="z-image-turbo", total_gb=16, available_gb=6, image_count=10, max_side=1024)
    with pytest.raises(InsufficientMemory, match="at least 16 GB of RAM"):
        plan_memory(model="z-image-turbo", total_gb=8, available_gb=8, image_count=10, max_side=1024)
    plan = plan_memory(model="z-image-turbo", total_gb=16, available_gb=15, image_count=10, max_side=1024)
    assert any("floor" in w for w in plan.warnings)
    plan = plan_memory(
        model="z-image-turbo", total_gb=24, available_gb=20, image_count=10, max_side=1024, resolution=1024
    )
    assert any("lowered to 768" in w for w in plan.warnings)


def test_step_down_goes_one_tier_lower_then_stops():
    names = [t.name for t in TIERS]
    for upper, lower in zip(names, names[1:]):
        plan = plan_memory(
            model="z-image-turbo",
            total_gb=256,
            available_gb=256,
            image_count=10,
            max_side=1024,
            start_below=upper,
        )
        assert plan.tier == lower
    with pytest.raises(InsufficientMemory):
        plan_memory(
            model="z-image-turbo",
            total_gb=256,
            available_gb=256,
            image_count=10,
            max_side=1024,
            start_below=names[-1],
        )


def test_plan_cli_prints_the_plan(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--assets",
            str(tmp_path),
            "plan",
            "--images",
            "20",
            "--ram-gb",
            "24",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "q4-lowram" in result.stdout and "quantize     4" in result.stdout and "768" in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--assets",
            str(tmp_path),
            "plan",
            "--images",
            "20",
            "--ram-gb",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "16 GB" in result.stderr


# -- checkpoints (pure-ish) ----------------------------------------------------------------


def _fake_ckpt(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{step:07d}_checkpoint.zip"
    files = {k: f"{step:07d}_{k}.bin" for k in ("lora_adapter", "optimizer", "iterator", "config", "loss")}
    with zipfile.ZipFile(path, "w") as zf:
        for name in files.values():
            zf.writestr(name, os.urandom(2048))
        zf.writestr("checkpoint.json", json.dumps({"files": files}))
        zf.writestr("run.json", "{}")
    return path


def test_corrupt_newest_checkpoint_falls_back_and_prune_keeps_two(tmp_path):
    for step in (2, 4, 6):
        _fake_ckpt(tmp_path, step)
    newest = tmp_path / "0000006_checkpoint.zip"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    good, skipped = checkpoints.newest_good(tmp_path)
    assert good.name == "0000004_checkpoint.zip" and skipped[0][0] == newest
    assert checkpoints.prune(tmp_path) == []  # the newest is not verified: prune nothing
    _fake_ckpt(tmp_path, 8)
    assert [p.name for p in checkpoints.prune(tmp_path)] == [
        "0000004_checkpoint.zip",
        "0000002_checkpoint.zip",
    ]
    flipped = _fake_ckpt(tmp_path, 10)
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF  # a CRC error inside a member
    flipped.write_bytes(bytes(data))
    assert checkpoints.verify(flipped) is not None


# -- the real thing ------------------------------------------------------------------------


def _mflux(daemon_factory, seed_model: bool = True, **env):
    return daemon_factory(
        engine="mflux", model="tiny-z-image", extra_env={"LORAD_RAM_GB": "128", **env}, seed_model=seed_model
    )


def tensors_bytes(path: Path) -> bytes:
    """The tensor data of a safetensors file (everything after the header)."""
    _, offset = read_header(path)
    return path.read_bytes()[offset:]


@pytest.mark.slow
def test_end_to_end_tiny_model_publishes_everything(daemon_factory):
    d = _mflux(daemon_factory, seed_model=False)  # the daemon builds the miniature model at its first job
    d.registry.write_text(
        json.dumps(
            {"theme": "dark", "models": {"default": "z-image-turbo"}, "loras": {"old": {"path": "x"}}},
            indent=4,
        )
    )
    d.start()
    folder = make_dataset(d.training_data / "ohwx_alice", images=3)
    (folder / "preview_1.txt").write_text("ohwx, smiling portrait")
    (folder / "READY").write_text("alpha = 8\n")  # rank 16: the LoRA applies at scale 0.5
    wait_for(
        lambda: d.job_states().get("ohwx_alice") in ("done", "failed"), 240, interval=0.5, message="job end"
    )
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    built = d.state / "models" / "tiny-z-image" / "tiny.json"
    assert built.is_file() and built.stat().st_nlink == 1  # built by this daemon, not seeded by the test
    loras = d.assets / "loras"
    lora = loras / "alice.safetensors"
    meta = metadata_of(lora)
    assert meta["mflux_version"] and meta["model"] == "z-image"  # mflux's own keys kept
    for key in (
        "modelspec.title",
        "modelspec.architecture",
        "modelspec.trigger_phrase",
        "ss_output_name",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_steps",
        "ss_num_train_images",
        "lorad.version",
        "lorad.fingerprint",
        "lorad.job_id",
        "lorad.plan",
    ):
        assert key in meta, key
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["ss_num_train_images"] == "3"
    assert meta["lorad.job_id"] == job["id"] and json.loads(meta["lorad.plan"])["tier"] == "bf16"
    header, _ = read_header(lora)
    assert any(k.startswith("diffusion_model.layers.0.attention.to_q.lora_A") for k in header)
    # The published adapter is the one mflux saved in its final checkpoint.
    final = checkpoints.newest_good(d.state / "jobs" / job["id"] / "train" / "checkpoints")[0]
    assert checkpoints.step_of(final) == job["total_steps"]
    member = checkpoints.read_member(final, checkpoints.adapter_member(final))
    (d.root / "final.safetensors").write_bytes(member)
    trained = tensors_bytes(d.root / "final.safetensors")
    assert tensors_bytes(lora)[: len(trained)] == trained  # the trained tensors untouched...
    from safetensors import safe_open

    with safe_open(
        str(lora), "np"
    ) as fh:  # ...and each pair's alpha beside it (engines/mflux/lora_export.py)
        pairs = [k.removesuffix(".lora_A.weight") for k in fh.keys() if k.endswith(".lora_A.weight")]
        assert pairs and all(float(fh.get_tensor(f"{p}.alpha")) == 8.0 for p in pairs)
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "16"

    from PIL import Image, ImageChops

    compare = Image.open(loras / "alice.compare.png").convert("RGB")
    width, height = compare.size
    band = height - Image.open(loras / "alice.png").height
    left = compare.crop((0, band, width // 2, height))
    right = compare.crop((width // 2, band, width, height))
    assert ImageChops.difference(left, right).getbbox() is not None  # the LoRA changes the render
    assert (loras / "alice.report" / "loss.html").is_file()
    assert list((loras / "alice.report").glob("*preview_image*.png"))

    registry = json.loads(d.registry.read_text())
    assert registry["theme"] == "dark" and registry["models"] == {"default": "z-image-turbo"}
    assert registry["loras"]["old"] == {"path": "x"}
    entry = registry["loras"]["alice"]
    assert entry["path"] == str(lora) and entry["trigger"] == "ohwx" and entry["model"] == "tiny-z-image"
    import hashlib

    assert entry["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    done = (folder / "DONE").read_text()
    for name in ("alice.safetensors", "alice.png", "alice.compare.png"):
        assert name in done
    assert "ohwx, smiling portrait" in (d.state / "jobs" / job["id"] / "data" / "preview.txt").read_text()


@pytest.mark.slow
def test_sigterm_resume_equals_uninterrupted_run(daemon_factory):
    d = _mflux(daemon_factory)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_same", images=2)
    (folder / "READY").write_text("steps = 10\n")
    wait_for(lambda: d.job_states().get("ohwx_same") == "done", 240, interval=0.5, message="reference run")
    reference = d.jobs()[0]
    d.stop()
    held = hold_training_at(d, 3)  # the stop lands at step 3 however fast the machine trains
    d.start()
    (folder / "READY").write_text("steps = 10\nforce = true\n")
    wait_held(held)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    job = [j for j in d.jobs() if j["id"] != reference["id"]][0]
    assert job["state"] == "interrupted"
    ckpt_dir = d.state / "jobs" / job["id"] / "train" / "checkpoints"
    newest = checkpoints.newest_good(ckpt_dir)[0]
    assert checkpoints.step_of(newest) == job["step"] == 3
    d.start()
    wait_for(
        lambda: d.job_states() and all(j["state"] == "done" for j in d.jobs()),
        240,
        interval=0.5,
        message="resumed",
    )
    assert d.log_has("job.resumed") and d.log_has("train.resume", step=3)
    ref = d.state / "jobs" / reference["id"] / "adapter.safetensors"
    resumed = d.state / "jobs" / job["id"] / "adapter.safetensors"
    assert tensors_bytes(ref) == tensors_bytes(resumed)  # bit-identical to the uninterrupted run
    assert (d.assets / "loras" / "same.v1.safetensors").exists()  # the first LoRA kept, versioned


@pytest.mark.slow
def test_daemon_kill_9_child_checkpoints_and_exits(daemon_factory):
    d = _mflux(daemon_factory)
    held = hold_training_at(d, 3)  # the daemon dies while the child is at step 3, on any machine
    d.start()
    folder = make_dataset(d.training_data / "ohwx_orphan", images=2)
    (folder / "READY").write_text("steps = 40\n")
    child = wait_held(held)
    d.kill9()
    wait_for(lambda: not _alive(child), 60, message="child exit after parent death")
    workdir = d.state / "jobs" / d.jobs()[0]["id"]
    log = (workdir / "train.log").read_text()
    assert "parent gone" in log
    stopped_at = int(log.split("lorad-worker: stopped at step ")[1].split("/")[0])
    newest = checkpoints.newest_good(workdir / "train" / "checkpoints")[0]
    assert checkpoints.step_of(newest) == stopped_at == 3  # saved at the step it reached


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_memory_kill_steps_down_once_then_fails(daemon_factory):
    d = _mflux(daemon_factory)
    d.start()
    folder = make_dataset(d.training_data / "ohwx_oom", images=2)
    (folder / "READY").write_text("steps = 6\n")

    def kill_next_child(count: int) -> None:
        wait_for(
            lambda: len([e for e in d.events() if e["event"] == "job.child"]) >= count,
            120,
            message=f"child {count}",
        )
        pid = [e for e in d.events() if e["event"] == "job.child"][count - 1]["pid"]
        os.kill(pid, signal.SIGKILL)  # what macOS does under memory pressure

    kill_next_child(1)
    wait_for(lambda: d.log_has("job.stepdown"), 60, message="step down")
    step_down = [e for e in d.events() if e["event"] == "job.stepdown"][0]
    assert (step_down["from_tier"], step_down["to_tier"]) == ("bf16", "q8")
    kill_next_child(2)
    wait_for(lambda: d.job_states().get("ohwx_oom") == "failed", 60, message="failed after second kill")
    job = d.jobs()[0]
    assert "SIGKILL" in job["error"] and "memory" in job["error"]
    assert "memory" in (folder / "FAILED.txt").read_text()
    assert job["plan"]["tier"] == "q8" and job["plan"]["config"]["quantize"] == 8


@pytest.mark.slow
def test_quantized_tier_trains(daemon_factory):
    """The 24 GB plan (q4, gradient checkpointing, low_ram) on the miniature model."""
    d = daemon_factory(engine="mflux", model="tiny-z-image", extra_env={"LORAD_RAM_GB": "24"})
    d.start()
    folder = make_dataset(d.training_data / "ohwx_q4", images=1)
    (folder / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_q4") in ("done", "failed"), 300, interval=0.5, message="q4 job")
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    assert (job["plan"]["tier"], job["plan"]["config"]["quantize"], job["plan"]["config"]["low_ram"]) == (
        "q4-lowram",
        4,
        True,
    )
    # low_ram's encoding cache goes into the snapshot, never into the user's folder.
    assert {p.name for p in folder.iterdir()} == {"img_000.png", "img_000.txt", "DONE"}


@pytest.mark.slow
def test_selftest_prints_lora_and_renders(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), "selftest", "--clean"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "selftest passed" in out
    for label, suffix in (
        ("LoRA:", "selftest.safetensors"),
        ("render:", "selftest.png"),
        ("comparison:", "selftest.compare.png"),
        ("captions:", "selftest.report/captions.jsonl"),  # one image captioned by tiny-vlm
    ):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert line.endswith(suffix)


def test_prune_keeps_the_checkpoint_a_run_resumed_from(tmp_path):
    for step in (4, 5, 10):
        _fake_ckpt(tmp_path, step)
    resumed_from = tmp_path / "0000004_checkpoint.zip"  # mflux re-reads its config from it at every save
    assert checkpoints.prune(tmp_path, keep=2, protect=resumed_from) == []
    assert resumed_from.exists()
    assert [p.name for p in checkpoints.prune(tmp_path, keep=2)] == [
        "0000004_checkpoint.zip"
    ]  # after the run


def test_verify_never_raises_on_a_zip_being_rewritten(tmp_path):
    path = _fake_ckpt(tmp_path, 20)
    data = path.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 30):  # every stage of a rewrite in progress
        path.write_bytes(data[:cut])
        assert checkpoints.verify(path) is not None
    assert checkpoints.prune(tmp_path) == []


def test_worker_validates_the_config_with_mflux_before_training(tmp_path):
    """mflux's TrainingSpec rejects a bad config before any model is loaded."""
    import subprocess
    import sys

    config = {
        "model": "z-image-turbo",
        "data": str(tmp_path / "missing"),
        "seed": 1,
        "steps": 9,
        "training_loop": {"num_epochs": 1, "batch_size": 1},
        "optimizer": {"name": "AdamW", "learning_rate": 1e-4},
        "checkpoint": {"save_frequency": 1, "output_path": str(tmp_path / "out")},
        "lora_layers": {"targets": []},
    }
    (tmp_path / "train.json").write_text(json.dumps(config))
    (tmp_path / "plan.json").write_text(json.dumps({"model": "z-image-turbo", "config": config}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engines.mflux.worker",
            "train",
            "--job-dir",
            str(tmp_path),
            "--plan",
            str(tmp_path / "plan.json"),
            "--config",
            str(tmp_path / "train.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "mflux rejected the training config" in result.stderr and "missing" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written, no weights looked up
