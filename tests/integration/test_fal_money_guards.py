"""Cloud money safety (issue 20): at most one paid request per job attempt, arguments checked per
exact endpoint before any upload, the right trainer or none, keys that never show, outcomes read
right. Against tests/fal_standin.py, which can drop a submit's reply after accepting it, answer
late, refuse unknown fields per endpoint, let a cancelled request run on, and take multipart
uploads."""

from __future__ import annotations

import json

import pytest
from conftest import wait_for
from fal_standin import FalStandIn

from daemon.sample import make_dataset
from engines.base import (
    EngineContext,
    Failure,
    JobInput,
    Machine,
    PlanError,
    StopToken,
    TrainStatus,
    allow_resubmit,
    get_engine,
    submission_uncertain,
)
from engines.cloud.download import TooLarge, size_bound
from engines.cloud.submission import Next, decide
from engines.fal.engine import zip_snapshot
from engines.fal.service import key_problem, submit_verdict

MACHINE = Machine(total_gb=64, available_gb=64, platform="linux", apple_silicon=False)
KEY = "test-fal-key-DO-NOT-LOG-3f9c"

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "intent, record, resubmit, expected",
    [
        (False, False, False, Next.SUBMIT),
        (True, False, False, Next.UNCERTAIN),  # killed between intent and record, or reply lost
        (True, False, True, Next.RESUBMIT),  # ... and the user said --resubmit
        (True, True, False, Next.REATTACH),
        (False, True, True, Next.REATTACH),
    ],
)
def test_what_an_attempt_does_with_the_cloud(intent, record, resubmit, expected):
    assert decide(intent, record, resubmit) is expected


@pytest.mark.parametrize(
    "code, from_fal, verdict",
    [
        (200, True, "accepted"),
        (422, True, "rejected"),
        (401, False, "rejected"),
        (429, True, "retry"),
        (500, True, "retry"),  # fal's own 5xx: not accepted, never charged
        (502, False, "uncertain"),  # the ingress may have forwarded it
        (504, False, "uncertain"),
        (408, True, "uncertain"),
    ],
)
def test_what_a_submit_answer_means(code, from_fal, verdict):
    assert submit_verdict(code, from_fal) == verdict


@pytest.mark.parametrize(
    "key", ["abc-SECRET\nPART-xyz", "abc SECRETPART", "clé-SECRETPART", "ab\x00SECRETPART"]
)
def test_a_malformed_key_is_refused_without_repeating_it(key):
    problem = key_problem(key, "FAL_KEY")
    assert problem and "FAL_KEY" in problem and "SECRET" not in problem and "PART" not in problem
    assert key_problem("abcd-1234:efgh", "FAL_KEY") is None


@pytest.mark.parametrize(
    "declared, cap, bound", [(100, 1000, 100), (None, 1000, 1000), (1000, 1000, 1000), (1001, 1000, None)]
)
def test_download_bound(declared, cap, bound):
    if bound is None:
        with pytest.raises(TooLarge):
            size_bound(declared, cap)
    else:
        assert size_bound(declared, cap) == bound


def test_the_zip_holds_only_images_and_their_captions(tmp_path):
    import zipfile

    data = make_dataset(tmp_path / "data", images=2, trigger="ohwx")
    for extra in ("preview.txt", "preview2.txt", "preview_alt.txt", "notes.txt"):
        (data / extra).write_text("not a caption")
    zip_snapshot(data, tmp_path / "d.zip")
    names = zipfile.ZipFile(tmp_path / "d.zip").namelist()
    images = [n for n in names if not n.endswith(".txt")]
    assert len(images) == 2 and sorted(n for n in names if n.endswith(".txt")) == sorted(
        n.rsplit(".", 1)[0] + ".txt" for n in images
    )


# -- plan: the right trainer or none, arguments checked before any upload ------------------------


def _engine(tmp_path, **options):
    return get_engine(
        "fal",
        EngineContext(
            state_dir=tmp_path / "state", options={"poll_s": 0.02, "retry_base_s": 0.02, **options}
        ),
    )


def _job(tmp_path, model="tiny-z-image", job_id="j1", **options) -> JobInput:
    data = make_dataset(tmp_path / job_id / "data", images=2, trigger="ohwx")
    return JobInput(job_id, "alice", "ohwx", model, 2, 256, {"steps": 20, **options}, data, "ohwx, portrait")


@pytest.mark.parametrize(
    "model, options, settings, words",
    [
        ("z-image-turbo", {"steps": 50}, {}, r"steps = 50 is outside the trainer's range 100\.\.10000"),
        ("flux-dev", {"learning_rate": 1e-4}, {}, "fal-ai/flux-lora-fast-training takes no learning_rate"),
        ("z-image", {"steps": 1000}, {}, "no trainer for model 'z-image'"),
        (
            "z-image",
            {"steps": 1000},
            {"endpoints": "z-image=fal-ai/z-image-trainer"},
            "trains z-image-turbo, not z-image",
        ),
        ("tiny-z-image", {}, {}, "no trainer for model 'tiny-z-image'.*cannot train on fal"),
        (
            "z-image-turbo",
            {"steps": 1000},
            {"endpoints": "z-image-turbo=fal-ai/flux-2-trainer"},
            "'fal-ai/flux-2-trainer' .* has no schema lorad knows",
        ),
    ],
)
def test_plan_refuses_what_fal_would_refuse_or_misroute(tmp_path, model, options, settings, words):
    with pytest.raises(PlanError, match=words):
        _engine(tmp_path, **settings).plan(job=_job(tmp_path, model, **options), machine=MACHINE)


def test_plan_shows_endpoint_arguments_and_the_minimum_price(tmp_path):
    plan = _engine(tmp_path).plan(job=_job(tmp_path, "z-image-turbo", steps=100), machine=MACHINE)
    text = "\n".join(plan.summary)
    assert "endpoint     fal-ai/z-image-trainer" in text
    assert '"default_caption": "ohwx"' in text and '"steps": 100' in text
    assert "about $0.23" in text and "at least 100 steps ($0.226)" in text


# -- in-process against the stand-in -------------------------------------------------------------


@pytest.fixture
def fal(tmp_path, monkeypatch):
    standin = FalStandIn(tmp_path / "fal")
    for name, value in standin.env(KEY).items():
        monkeypatch.setenv(name, value)
    yield standin
    standin.close()


def _train(engine, tmp_path, job_id="j1"):
    job = _job(tmp_path, job_id=job_id)
    plan = engine.plan(job=job, machine=MACHINE)
    return engine.train(plan=plan, workdir=tmp_path / job_id, progress=lambda p: None, stop=StopToken()), plan


def test_a_dropped_submit_reply_is_one_submission_and_submission_uncertain(fal, tmp_path):
    fal.drop_submit_replies = 1
    engine = _engine(tmp_path, **fal.options())
    result, plan = _train(engine, tmp_path)
    assert result.status is TrainStatus.FAILED and result.failure is Failure.SUBMISSION_UNCERTAIN
    assert "submission uncertain" in result.error and "lorad retry j1 --resubmit" in result.error
    assert "fal's dashboard" in result.error
    assert len(fal.submissions) == 1 and submission_uncertain(tmp_path / "j1")
    ledger = (tmp_path / "state" / "fal" / "submitted.jsonl").read_text().splitlines()
    assert len(ledger) == 1  # the POST that may have reached fal is counted

    again = engine.train(
        plan=plan, workdir=tmp_path / "j1", progress=lambda p: None, stop=StopToken()
    )  # a plain retry
    assert again.failure is Failure.SUBMISSION_UNCERTAIN and len(fal.submissions) == 1

    allow_resubmit(tmp_path / "j1")  # lorad retry j1 --resubmit
    paid = engine.train(plan=plan, workdir=tmp_path / "j1", progress=lambda p: None, stop=StopToken())
    assert paid.status is TrainStatus.COMPLETED, paid.error
    assert len(fal.submissions) == 2 and not submission_uncertain(tmp_path / "j1")
    assert list((tmp_path / "j1" / "fal").glob("intent.uncertain.*.json"))  # kept for the user


def test_a_submit_slower_than_timeout_is_uncertain_not_resent(fal, tmp_path):
    fal.submit_delay_s = 2.5
    result, _ = _train(_engine(tmp_path, timeout_s=1, **fal.options()), tmp_path)
    assert result.failure is Failure.SUBMISSION_UNCERTAIN, result.error
    assert len(fal.submissions) == 1


def test_completed_with_a_failing_result_fails_with_fals_detail(fal, tmp_path):
    fal.fail = {"result": [500] * 1000}
    result, _ = _train(_engine(tmp_path, result_timeout_s=1, **fal.options()), tmp_path)
    assert (
        result.status is TrainStatus.FAILED
        and "COMPLETED but its result could not be fetched" in result.error
    )
    assert "stand-in result failure 500" in result.error


def test_retry_after_a_remote_failure_archives_the_request_and_submits_anew(fal, tmp_path):
    fal.request_errors["req-0001"] = "Training failed on the runner"  # that request only
    engine = _engine(tmp_path, **fal.options())
    result, plan = _train(engine, tmp_path)
    assert result.status is TrainStatus.FAILED and "Training failed on the runner" in result.error
    assert list((tmp_path / "j1" / "fal").glob("request.failed.*.json"))
    again = engine.train(plan=plan, workdir=tmp_path / "j1", progress=lambda p: None, stop=StopToken())
    assert again.status is TrainStatus.COMPLETED, again.error
    assert len(fal.submissions) == 2


def test_a_large_zip_takes_the_multipart_path_with_a_lifecycle(fal, tmp_path, monkeypatch):
    import fal_client.client as fc

    monkeypatch.setattr(fc, "MULTIPART_THRESHOLD", 1000)  # instead of a 100 MB dataset
    monkeypatch.setattr(fc, "MULTIPART_CHUNK_SIZE", 1500)
    result, _ = _train(_engine(tmp_path, **fal.options()), tmp_path)
    assert result.status is TrainStatus.COMPLETED, result.error
    assert fal.multipart and len(next(iter(fal.multipart.values()))) > 1
    assert fal.uploads[0] == (tmp_path / "j1" / "fal" / "dataset.zip").read_bytes()
    assert json.loads(fal.lifecycles[0])["expiration_duration_seconds"] == 3 * 86400


def test_key_id_and_secret_work_as_fal_client_takes_them(fal, tmp_path, monkeypatch):
    monkeypatch.delenv("FAL_KEY")
    monkeypatch.setenv("FAL_KEY_ID", "key-id-1")
    monkeypatch.setenv("FAL_KEY_SECRET", "key-secret-2")
    result, _ = _train(_engine(tmp_path, **fal.options()), tmp_path)
    assert result.status is TrainStatus.COMPLETED, result.error
    assert "Key key-id-1:key-secret-2" in fal.auth_headers


def test_a_junk_result_is_refused_at_its_announced_size(fal, tmp_path):
    fal.lora = b"\0" * (3 * 1024 * 1024)
    fal.lora_size = 1000  # the result declares 1000 bytes; 3 MB come
    result, _ = _train(_engine(tmp_path, **fal.options()), tmp_path)
    assert result.status is TrainStatus.FAILED and "above 1000 allowed" in result.error
    assert not (tmp_path / "j1" / "fal" / "download.safetensors").exists()


def test_a_malformed_key_sends_nothing_and_is_never_repeated(fal, tmp_path, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "fal-SECRET\nPART-0123")
    result, _ = _train(_engine(tmp_path, **fal.options()), tmp_path)
    assert result.status is TrainStatus.FAILED and "not printable ASCII" in result.error
    assert "SECRET" not in result.error and fal.submissions == [] and fal.uploads == []


def test_the_standin_refuses_unknown_fields_per_endpoint(fal, tmp_path):
    import ssl

    import httpx

    response = httpx.post(
        f"{fal.base}/fal-ai/flux-lora-fast-training",
        json={"images_data_url": "u", "learning_rate": 1e-4},
        verify=ssl.create_default_context(cafile=str(fal.ca_file)),
    )
    assert response.status_code == 422 and fal.submissions == []


# -- a real daemon ---------------------------------------------------------------------------------


def _daemon(daemon_factory, fal: FalStandIn, key: str = KEY, **env):
    return daemon_factory(
        engine="fal",
        extra_env={
            **fal.env(key),
            "LORAD_ENGINES_FAL_POLL_S": "0.05",
            "LORAD_ENGINES_FAL_RETRY_BASE_S": "0.05",
            **env,
        },
    )


def _drop(d, name: str):
    folder = make_dataset(d.training_data / name, images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    return folder


@pytest.mark.slow
def test_daemon_shows_submission_uncertain_and_retry_needs_resubmit(daemon_factory, fal):
    fal.drop_submit_replies = 1
    d = _daemon(daemon_factory, fal).start()
    folder = _drop(d, "ohwx_una")
    wait_for(lambda: d.job_states().get("ohwx_una") == "failed", 120, message="uncertain job failed")
    job = d.jobs()[0]
    assert len(fal.submissions) == 1
    assert "submission uncertain" in d.cli("status").stdout
    assert "submission uncertain" in (folder / "FAILED.txt").read_text()
    assert job["remote"].get("error_kind") == "submission_uncertain"
    refused = d.cli("retry", job["id"])
    assert refused.returncode != 0 and f"lorad retry {job['id']} --resubmit" in refused.stderr
    assert len(fal.submissions) == 1
    assert d.cli("retry", job["id"], "--resubmit").returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_una") in ("done", "failed"), 300, message="resubmitted job")
    assert d.jobs()[0]["state"] == "done", d.jobs()[0]["error"]
    assert len(fal.submissions) == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, paid, final",
    [
        ("before_intent", 1, "done"),  # nothing sent: the restart submits, once
        ("after_intent", 0, "failed"),  # maybe sent (here: not): uncertain, never resent
        ("after_accept", 1, "failed"),  # fal accepted, lorad never recorded it: uncertain
        ("after_record", 1, "done"),  # recorded: the restart re-attaches
    ],
)
def test_kill9_around_the_submit_never_pays_twice(daemon_factory, fal, point, paid, final):
    d = _daemon(daemon_factory, fal, TEST_LORAD_KILL_AT=point).start()
    _drop(d, f"ohwx_{point}")
    d.wait(120)  # the daemon killed itself (SIGKILL) at the point
    d.env.pop("TEST_LORAD_KILL_AT")
    d.start()
    name = f"ohwx_{point}"
    wait_for(
        lambda: d.job_states().get(name) in ("done", "failed"), 300, message=f"job after kill at {point}"
    )
    job = d.jobs()[0]
    assert job["state"] == final, job["error"]
    assert len(fal.submissions) == paid
    if final == "failed":
        assert "submission uncertain" in job["error"]
        assert d.cli("retry", job["id"]).returncode != 0 and len(fal.submissions) == paid


@pytest.mark.slow
def test_daemon_with_a_malformed_key_never_shows_it(daemon_factory, fal):
    secret = "fal-SECRETKEYPART\nNEXTLINE-0123"
    d = _daemon(daemon_factory, fal, key=secret).start()
    folder = _drop(d, "ohwx_key")
    wait_for(lambda: d.job_states().get("ohwx_key") == "failed", 120, message="bad key job failed")
    assert "not printable ASCII" in d.jobs()[0]["error"] and fal.submissions == []
    d.stop()
    texts = [d.cli("status").stdout, d.cli("status", "--json", "--all").stdout]
    texts += [
        p.read_text(errors="replace") for p in folder.iterdir() if p.suffix in (".txt", "") and p.is_file()
    ]
    texts += [p.read_text(errors="replace") for p in d.root.glob("daemon-*.out")]
    texts += [p.read_text(errors="replace") for p in (d.state / "logs").glob("*") if p.is_file()]
    texts += [
        p.read_text(errors="replace")
        for p in (d.state / "jobs").rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", "")
    ]
    for text in texts:
        for part in ("SECRETKEYPART", "NEXTLINE-0123"):
            assert part not in text


def test_lorad_plan_honours_the_datasets_engine_and_shows_the_cloud_request(tmp_path):
    import os
    import subprocess
    import sys

    folder = make_dataset(tmp_path / "training_data" / "ohwx_plan", images=2, trigger="ohwx")
    (folder / "READY").write_text('engine = "fal"\nmodel = "z-image-turbo"\nsteps = 100\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAD_", "FAL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), "plan", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "engine       fal" in done.stdout and "endpoint     fal-ai/z-image-trainer" in done.stdout
    assert '"steps": 100' in done.stdout and "at least 100 steps ($0.226)" in done.stdout
    (folder / "READY").write_text('engine = "fal"\nmodel = "z-image-turbo"\nsteps = 50\n')
    refused = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), "plan", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert refused.returncode != 0 and "100..10000" in refused.stderr


@pytest.mark.parametrize("runs_on, outcome", [(False, "stopped"), (True, "finished_anyway")])
def test_cancel_learns_what_fal_did(fal, tmp_path, runs_on, outcome):
    from engines.base import read_cancel_outcome

    fal.hold.clear()  # IN_PROGRESS until set
    fal.cancel_runs_on = runs_on  # fal only signals the runner: this one trains on and bills
    engine = _engine(tmp_path, cancel_wait_s=30, **fal.options())
    job = _job(tmp_path)
    plan = engine.plan(job=job, machine=MACHINE)
    stop = StopToken()

    def progress(p):
        if p.step and not stop.requested():
            stop.stop("cancel")
            fal.hold.set()  # the runner gets to its end

    result = engine.train(plan=plan, workdir=tmp_path / "j1", progress=progress, stop=stop)
    assert result.status is TrainStatus.STOPPED and fal.cancels == ["req-0001"]
    assert read_cancel_outcome(tmp_path / "j1") == outcome
    again = engine.train(
        plan=plan, workdir=tmp_path / "j1", progress=lambda p: None, stop=StopToken()
    )  # lorad retry
    assert again.status is TrainStatus.COMPLETED, again.error
    if outcome == "finished_anyway":  # paid once: the retry publishes it without paying again
        assert (tmp_path / "j1" / "adapter.safetensors").is_file() and len(fal.submissions) == 1
    else:  # stopped: the record went aside, the retry submits anew
        assert len(fal.submissions) == 2


def test_every_configured_secret_is_scrubbed_from_every_log_line(tmp_path, monkeypatch):
    import logging
    from types import SimpleNamespace

    from daemon import logs

    monkeypatch.setenv("FAL_KEY", "falkey-SECRET-1234")
    settings = SimpleNamespace(
        ui_token="uitoken-SECRET-5678",
        queue="redis://:redispass-SECRET@127.0.0.1:6379/0",
        notify=("ntfy://ntfytopic-SECRET-9",),
    )
    log_file = tmp_path / "lorad.jsonl"
    logs.configure(log_file=log_file, console=False, secrets=logs.secrets_of(settings))
    try:
        log = logs.get_logger()
        log.info("x.event", detail="key falkey-SECRET-1234 token uitoken-SECRET-5678", url=settings.notify[0])
        try:
            raise RuntimeError("Authorization: Key falkey-SECRET-1234 redispass-SECRET")
        except RuntimeError:
            log.exception("x.failed")
        logging.getLogger("httpx").warning("HTTP Request: %s", "Key falkey-SECRET-1234")
        logging.getLogger("fal_client").warning("Upload failed: ntfy://ntfytopic-SECRET-9")
        text = log_file.read_text()
    finally:
        logs.configure(console=False)
    assert "x.event" in text and "x.failed" in text and "[redacted]" in text
    for secret in ("falkey-SECRET-1234", "uitoken-SECRET-5678", "redispass-SECRET", "ntfytopic-SECRET-9"):
        assert secret not in text


@pytest.mark.slow
def test_a_cancel_given_while_lorad_is_down_is_carried_out_on_fal_at_the_next_start(daemon_factory, fal):
    fal.hold.clear()  # the request trains until told
    d = _daemon(daemon_factory, fal, LORAD_ENGINES_FAL_CANCEL_WAIT_S="5").start()
    _drop(d, "ohwx_down")
    wait_for(
        lambda: "training on fal.ai" in ((d.jobs() or [{}])[0].get("note") or ""),
        120,
        message="remote training",
    )
    d.stop()  # SIGTERM: the request keeps running on fal
    job_id = d.jobs()[0]["id"]
    said = d.cli("cancel", job_id)
    assert said.returncode == 0 and "cancelled there then" in said.stdout, said.stdout
    assert fal.cancels == []
    d.start()
    wait_for(lambda: fal.cancels == ["req-0001"], 60, message="the request cancelled on fal at start")
    wait_for(lambda: d.log_has("fal.cancel_outcome", outcome="stopped"), 60, message="cancel outcome")
    assert d.job_states()["ohwx_down"] == "cancelled" and len(fal.submissions) == 1


@pytest.mark.parametrize(
    "keys, layout",
    [
        (["transformer.layers.0.attention.to_q.lora_A.weight"], "diffusers"),
        (["base_model.model.layers.0.attention.to_q.lora_B.default.weight"], "diffusers"),
        (["diffusion_model.layers.0.attention.qkv.lora_down.weight"], "passthrough"),  # ComfyUI fused
        (["lora_unet_layers_0_attention_to_q.lora_down.weight"], "passthrough"),  # kohya
        (["diffusion_model.layers.0.attention.to_q.diff", "x.diff_b"], "passthrough"),
    ],
)
def test_result_layout_table(keys, layout):
    from engines.fal.convert import layout_of

    assert layout_of(keys) == layout


def test_a_passthrough_result_mflux_cannot_map_is_refused_with_its_keys_and_kept(fal, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    odd = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_nowhere_block_0.lora_down.weight": np.zeros((4, 192), np.float32),
            "lora_unet_nowhere_block_0.lora_up.weight": np.zeros((192, 4), np.float32),
        },
        str(odd),
    )
    fal.lora = odd.read_bytes()
    result, _ = _train(_engine(tmp_path, **fal.options()), tmp_path)
    assert result.status is TrainStatus.FAILED and "does not load in mflux" in result.error
    assert "lora_unet_nowhere_block_0" in result.error and "fal's file is kept" in result.error
    assert (tmp_path / "j1" / "fal" / "download.safetensors").read_bytes() == fal.lora
    assert not (tmp_path / "j1" / "adapter.safetensors").exists()
