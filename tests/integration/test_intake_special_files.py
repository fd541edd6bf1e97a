"""Issue 12, intake hardening: special files (4), crashes that left no trace (7), READY content
lost (9), unsupported image formats dropped silently (10). Real files (FIFOs, sockets, device
nodes, sparse files, a full tmpfs), the real Intake with its SQLite job store and markers, and
the real daemon where the watcher matters. Anything that could hang on a regression runs with a
bound (a thread join or a subprocess timeout), so a regression fails instead of hanging.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import tree_hash, wait_for
from PIL import Image

from daemon.fsutil import NotARegularFile, file_kind, open_regular
from daemon.intake.take import Intake
from daemon.intake.validate import validate_dataset
from daemon.jobs import Job, JobStore, marker_text
from daemon.sample import make_dataset
from daemon.settings import FIELDS, Settings
from daemon.watch import IntakeLoop, ready_write_state

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 30


def png_bytes(size=(300, 300), color=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def bounded(fn, timeout: float = BOUND_S):
    """fn() on a daemon thread; fails (instead of hanging the suite) when it blocks."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout}s: a special file was opened?"
    if "error" in result:
        raise result["error"]
    return result["value"]


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    """A real bound unix socket (bound by relative name: socket paths are limited to ~100 bytes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
        sock.close()  # the socket file stays


def make_null_device(path: Path) -> None:
    """A character device node (that of /dev/null: root only). Not /dev/zero: a regression would
    read it forever, on a thread the bound cannot stop, until the machine runs out of memory."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here: {exc}")


MAKERS = {"fifo": make_fifo, "socket": make_socket, "device": make_null_device}
KIND_TEXT = {"fifo": "a FIFO (named pipe)", "socket": "a socket", "device": "a character device"}


def make_intake(tmp_path: Path, **values):
    settings = Settings(assets=tmp_path / "assets", engine="scripted", model="tiny-z-image", **values)
    settings.training_data.mkdir(parents=True)
    store = JobStore(settings.jobs_db)
    queued: list = []
    intake = Intake(settings, store, lambda *args: queued.append(args))
    return settings, store, intake, queued


def lorad_validate(
    folder: Path, *args: str, timeout: float = 60, preexec=None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "validate", str(folder), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


# -- item 4: FIFOs, sockets and devices are never opened -------------------------------------


@pytest.mark.parametrize(
    "mode, kind",
    [
        (stat.S_IFREG, "a regular file"),
        (stat.S_IFIFO, "a FIFO (named pipe)"),
        (stat.S_IFSOCK, "a socket"),
        (stat.S_IFCHR, "a character device"),
        (stat.S_IFBLK, "a block device"),
        (stat.S_IFDIR, "a folder"),
        (stat.S_IFLNK, "a symlink"),
    ],
)
def test_file_kind(mode, kind):
    assert file_kind(mode | 0o644) == kind


@pytest.mark.parametrize("maker", ["fifo", "socket", "device"])
def test_open_regular_refuses_special_files_without_blocking(tmp_path, maker):
    path = tmp_path / "x"
    MAKERS[maker](path)
    with pytest.raises(NotARegularFile) as info:
        bounded(lambda: open_regular(path))
    assert info.value.kind == KIND_TEXT[maker]
    assert str(info.value) == f"{path} is {KIND_TEXT[maker]}, not a file"
    os.symlink("x", tmp_path / "link")
    with pytest.raises(NotARegularFile) as info:
        bounded(lambda: open_regular(tmp_path / "link"))
    assert info.value.kind == f"a symlink to {KIND_TEXT[maker]}"
    (tmp_path / "real").write_bytes(b"abc")
    os.symlink("real", tmp_path / "good")
    with open_regular(tmp_path / "good") as fh:
        assert fh.read() == b"abc"


# (special file kind, its name in the dataset, the file the error must name)
SPECIAL_CASES = [
    ("fifo", "b.png", "b.png"),
    ("fifo", "a.txt", "a.txt"),
    ("fifo", "preview_1.txt", "preview_1.txt"),
    ("fifo", "lora.toml", "lora.toml"),
    ("fifo", "READY", "READY"),
    ("socket", "a.txt", "a.txt"),
    ("socket", "b.png", "b.png"),
    ("device", "b.png", "b.png"),
    ("device", "a.txt", "a.txt"),
    ("device", "lora.toml", "lora.toml"),
]


@pytest.mark.parametrize("maker, name, file", SPECIAL_CASES, ids=[f"{m}-{n}" for m, n, _ in SPECIAL_CASES])
def test_special_file_in_dataset_is_a_specific_error(tmp_path, maker, name, file):
    folder = tmp_path / "ohwx_special"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    if name != "a.txt":
        (folder / "a.txt").write_text("ohwx, a photo")
    MAKERS[maker](folder / name)
    report = bounded(lambda: validate_dataset(folder))
    assert not report.valid
    matching = [f for f in report.errors if f.code == "file.special" and f.file == file]
    assert matching, [f.line() for f in report.errors]
    assert f"is {KIND_TEXT[maker]}, not a file" in matching[0].message and "remove it" in matching[0].hint


def test_symlink_in_folder_to_a_fifo_is_an_error(tmp_path):
    folder = tmp_path / "ohwx_linkfifo"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    os.mkfifo(folder / "pipe")
    os.symlink("pipe", folder / "a.txt")
    report = bounded(lambda: validate_dataset(folder))
    assert [f.message for f in report.errors if f.file == "a.txt"] == [
        "is a symlink to a FIFO (named pipe), not a file"
    ]


def test_lorad_validate_does_not_hang_on_a_fifo(tmp_path):
    folder = make_dataset(tmp_path / "ohwx_cli", images=2)
    (folder / "img_000.txt").unlink()
    os.mkfifo(folder / "img_000.txt")
    os.mkfifo(folder / "lora.toml")
    result = lorad_validate(folder)  # TimeoutExpired here = the old hang
    assert result.returncode == 1, result.stderr
    assert "ERROR: img_000.txt: is a FIFO (named pipe), not a file -> remove it" in result.stdout
    assert "ERROR: lora.toml: is a FIFO (named pipe), not a file" in result.stdout


def test_fifo_ready_is_refused_once_and_never_read(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    folder = make_dataset(settings.training_data / "ohwx_pipe", images=2)
    os.mkfifo(folder / "READY")
    outcome = bounded(lambda: intake.take(folder))
    assert outcome.status == "refused" and "READY is a FIFO (named pipe), not a file" in outcome.detail
    assert "READY is a FIFO" in (folder / "FAILED.txt").read_text()
    again = bounded(lambda: intake.take(folder))  # a rescan (or a restart) picks it again: no hang, one row
    assert again.status == "refused" and again.job_id == outcome.job_id
    assert len(store.list()) == 1 and not queued
    assert stat.S_ISFIFO((folder / "READY").lstat().st_mode)  # the user's, left as it is


def test_fifo_caption_fails_the_dataset_and_the_queue_goes_on(daemon_factory):
    """The real daemon: before the fix its intake thread blocked on the FIFO, for good."""
    d = daemon_factory().start()
    bad = make_dataset(d.training_data / "ohwx_fifo", images=2)
    (bad / "img_001.txt").unlink()
    os.mkfifo(bad / "img_001.txt")
    (bad / "READY").write_text("")
    wait_for(lambda: (bad / "FAILED.txt").exists(), 60, message="FAILED.txt for the FIFO caption")
    assert "img_001.txt: is a FIFO (named pipe), not a file" in (bad / "FAILED.txt").read_text()
    good = make_dataset(d.training_data / "ohwx_after", images=2)
    (good / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_after") == "done", 90, message="the next dataset trains")
    assert stat.S_ISFIFO((bad / "img_001.txt").lstat().st_mode)


# -- item 7: every intake failure leaves a trace ---------------------------------------------


def test_non_utf8_file_name_is_a_clear_finding(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    folder = make_dataset(settings.training_data / "ohwx_latin", images=2)
    raw = os.fsencode(folder)
    os.rename(os.fsencode(folder / "img_000.png"), raw + b"/caf\xe9.png")
    os.rename(os.fsencode(folder / "img_000.txt"), raw + b"/caf\xe9.txt")
    report = validate_dataset(folder)
    found = [f for f in report.errors if f.code == "name.encoding"]
    assert {f.file for f in found} == {"caf\\xe9.png", "caf\\xe9.txt"}, [f.line() for f in report.findings]
    before = tree_hash(folder)
    (folder / "READY").write_text("")
    outcome = intake.take(folder)
    assert outcome.status == "invalid"
    text = (folder / "FAILED.txt").read_text(encoding="utf-8")
    assert "caf\\xe9.png: file name is not valid UTF-8" in text
    job = store.get(outcome.job_id)
    assert job.state == "failed" and "caf\\xe9.png" in job.error  # a status row
    assert not (folder / "READY").exists() and not queued
    assert tree_hash(folder, skip=("FAILED.txt",)) == before


def test_non_utf8_folder_name_still_leaves_failed_txt(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    folder = Path(os.fsdecode(os.fsencode(settings.training_data) + b"/ohwx_caf\xe9"))
    make_dataset(folder, images=2, trigger="ohwx")
    (folder / "READY").write_text("")
    outcome = intake.take(folder)  # before: UnicodeEncodeError out of take(), READY retried forever
    assert outcome.status in ("invalid", "failed")
    text = (folder / "FAILED.txt").read_text(encoding="utf-8")
    assert "ohwx_caf\\xe9" in text and "UTF-8" in text
    assert not (folder / "READY").exists() and not queued


def test_sparse_40gb_image_is_refused_before_reading(tmp_path):
    """`lorad validate` under a 4 GB address-space limit: reading the file whole (the old code)
    dies with MemoryError; the size cap refuses it without reading a byte."""
    import resource

    folder = make_dataset(tmp_path / "ohwx_big", images=2)
    with (folder / "big.png").open("wb") as fh:
        fh.truncate(40 * 1000**3)
    (folder / "big.txt").write_text("ohwx, big")
    limit = 4 * 1024**3
    result = lorad_validate(
        folder, "--json", preexec=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = json.loads(result.stdout)["errors"]
    big = [e for e in errors if e["file"] == "big.png"]
    assert big and big[0]["code"] == "image.huge", errors
    assert "40,000.0 MB" in big[0]["message"] and "max_image_bytes" in big[0]["message"]


def test_image_and_caption_caps_are_settings(tmp_path):
    assert FIELDS["max_image_bytes"] == ("int", 100_000_000)
    assert FIELDS["max_caption_bytes"] == ("int", 64 * 1024)
    settings, store, intake, queued = make_intake(tmp_path, max_image_bytes=1000, max_caption_bytes=10)
    folder = make_dataset(settings.training_data / "ohwx_caps", images=1)
    (folder / "READY").write_text("")
    outcome = intake.take(folder)
    assert outcome.status == "invalid"
    codes = {line.split(": ")[1] for line in outcome.detail.splitlines()}
    assert codes == {"img_000.png", "img_000.txt"}, outcome.detail
    assert "(setting max_image_bytes)" in outcome.detail and "setting max_caption_bytes" in outcome.detail


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_during_snapshot_fails_visibly_then_works_after(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    if not _mount_tmpfs(settings.jobs_dir, "64k"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        folder = make_dataset(settings.training_data / "ohwx_full", images=1)
        noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
        noise.save(folder / "noise.png")  # ~480 KB: cannot fit in 64 KB
        (folder / "noise.txt").write_text("ohwx, noise")
        (folder / "READY").write_text("")
        outcome = intake.take(folder)  # before: OSError out of take(), no trace, READY retried forever
        # Refused by the free-space check before copying (no_space), or by ENOSPC mid-copy (failed).
        assert outcome.status in ("no_space", "failed"), outcome
        text = (folder / "FAILED.txt").read_text()
        assert "space" in text.lower() and "create READY" in text, text
        job = store.get(outcome.job_id)
        assert job.state == "failed" and "space" in job.error.lower()
        assert not (folder / "READY").exists() and not queued
        assert not [p for p in settings.jobs_dir.iterdir() if p.name.startswith(".intake-")]
    finally:
        subprocess.run(["umount", str(settings.jobs_dir)], check=False)
    (folder / "READY").write_text("")  # space is back: the user drops READY again
    assert intake.take(folder).status == "queued"


# -- item 9: READY content is never lost -----------------------------------------------------


def test_oversize_ready_is_refused_not_cut(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    folder = make_dataset(settings.training_data / "ohwx_bigready", images=2)
    (folder / "READY").write_text("# padding\n" * 1_000_000 + "steps = 3\n")  # 10 MB
    outcome = intake.take(folder)  # before: cut at 1 MiB, steps silently ignored, job queued
    assert outcome.status == "invalid" and not queued
    text = (folder / "FAILED.txt").read_text()
    assert "READY: is 10,000,010 bytes; an options file may be at most 65,536 bytes (64 KB)" in text


def test_oversize_lora_toml_is_refused(tmp_path):
    folder = make_dataset(tmp_path / "ohwx_bigtoml", images=2)
    (folder / "lora.toml").write_text("# padding\n" * 10_000 + "rank = 8\n")
    report = validate_dataset(folder)
    assert [f.code for f in report.errors if f.file == "lora.toml"] == ["option.huge"]


@pytest.mark.parametrize(
    "events, state",
    [
        (["created"], "created"),  # renamed in from elsewhere, or linked: complete
        (["created", "opened"], "writing"),
        (["created", "opened", "closed"], None),
        (["created", "opened", "modified", "closed"], None),
        (["opened"], None),  # a reader
        (["modified"], "writing"),  # an existing READY rewritten in place
        (["modified", "moved"], None),
        (["created", "opened", "deleted"], None),
    ],
)
def test_ready_write_state_table(events, state):
    current = None
    for event in events:
        current = ready_write_state(current, event)
    assert current == state


def test_intake_loop_waits_for_readys_writer_to_close_it(tmp_path):
    taken: list[Path] = []
    took = threading.Event()
    loop = IntakeLoop(lambda folder: (taken.append(folder), took.set()), debounce_s=0.01)
    loop.start()
    try:
        folder = tmp_path / "ohwx_a"
        loop.ready_event(folder, "created")
        loop.ready_event(folder, "opened")
        loop.schedule(folder)
        loop.ready_event(folder, "modified")
        loop.schedule(folder)
        assert not took.wait(1.0)  # an open READY is not read (1 s is far past the debounce)
        loop.ready_event(folder, "closed")
        loop.schedule(folder)
        assert took.wait(BOUND_S) and taken == [folder]
    finally:
        loop.stop()


def test_intake_loop_waits_for_an_open_ready_only_so_long(tmp_path):
    took = threading.Event()
    loop = IntakeLoop(lambda folder: took.set(), debounce_s=0.01, ready_open_max_s=0.5)
    loop.start()
    try:
        folder = tmp_path / "ohwx_b"
        loop.ready_event(folder, "modified")
        loop.schedule(folder)
        assert took.wait(BOUND_S)  # a writer that never closes: read after the bound, not never
    finally:
        loop.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="close events come from inotify")
def test_ready_written_slowly_keeps_its_options(daemon_factory):
    """`(sleep 0.5; echo 'steps = 3') > READY`, made deterministic: part written, the daemon sees
    it (and says it waits), then the rest; the job has both options."""
    d = daemon_factory()
    # The folder exists before the daemon starts, so its watch is in place before READY is opened
    # (a folder made after the start is watched only once the watcher sees it: a race on a slow CPU).
    folder = make_dataset(d.training_data / "ohwx_slow", images=2)
    d.start()
    with (folder / "READY").open("w") as fh:
        fh.write("rank = 8\n")
        fh.flush()
        wait_for(
            lambda: d.log_has("intake.ready_open", dataset="ohwx_slow"),
            30,
            message="the daemon sees READY open",
        )
        fh.write("steps = 3\n")
    wait_for(lambda: d.job_states().get("ohwx_slow") == "done", 90, message="job done")
    (job,) = d.jobs()
    assert job["settings"]["options"] == {"rank": 8, "steps": 3}
    assert job["settings"]["steps"] == 3 and job["total_steps"] == 3


# -- item 10: unsupported image formats are named, with how to convert them ------------------


def test_unsupported_images_among_trainable_ones_are_warnings(tmp_path):
    folder = tmp_path / "ohwx_mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes())
    (folder / "a.txt").write_text("ohwx, a photo")
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "IMG_0001.txt").write_text("ohwx, from the phone")
    (folder / "c.gif").write_bytes(b"GIF89a")
    (folder / "d.tiff").write_bytes(b"II*\x00")
    report = validate_dataset(folder)
    assert report.valid, [f.line() for f in report.errors]
    by_file = {(f.file, f.code): f for f in report.warnings}
    heic = by_file[("IMG_0001.HEIC", "image.unsupported")]
    assert "HEIC images are not supported" in heic.message and "left out of training" in heic.message
    assert (
        "sips -s format jpeg IMG_0001.HEIC --out IMG_0001.jpg" in heic.hint and "Most Compatible" in heic.hint
    )
    assert "GIF" in by_file[("c.gif", "image.unsupported")].message
    assert "magick 'c.gif[0]' c.png" in by_file[("c.gif", "image.unsupported")].hint
    assert "TIFF" in by_file[("d.tiff", "image.unsupported")].message
    caption = [f for f in report.warnings if f.file == "IMG_0001.txt"]
    assert [f.code for f in caption] == ["caption.unsupported_image"], caption  # not "caption has no image"
    assert "IMG_0001.HEIC" in caption[0].message


def test_only_unsupported_images_is_an_error_with_advice(tmp_path):
    folder = tmp_path / "ohwx_phone"
    folder.mkdir()
    for i in range(3):
        (folder / f"IMG_{i}.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
        (folder / f"IMG_{i}.txt").write_text("ohwx, a photo")
    report = validate_dataset(folder)
    assert not report.valid
    errors = {(f.file, f.code) for f in report.errors}
    assert {(f"IMG_{i}.heic", "image.unsupported") for i in range(3)} <= errors
    noimages = next(f for f in report.errors if f.code == "folder.noimages")
    assert "3 in formats lorad does not train" in noimages.message
    assert all("sips" in f.hint for f in report.errors if f.code == "image.unsupported")


def test_warnings_go_into_failed_txt(tmp_path):
    settings, store, intake, queued = make_intake(tmp_path)
    folder = settings.training_data / "ohwx_warned"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    (folder / "a.txt").write_text("ohwx, a")
    (folder / "b.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "READY").write_text("")
    assert intake.take(folder).status == "invalid"
    text = (folder / "FAILED.txt").read_text()
    assert "a.png: is not an image" in text
    assert "Warnings from intake:" in text and "b.heic: HEIC images are not supported" in text


def test_done_marker_lists_the_warnings():
    job = Job(
        id="j1",
        name="alice",
        state="done",
        finished_at=0.0,
        outputs='{"lora": "/x/alice.safetensors"}',
        settings=json.dumps({"warnings": ["WARNING: b.heic: HEIC images are not supported -> convert it"]}),
    )
    text = marker_text(job)
    assert "lora: /x/alice.safetensors" in text
    assert "Warnings from intake:\n- WARNING: b.heic: HEIC images are not supported -> convert it" in text


def test_done_marker_of_a_real_job_names_the_heic(daemon_factory):
    d = daemon_factory().start()
    folder = make_dataset(d.training_data / "ohwx_iphone", images=2)
    (folder / "IMG_7.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "READY").write_text("")
    wait_for(lambda: (folder / "DONE").exists(), 90, message="DONE")
    text = (folder / "DONE").read_text()
    assert "IMG_7.HEIC: HEIC images are not supported" in text and "sips" in text


@pytest.mark.parametrize(
    "exc, expected",
    [
        (
            OSError(28, "No space left on device", "/x/jobs/.intake-1/data/0001.png"),
            "no space left on the disk holding /x/jobs/.intake-1/data/0001.png",
        ),
        (MemoryError(), "ran out of memory"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
        (RuntimeError("boom"), "intake failed: RuntimeError: boom"),
    ],
)
def test_crash_reason_says_what_happened_and_what_to_do(tmp_path, exc, expected):
    """ENOSPC mid-copy (the free-space check can be outrun by another writer), memory, encoding."""
    from daemon.intake.take import crash_reason

    text = crash_reason(exc, tmp_path)
    assert expected in text and "READY" in text and "again" in text, text
