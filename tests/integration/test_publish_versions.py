"""Publishing: provenance header, versioning, registry preservation, locking, broken registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for
from PIL import Image
from safetensors.numpy import save_file

from daemon import registry
from daemon.publish import PublishError, metadata_of, provenance, publish, read_header, write_with_metadata
from daemon.sample import make_dataset


@dataclass
class FakeJob:
    id: str
    name: str = "alice"
    trigger_word: str = "ohwx"


PLAN = {
    "model": "tiny-z-image",
    "tier": "bf16",
    "total_steps": 4,
    "config": {"lora_layers": {"targets": [{"rank": 8, "alpha": 8.0}]}},
}


def _inputs(tmp_path: Path, tag: str, value: float = 1.0):
    src = tmp_path / f"in-{tag}"
    src.mkdir(exist_ok=True)
    adapter = src / "adapter.safetensors"
    save_file(
        {"diffusion_model.layers.0.attention.to_q.lora_A.weight": np.full((8, 64), value, np.float32)},
        str(adapter),
        metadata={"mflux_version": "0.24.0", "model": "z-image"},
    )
    lora = src / "lora.safetensors"
    write_with_metadata(
        adapter,
        lora,
        provenance(
            job=FakeJob(tag),
            plan=PLAN,
            fingerprint="fp" + tag,
            image_count=3,
            engine_keys={"ss_network_dim": "8", "ss_network_alpha": "8.0"},
        ),
    )
    Image.new("RGB", (32, 32), (int(value * 10) % 255, 0, 0)).save(src / "with.png")
    Image.new("RGB", (64, 40)).save(src / "compare.png")
    (src / "loss.html").write_text("loss")
    return lora, src / "with.png", src / "compare.png", [src / "loss.html"]


def _publish(tmp_path, job_id: str, value: float = 1.0, registry_path=None, name: str = "alice", loras=None):
    lora, render, compare, report = _inputs(tmp_path, job_id, value)
    return publish(
        loras=loras or tmp_path / "loras",
        registry_path=registry_path or tmp_path / "config.json",
        job=FakeJob(job_id, name),
        lora_file=lora,
        render_with=render,
        render_compare=compare,
        report_files=report,
        plan=PLAN,
    )


def test_header_keeps_mflux_keys_and_adds_provenance(tmp_path):
    outputs = _publish(tmp_path, "job1")
    meta = metadata_of(Path(outputs["lora"]))
    assert meta["mflux_version"] == "0.24.0" and meta["model"] == "z-image"
    assert (
        meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0" and meta["lorad.job_id"] == "job1"
    )
    header, offset = read_header(Path(outputs["lora"]))
    assert offset % 8 == 0
    from safetensors.numpy import load_file

    tensors = load_file(outputs["lora"])  # still a valid safetensors file
    assert tensors["diffusion_model.layers.0.attention.to_q.lora_A.weight"].shape == (8, 64)


def test_existing_lora_is_versioned_never_overwritten(tmp_path):
    first = _publish(tmp_path, "job1", 1.0)
    first_bytes = Path(first["lora"]).read_bytes()
    second = _publish(tmp_path, "job2", 2.0)
    loras = tmp_path / "loras"
    assert second["previous"] == str(loras / "alice.v1.safetensors")
    assert (loras / "alice.v1.safetensors").read_bytes() == first_bytes
    assert (loras / "alice.v1.png").exists() and (loras / "alice.v1.compare.png").exists()
    assert (loras / "alice.v1.report" / "loss.html").exists()
    _publish(tmp_path, "job3", 3.0)
    assert metadata_of(loras / "alice.v2.safetensors")["lorad.job_id"] == "job2"
    assert metadata_of(loras / "alice.safetensors")["lorad.job_id"] == "job3"
    entries = json.loads((tmp_path / "config.json").read_text())["loras"]
    assert entries["alice"]["job_id"] == "job3" and entries["alice.v1"]["path"].endswith(
        "alice.v1.safetensors"
    )
    assert entries["alice.v2"]["job_id"] == "job2"
    # Publishing the same job again (a crash mid-publish) replaces its own files in place.
    _publish(tmp_path, "job3", 3.0)
    assert not (loras / "alice.v3.safetensors").exists()
    assert not [p for p in loras.iterdir() if p.name.startswith(".")]


def test_registry_keeps_other_keys_and_order(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"zeta": 1, "loras": {"bob": {"path": "b"}}, "alpha": [1, 2]}))
    _publish(tmp_path, "job1", registry_path=path)
    data = json.loads(path.read_text())
    assert list(data) == ["zeta", "loras", "alpha"] and data["zeta"] == 1 and data["alpha"] == [1, 2]
    assert set(data["loras"]) == {"bob", "alice"} and data["loras"]["bob"] == {"path": "b"}
    for key in ("path", "trigger", "model", "rank", "steps", "created", "sha256", "render"):
        assert key in data["loras"]["alice"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"loras": []}'])
def test_broken_registry_is_left_byte_identical_and_nothing_published(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(PublishError) as info:
        _publish(tmp_path, "job1", registry_path=path)
    assert str(path) in str(info.value) and "untouched" in str(info.value)
    assert path.read_text() == content
    assert not (tmp_path / "loras" / "alice.safetensors").exists()
    assert not [p for p in (tmp_path / "loras").iterdir()]


def test_concurrent_registry_writers_lose_nothing(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"keep": true}')
    code = (
        "import sys; from daemon import registry\n"
        "path, tag = sys.argv[1], sys.argv[2]\n"
        "for i in range(25):\n"
        "    with registry.Transaction(path) as t:\n"
        "        t.prepare({f'{tag}{i}': {'i': i}})\n"
        "        t.commit()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), tag]) for tag in ("a", "b", "c")]
    assert all(p.wait(60) == 0 for p in procs)
    data = json.loads(path.read_text())
    assert data["keep"] is True and len(data["loras"]) == 75


def test_registry_load_errors_name_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1,,}')
    with pytest.raises(registry.RegistryError, match="line 1"):
        registry.load(path)
    assert registry.load(tmp_path / "missing.json") == {}


# -- through the daemon (scripted engine: fast) --------------------------------------------


def test_second_run_keeps_first_lora_versioned(daemon_factory):
    d = daemon_factory().start()
    folder = make_dataset(d.training_data / "ohwx_carol", images=2)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_carol") == "done", 60, message="first")
    first = (d.assets / "loras" / "carol.safetensors").read_bytes()
    make_dataset(folder, images=3, seed=7)  # changed content, same name
    (folder / "READY").write_text("")
    wait_for(lambda: [j["state"] for j in d.jobs()] == ["done", "done"], 60, message="second")
    assert (d.assets / "loras" / "carol.v1.safetensors").read_bytes() == first
    assert metadata_of(d.assets / "loras" / "carol.safetensors")["lorad.job_id"] == d.jobs()[1]["id"]


def test_invalid_registry_fails_job_then_retry_succeeds(daemon_factory):
    d = daemon_factory()
    d.registry.write_text('{"loras": {"x": 1}, oops')
    before = d.registry.read_bytes()
    d.start()
    folder = make_dataset(d.training_data / "ohwx_dave", images=1)
    (folder / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_dave") == "failed", 60, message="failed on registry")
    assert d.registry.read_bytes() == before
    job = d.jobs()[0]
    assert "not valid JSON" in job["error"] and str(d.registry) in job["error"]
    assert "not valid JSON" in (folder / "FAILED.txt").read_text()
    assert not (d.assets / "loras" / "dave.safetensors").exists()
    d.registry.write_text('{"loras": {"x": 1}}')
    assert d.cli("retry", job["id"]).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_dave") == "done", 60, message="done after retry")
    assert json.loads(d.registry.read_text())["loras"]["x"] == 1


def test_registry_failure_after_renames_then_registry_only_completion(tmp_path):
    """The lock held past lock_timeout_s: the new LoRA is published, the registry untouched;
    complete_registry then lists it and the version its publish moved aside (found by header)."""
    from daemon.publish import complete_registry, published_by

    _publish(tmp_path, "job1", 1.0)
    path = tmp_path / "config.json"
    before = path.read_bytes()
    holder = subprocess.Popen(["flock", "-x", str(path) + ".lock", "sleep", "300"], start_new_session=True)
    try:
        wait_for(lambda: _held(path), 10, message="lock held")
        with pytest.raises(PublishError) as info:
            lora, render, compare, report = _inputs(tmp_path, "job2", 2.0)
            publish(
                loras=tmp_path / "loras",
                registry_path=path,
                job=FakeJob("job2"),
                lora_file=lora,
                render_with=render,
                render_compare=compare,
                report_files=report,
                plan=PLAN,
                lock_timeout_s=0.3,
            )
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert "is published" in str(info.value) and "lorad retry job2" in str(info.value)
    assert path.read_bytes() == before
    loras = tmp_path / "loras"
    assert (
        published_by(loras, FakeJob("job2"))
        and metadata_of(loras / "alice.v1.safetensors")["lorad.job_id"] == "job1"
    )
    outputs = complete_registry(loras=loras, registry_path=path, job=FakeJob("job2"), lock_timeout_s=5)
    entries = json.loads(path.read_text())["loras"]
    assert entries["alice"]["job_id"] == "job2" and entries["alice.v1"]["job_id"] == "job1"
    assert entries["alice.v1"]["path"] == str(loras / "alice.v1.safetensors")
    assert outputs["previous"] == str(loras / "alice.v1.safetensors") and outputs["registry_key"] == "alice"
    assert not (loras / "alice.v2.safetensors").exists()


def test_symlinked_registry_is_written_through_keeping_mode(tmp_path):
    real = tmp_path / "app" / "config.json"
    real.parent.mkdir()
    real.write_text('{"theme": "dark"}')
    real.chmod(0o600)
    link = tmp_path / "config.json"
    link.symlink_to(real)
    _publish(tmp_path, "job1", registry_path=link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    data = json.loads(real.read_text())
    assert data["theme"] == "dark" and data["loras"]["alice"]["job_id"] == "job1"
    assert real.stat().st_mode & 0o777 == 0o600
    assert (real.parent / "config.json.lock").exists()  # the lock sits beside the real file
    assert not [p for p in real.parent.iterdir() if p.name.endswith(".tmp")]


def _held(path: Path) -> bool:
    import fcntl

    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- names compared as the file system compares them (issue 19 case 9) ---------------------------


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _two_spellings_publish(tmp_path: Path, loras: Path, registry_path: Path, first: str, second: str):
    """Publish LoRA `first` (job1), then `second` (job2): names equal but for case/normalisation."""
    _publish(tmp_path, "job1", 1.0, registry_path=registry_path, name=first, loras=loras)
    old_lora = (loras / f"{first}.safetensors").read_bytes()
    old_render = (loras / f"{first}.png").read_bytes()
    outputs = _publish(tmp_path, "job2", 2.0, registry_path=registry_path, name=second, loras=loras)
    return old_lora, old_render, outputs


def _assert_one_name_two_versions(
    loras: Path, registry_path: Path, spelling: str, old_lora, old_render, outputs
):
    """The existing spelling won: job2 is `<spelling>`, job1 kept whole as `<spelling>.v1`, and
    every registry entry describes the file at its path (nothing listed twice or lost)."""
    stems = sorted({p.name.split(".")[0] for p in loras.iterdir() if not p.name.startswith(".")})
    assert stems == [spelling], stems  # one spelling on disk
    assert metadata_of(loras / f"{spelling}.safetensors")["lorad.job_id"] == "job2"
    assert (loras / f"{spelling}.v1.safetensors").read_bytes() == old_lora
    assert (loras / f"{spelling}.v1.png").read_bytes() == old_render
    assert (loras / f"{spelling}.v1.compare.png").is_file() and (loras / f"{spelling}.v1.report").is_dir()
    assert outputs["lora"] == str(loras / f"{spelling}.safetensors")
    assert outputs["previous"] == str(loras / f"{spelling}.v1.safetensors")
    entries = json.loads(registry_path.read_text())["loras"]
    assert sorted(entries) == [spelling, f"{spelling}.v1"], entries
    assert {e["job_id"] for e in entries.values()} == {"job1", "job2"}
    for key, entry in entries.items():
        assert metadata_of(Path(entry["path"]))["lorad.job_id"] == entry["job_id"], key
        assert _sha(Path(entry["path"])) == entry["sha256"], key


@pytest.mark.parametrize(
    "first, second",
    [
        ("Alice", "alice"),
        ("alice", "ALICE"),
        ("\u00e9lodie", "e\u0301lodie"),  # NFC then NFD: one name on APFS
        ("E\u0301LODIE", "\u00e9lodie"),
    ],
)
def test_names_differing_in_case_or_normalisation_are_one_name(tmp_path, first, second):
    """On Linux (case-sensitive ext4) as on APFS: the second publish goes under the first's
    spelling and keeps the first as .v1; it never adds a second spelling beside it."""
    loras, registry_path = tmp_path / "loras", tmp_path / "config.json"
    old_lora, old_render, outputs = _two_spellings_publish(tmp_path, loras, registry_path, first, second)
    _assert_one_name_two_versions(loras, registry_path, first, old_lora, old_render, outputs)
    from daemon.publish import complete_registry, published_by

    job2 = FakeJob("job2", second)
    assert published_by(loras, job2)  # a retry finds its LoRA under the existing spelling
    again = complete_registry(loras=loras, registry_path=registry_path, job=job2, lock_timeout_s=5)
    assert again["registry_key"] == first
    _assert_one_name_two_versions(loras, registry_path, first, old_lora, old_render, outputs)


def _mount_case_folding(path: Path) -> str | None:
    """Mount a case-insensitive file system at `path`; None, or why none can be mounted here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "needs root to mount a file system"
    tried = []
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,casefold", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        return None
    tried.append(f"tmpfs -o casefold: {' '.join(done.stderr.split()) or done.returncode}")
    image = path.parent / "casefold.img"
    steps = [
        ["truncate", "-s", "64M", str(image)],
        ["mkfs.ext4", "-q", "-F", "-O", "casefold", str(image)],
        ["mount", "-o", "loop", str(image), str(path)],
        ["chattr", "+F", str(path)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True)
        except OSError as exc:
            done = subprocess.CompletedProcess(step, 127, "", str(exc))
        if done.returncode != 0:
            if step[0] == "chattr":
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
            tried.append(f"ext4 -O casefold ({step[0]}): {' '.join(done.stderr.split()) or done.returncode}")
            if not Path("/sys/fs/ext4/features/casefold").exists():
                tried.append("this kernel has no case folding (built without CONFIG_UNICODE)")
            return "no case-insensitive file system can be mounted here (" + "; ".join(tried) + ")"
    return None


def test_case_variant_names_on_a_case_folding_file_system(tmp_path):
    """The real thing where it can be mounted (ext4/tmpfs casefold; macOS's APFS folds the same
    way): `Alice` then `alice` must leave both LoRAs and their renders, listed correctly."""
    where = tmp_path / "cf"
    why = _mount_case_folding(where)
    if why:
        pytest.skip(why)
    try:
        (where / "Probe").write_text("x")
        if not (where / "probe").exists():
            pytest.skip("the mounted file system does not fold case")
        (where / "Probe").unlink()
        loras, registry_path = where / "loras", where / "config.json"
        loras.mkdir()
        subprocess.run(["chattr", "+F", str(loras)], capture_output=True)  # ext4: per folder
        old_lora, old_render, outputs = _two_spellings_publish(
            tmp_path, loras, registry_path, "Alice", "alice"
        )
        _assert_one_name_two_versions(loras, registry_path, "Alice", old_lora, old_render, outputs)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
