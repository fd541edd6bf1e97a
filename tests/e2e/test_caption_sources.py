"""Caption sources: metadata.jsonl, missing_captions (refuse | trigger | vlm), captions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tree_hash, wait_for

from daemon.intake.metadata import parse_metadata
from daemon.intake.snapshot import take_snapshot
from daemon.intake.validate import validate_dataset
from daemon.sample import make_dataset


def uncaptioned(folder: Path, images: int = 3) -> Path:
    """A dataset of images only (the .txt sidecars make_dataset writes removed)."""
    make_dataset(folder, images=images)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    return folder


def jsonl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def metadata_only(folder: Path, images: int = 3) -> Path:
    uncaptioned(folder, images)
    lines = [
        {"file_name": f"img_{i:03d}.png", "text": f"ohwx, a person in a garden, take {i}"}
        for i in range(images)
    ]
    (folder / "metadata.jsonl").write_text(jsonl(*lines), encoding="utf-8")
    return folder


# -- metadata.jsonl, pure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('{"file_name": "a.png", "text": "x"}\n{not json\n', 2, ["not valid JSON"]),
        ('{"file_name": "a.png"}\n', 1, ["no 'text' field"]),
        ('\n\n{"text": "x"}\n', 3, ["no 'file_name' field"]),
        ('{"file_name": "a.png", "text": 3}\n', 1, ["'text' must be a string"]),
        ('["a.png", "x"]\n', 1, ["not an object"]),
        (
            '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n',
            2,
            ["again", "line 1"],
        ),
        ('{"file_name": "sub/a.png", "text": "x"}\n', 1, ["not a file directly"]),
    ],
)
def test_bad_metadata_lines_are_named_by_number(text, line, words):
    _, findings = parse_metadata(text.encode())
    assert len(findings) == 1 and findings[0].level == "error"
    assert findings[0].file == f"metadata.jsonl line {line}"
    assert all(w in findings[0].message for w in words), findings[0].message


def test_metadata_only_dataset_validates_with_its_captions(tmp_path):
    folder = metadata_only(tmp_path / "ohwx_alice")
    report = validate_dataset(folder)
    assert report.valid, [f.line() for f in report.errors]
    assert report.captions["img_001.png"] == "ohwx, a person in a garden, take 1"
    assert set(report.caption_sources.values()) == {"metadata.jsonl"}


def test_metadata_text_follows_the_trigger_and_size_rules(tmp_path):
    folder = uncaptioned(tmp_path / "ohwx_alice", 2)
    (folder / "metadata.jsonl").write_text(
        jsonl(
            {"file_name": "img_000.png", "text": "a person"}, {"file_name": "img_001.png", "text": "x" * 100}
        )
    )
    report = validate_dataset(folder, max_caption_bytes=50)
    assert report.captions["img_000.png"] == "ohwx, a person"  # caption_policy = prepend, as for .txt
    assert any(w.code == "caption.prepended" and w.file == "metadata.jsonl line 1" for w in report.warnings)
    assert [(e.file, e.code) for e in report.errors] == [("metadata.jsonl line 2", "caption.huge")]


def test_broken_metadata_lines_refuse_the_dataset_naming_each_line(tmp_path):
    folder = metadata_only(tmp_path / "ohwx_alice", 2)
    with (folder / "metadata.jsonl").open("a") as fh:
        fh.write(
            '{"file_name": "ghost.png", "text": "ohwx"}\n{"file_name": "img_000.png", "text": "ohwx again"}\n{oops\n'
        )
    report = validate_dataset(folder)
    assert {(e.file, e.code) for e in report.errors} == {
        ("metadata.jsonl line 3", "metadata.missing"),
        ("metadata.jsonl line 4", "metadata.duplicate"),
        ("metadata.jsonl line 5", "metadata.json"),
    }
    assert "ghost.png" in next(e.message for e in report.errors if e.code == "metadata.missing")


def test_a_txt_sidecar_wins_over_a_metadata_line_with_a_warning(tmp_path):
    folder = metadata_only(tmp_path / "ohwx_alice", 2)
    (folder / "img_001.txt").write_text("ohwx, from the sidecar")
    report = validate_dataset(folder)
    assert report.valid
    assert (
        report.captions["img_001.png"] == "ohwx, from the sidecar"
        and report.caption_sources["img_001.png"] == "file"
    )
    shadowed = [w for w in report.warnings if w.code == "metadata.shadowed"]
    assert (
        len(shadowed) == 1
        and shadowed[0].file == "metadata.jsonl line 2"
        and "img_001.txt" in shadowed[0].message
    )


def test_the_snapshot_holds_ordinary_sidecars_and_a_captions_list(tmp_path):
    folder = metadata_only(tmp_path / "ohwx_alice", 2)
    (folder / "img_001.txt").write_text("ohwx, from the sidecar")
    report = validate_dataset(folder)
    take_snapshot(report, tmp_path / "job", preview_prompt="ohwx", effective={})
    assert (tmp_path / "job/data/0001.txt").read_text() == "ohwx, a person in a garden, take 0\n"
    assert not (tmp_path / "job/data/metadata.jsonl").exists()
    lines = [json.loads(x) for x in (tmp_path / "job/captions.jsonl").read_text().splitlines()]
    assert lines == [
        {
            "file_name": "img_000.png",
            "text": "ohwx, a person in a garden, take 0",
            "source": "metadata.jsonl",
        },
        {"file_name": "img_001.png", "text": "ohwx, from the sidecar", "source": "file"},
    ]


# -- missing_captions, pure ---------------------------------------------------------------------


def test_uncaptioned_images_are_refused_by_default_naming_missing_captions(tmp_path):
    report = validate_dataset(uncaptioned(tmp_path / "ohwx_alice", 2))
    assert [e.code for e in report.errors] == ["caption.missing"] * 2
    for error in report.errors:
        assert "missing_captions" in error.hint and all(
            v in error.hint for v in ('"refuse"', '"trigger"', '"vlm"')
        )


def test_missing_captions_trigger_captions_with_the_trigger_word_and_warns_each(tmp_path):
    folder = uncaptioned(tmp_path / "ohwx_alice", 2)
    (folder / "img_000.txt").write_text("ohwx, a caption")
    (folder / "lora.toml").write_text('missing_captions = "trigger"\n')
    report = validate_dataset(folder)
    assert report.valid and report.captions == {"img_000.png": "ohwx, a caption", "img_001.png": "ohwx"}
    assert report.caption_sources == {"img_000.png": "file", "img_001.png": "trigger"}
    assert [w.file for w in report.warnings if w.code == "caption.trigger_only"] == ["img_001.png"]


def test_missing_captions_vlm_leaves_the_images_for_the_captioner(tmp_path):
    folder = uncaptioned(tmp_path / "ohwx_alice", 2)
    report = validate_dataset(folder, missing_captions="vlm", caption_model="tiny-vlm")
    assert report.valid and report.uncaptioned == ["img_000.png", "img_001.png"] and report.captions == {}


def test_vlm_with_a_captioner_not_on_this_machine_is_refused_saying_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = uncaptioned(tmp_path / "ohwx_alice", 2)
    (folder / "lora.toml").write_text(
        'missing_captions = "vlm"\ncaption_model = "mlx-community/absent-4bit"\n'
    )
    report = validate_dataset(folder)
    assert [(e.file, e.code) for e in report.errors] == [("lora.toml", "caption.model")]
    assert "hf download mlx-community/absent-4bit" in report.errors[0].message


def test_a_bad_missing_captions_value_is_named(tmp_path):
    folder = uncaptioned(tmp_path / "ohwx_alice", 1)
    (folder / "lora.toml").write_text('missing_captions = "guess"\n')
    report = validate_dataset(folder)
    assert any("missing_captions" in e.message and "refuse, trigger, vlm" in e.message for e in report.errors)


def test_missing_captions_setting_is_checked():
    from daemon.settings import SettingsError, resolve

    with pytest.raises(SettingsError, match="missing_captions"):
        resolve(file_values={"missing_captions": "maybe"})


# -- through the daemon -------------------------------------------------------------------------


def _published_captions(d) -> list[dict]:
    path = d.assets / "loras" / "alice.report" / "captions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _wait_end(d, dataset: str = "ohwx_alice", timeout: float = 300) -> dict:
    wait_for(
        lambda: d.job_states().get(dataset) in ("done", "failed"), timeout, interval=0.5, message="job end"
    )
    return next(j for j in d.jobs() if j["dataset"] == dataset)


@pytest.mark.slow
def test_a_dataset_captioned_only_by_metadata_jsonl_trains_on_the_tiny_model(daemon_factory):
    d = daemon_factory(engine="mflux", model="tiny-z-image", extra_env={"LORAD_RAM_GB": "128"}).start()
    folder = metadata_only(d.training_data / "ohwx_alice", 2)
    (folder / "lora.toml").write_text("steps = 2\n")
    before = tree_hash(folder)
    (folder / "READY").touch()
    job = _wait_end(d)
    assert job["state"] == "done", job["error"]
    assert [(c["file_name"], c["source"]) for c in _published_captions(d)] == [
        ("img_000.png", "metadata.jsonl"),
        ("img_001.png", "metadata.jsonl"),
    ]
    assert tree_hash(folder, skip=("DONE",)) == before


def test_an_uncaptioned_dataset_is_refused_by_default_naming_missing_captions(daemon_factory):
    d = daemon_factory().start()
    folder = uncaptioned(d.training_data / "ohwx_alice", 2)
    (folder / "READY").touch()
    job = _wait_end(d, timeout=120)
    assert job["state"] == "failed" and "missing_captions" in job["error"]
    assert "missing_captions" in (folder / "FAILED.txt").read_text()


def test_missing_captions_trigger_trains_with_a_warning_per_image(daemon_factory):
    d = daemon_factory().start()
    folder = uncaptioned(d.training_data / "ohwx_alice", 2)
    (folder / "lora.toml").write_text('missing_captions = "trigger"\n')
    before = tree_hash(folder)
    (folder / "READY").touch()
    job = _wait_end(d, timeout=120)
    assert job["state"] == "done", job["error"]
    warned = [
        e
        for e in d.events()
        if e.get("event") == "dataset.warning" and e.get("code") == "caption.trigger_only"
    ]
    assert sorted(e["file"] for e in warned) == ["img_000.png", "img_001.png"]
    assert _published_captions(d) == [
        {"file_name": "img_000.png", "text": "ohwx", "source": "trigger"},
        {"file_name": "img_001.png", "text": "ohwx", "source": "trigger"},
    ]
    assert tree_hash(folder, skip=("DONE",)) == before


# -- the captioner (missing_captions = "vlm", caption_model = "tiny-vlm") -----------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A woman in a red coat.", "ohwx, a woman in a red coat."),
        ("ohwx stands in a field", "ohwx stands in a field"),
        ('  "Caption: a dog\n on grass"  ', "ohwx, a dog on grass"),
        ("\x00\x01 \n", "ohwx"),
        ("", "ohwx"),
        ("x" * 5000, "ohwx, " + "x" * 600),
    ],
)
def test_a_model_caption_is_one_clean_line_starting_with_the_trigger(raw, expected):
    from daemon.captions import finish_caption

    assert finish_caption(raw, "ohwx") == expected


def test_the_cache_key_changes_with_the_captioner_and_the_image():
    from daemon.captions import cache_key

    keys = {cache_key(m, p, s) for m in ("a", "b") for p in ("p", "q") for s in ("1", "2")}
    assert len(keys) == 8


def test_the_captioner_settings_are_in_the_fingerprint(tmp_path):
    from daemon.intake.snapshot import fingerprint
    from daemon.intake.take import effective_settings
    from daemon.settings import resolve

    report = validate_dataset(
        uncaptioned(tmp_path / "ohwx_alice", 1), missing_captions="vlm", caption_model="tiny-vlm"
    )
    fps = {
        fingerprint(report, effective_settings({"missing_captions": "vlm", "caption_model": m}, resolve()))
        for m in ("tiny-vlm", "mlx-community/other")
    }
    assert len(fps) == 2
    # the default (refuse) adds nothing: datasets trained before the key keep their fingerprint
    assert "missing_captions" not in effective_settings({}, resolve())


def test_a_captioner_that_is_not_here_is_named_with_how_to_fetch_it(tmp_path, monkeypatch):
    from daemon.captions import model_problem

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = model_problem("mlx-community/not-here-4bit")
    assert (
        problem is not None
        and "hf download mlx-community/not-here-4bit" in problem
        and "caption_model" in problem
    )
    assert model_problem("tiny-vlm") is None


def _vlm_daemon(daemon_factory, **env):
    return daemon_factory(engine="mflux", model="tiny-z-image", extra_env={"LORAD_RAM_GB": "128", **env})


def _vlm_dataset(d, images: int = 2) -> Path:
    folder = uncaptioned(d.training_data / "ohwx_alice", images)
    (folder / "img_000.txt").write_text("ohwx, a caption the user wrote")
    (folder / "lora.toml").write_text('missing_captions = "vlm"\ncaption_model = "tiny-vlm"\nsteps = 2\n')
    return folder


@pytest.mark.slow
def test_vlm_captions_uncaptioned_images_then_trains_on_the_tiny_models(daemon_factory):
    d = _vlm_daemon(daemon_factory).start()
    folder = _vlm_dataset(d, 3)
    before = tree_hash(folder)
    (folder / "READY").touch()
    job = _wait_end(d, timeout=400)
    assert job["state"] == "done", job["error"]
    listed = _published_captions(d)
    assert [(c["file_name"], c["source"]) for c in listed] == [
        ("img_000.png", "file"),
        ("img_001.png", "model"),
        ("img_002.png", "model"),
    ]
    assert listed[0]["text"] == "ohwx, a caption the user wrote"
    assert all(c["text"].startswith("ohwx") for c in listed)
    workdir = d.state / "jobs" / job["id"]
    assert (workdir / "data" / "0002.txt").read_text(encoding="utf-8").strip() == listed[1]["text"]
    done = [e for e in d.events() if e.get("event") == "captions.done"]
    assert len(done) == 1 and done[0]["images"] == 2 and done[0]["peak_rss_bytes"] > 0
    assert len(list((d.state / "captions-cache").glob("*.json"))) == 2
    assert tree_hash(folder, skip=("DONE",)) == before  # nothing written into the user's folder


@pytest.mark.slow
def test_vlm_cancel_during_captioning_cancels_and_keeps_the_finished_captions(daemon_factory):
    from conftest import hold_training_at, wait_held

    d = _vlm_daemon(daemon_factory)
    pause = hold_training_at(d, 1)  # the captioner holds after its first caption
    d.start()
    folder = _vlm_dataset(d, 3)
    (folder / "READY").touch()
    wait_held(pause)
    job = d.jobs()[0]
    assert job["state"] == "preparing"
    d.cli("cancel", job["id"], check=True)
    wait_for(lambda: d.job_states().get("ohwx_alice") == "cancelled", 120, interval=0.2, message="cancelled")
    assert len(list((d.state / "captions-cache").glob("*.json"))) == 1  # cached: a retry captions one image


@pytest.mark.slow
def test_write_captions_adds_sidecars_without_overwriting(daemon_factory):
    d = _vlm_daemon(daemon_factory).start()
    folder = _vlm_dataset(d, 2)
    with (folder / "lora.toml").open("a") as fh:
        fh.write("write_captions = true\n")
    (folder / "READY").touch()
    job = _wait_end(d, timeout=400)
    assert job["state"] == "done", job["error"]
    assert (folder / "img_000.txt").read_text() == "ohwx, a caption the user wrote"
    written = (folder / "img_001.txt").read_text(encoding="utf-8").strip()
    assert written == _published_captions(d)[1]["text"]


def test_doctor_says_how_to_fetch_a_missing_captioner(tmp_path, monkeypatch):
    from daemon.captions import doctor_check
    from daemon.settings import resolve
    from engines.base import CheckStatus

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    check = doctor_check(resolve(file_values={"missing_captions": "vlm"}))
    assert check.name == "captioner" and check.status is CheckStatus.WARN
    assert "hf download mlx-community/Qwen3-VL-8B-Instruct-4bit" in check.detail
    assert doctor_check(resolve(file_values={"caption_model": "tiny-vlm"})).status is CheckStatus.OK


def test_the_job_page_lists_each_image_caption_and_its_source(tmp_path):
    import threading

    from starlette.testclient import TestClient

    from daemon.jobs import JobStore
    from daemon.settings import resolve
    from daemon.ui.app import create_app

    s = resolve(env={"LORAD_ASSETS": str(tmp_path / "assets"), "LORAD_REGISTRY": str(tmp_path / "c.json")})
    folder = metadata_only(s.training_data / "ohwx_alice", 2)
    (folder / "img_001.txt").write_text("ohwx, <b>from</b> the sidecar")
    store = JobStore(s.jobs_db, jobs_dir=s.jobs_dir)
    job = store.create(job_id="20260101-000000-alic", dataset_path=folder, name="alice", trigger="ohwx",
                       fingerprint="fp", ready_token=None, settings={"engine": "scripted"})  # fmt: skip
    take_snapshot(validate_dataset(folder), s.jobs_dir / job.id, preview_prompt="ohwx", effective={})
    app = create_app(s, stopping=threading.Event())
    page = TestClient(app, base_url="http://127.0.0.1:8765").get(f"/jobs/{job.id}").text
    assert "ohwx, a person in a garden, take 0</td><td>metadata.jsonl" in page
    assert "ohwx, &lt;b&gt;from&lt;/b&gt; the sidecar</td><td>.txt file" in page  # escaped


@pytest.mark.parametrize(
    "weights_gb, available_gb, fits",
    [(5.8, 16.0, True), (5.8, 7.0, False), (0.0, 2.0, True), (0.0, 1.0, False)],
)
def test_the_captioner_is_planned_within_the_memory_available(weights_gb, available_gb, fits):
    from daemon.captions import GIB, memory_problem

    problem = memory_problem("m", int(weights_gb * GIB), available_gb * GIB)
    assert (problem is None) == fits
    if problem:
        assert "caption_model" in problem and "GB" in problem


def test_uncaptioned_count_reads_the_snapshot(tmp_path):
    from daemon.captions import uncaptioned_count

    folder = uncaptioned(tmp_path / "ohwx_alice", 2)
    take_snapshot(
        validate_dataset(folder, missing_captions="vlm"), tmp_path / "job", preview_prompt="x", effective={}
    )
    assert uncaptioned_count(tmp_path / "job") == 2 and uncaptioned_count(tmp_path / "nothing") == 0
