"""The Replicate cloud engine against a local stand-in of Replicate's API
(tests/replicate_standin.py), through the official client; nothing here reaches Replicate."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import wait_for
from replicate_standin import DESTINATION, STANDIN_TRAINER, TOKEN, ReplicateStandIn, weights_tar

from daemon.sample import make_dataset
from engines.base import (
    EngineContext,
    Failure,
    JobInput,
    Machine,
    PlanError,
    StopToken,
    TrainStatus,
    get_engine,
)
from engines.cloud.archive import BadArchive, extract_lora, member_problem, pick_lora
from engines.replicate import trainers
from engines.replicate.engine import steps_from_logs
from engines.replicate.service import create_verdict, token_problem

MACHINE = Machine(total_gb=64, available_gb=64, platform="linux", apple_silicon=False)

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, verdict",
    [
        (201, "accepted"),
        (429, "retry"),
        (422, "rejected"),
        (404, "rejected"),
        (408, "uncertain"),
        (500, "uncertain"),
        (502, "uncertain"),
    ],
)
def test_what_a_create_answer_means(code, verdict):
    assert create_verdict(code) == verdict


@pytest.mark.parametrize("token", ["r8_abc\ndef0123", "r8_ secret 1234", "r8_abcé12345", "short"])
def test_a_malformed_token_is_refused_without_repeating_it(token):
    problem = token_problem(token, "REPLICATE_API_TOKEN")
    assert problem and "REPLICATE_API_TOKEN" in problem and token not in problem
    assert token_problem(TOKEN, "x") is None


@pytest.mark.parametrize(
    "name, bad",
    [
        ("output/lora.safetensors", False),
        ("/etc/passwd", True),
        ("a/../../x", True),
        ("C:/x", True),
        ("a\\b", True),
    ],
)
def test_archive_member_path_rules(name, bad):
    assert (member_problem(name) is not None) == bad


def test_pick_lora_table():
    assert pick_lora(["out/config.yaml", "out/lora.safetensors"]) == "out/lora.safetensors"
    assert pick_lora(["x/only.safetensors"]) == "x/only.safetensors"
    with pytest.raises(BadArchive):
        pick_lora(["a.safetensors", "b.safetensors"])
    with pytest.raises(BadArchive):
        pick_lora(["config.yaml"])


def _tar(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


def test_an_archive_climbing_out_or_linking_is_refused_and_nothing_written(tmp_path):
    climb = tarfile.TarInfo("../../evil.safetensors")
    climb.size = 3
    link = tarfile.TarInfo("lora.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for members in ([climb], [link]):
        archive = tmp_path / "w.tar"
        archive.write_bytes(_tar(members))
        with pytest.raises(BadArchive):
            extract_lora(archive, tmp_path / "out.safetensors", 1 << 20)
        assert (
            not (tmp_path / "out.safetensors").exists()
            and not (tmp_path.parent / "evil.safetensors").exists()
        )


def test_an_archive_above_the_cap_is_refused(tmp_path):
    from engines.cloud.download import TooLarge

    archive = tmp_path / "w.tar"
    archive.write_bytes(weights_tar(b"y" * 5000))
    with pytest.raises(TooLarge):
        extract_lora(archive, tmp_path / "out.safetensors", 1000)
    assert not (tmp_path / "out.safetensors").exists()


def test_steps_from_replicate_logs():
    assert steps_from_logs("x\nflux_train_replicate:  12%|#  | 120/1000 [00:10<01:00]\n", 1000) == 120
    assert steps_from_logs("loading\n", 1000) is None


def test_only_flux_dev_has_a_known_trainer_and_the_price_is_hardware_time():
    assert trainers.TRAINERS == {"flux-dev": "ostris/flux-dev-lora-trainer"}
    assert trainers.usd_per_step(1.0) == trainers.H100_USD_PER_SECOND == 0.001525


# -- the engine in-process -----------------------------------------------------------------------


@pytest.fixture
def rep(tmp_path, monkeypatch):
    standin = ReplicateStandIn(tmp_path / "replicate")
    for name, value in standin.env().items():
        monkeypatch.setenv(name, value)
    yield standin
    standin.close()


def _engine(tmp_path, standin=None, daily=10, **options):
    base = standin.options() if standin else {}
    return get_engine(
        "replicate",
        EngineContext(
            state_dir=tmp_path / "state",
            options={
                "poll_s": 0.02,
                "retry_base_s": 0.02,
                "cancel_wait_s": 5,
                "daily_jobs": daily,
                **base,
                **options,
            },
        ),
    )


def _job(tmp_path, model="tiny-z-image", **options) -> JobInput:
    data = make_dataset(tmp_path / "job" / "data", images=2, trigger="ohwx")
    return JobInput("j1", "alice", "ohwx", model, 2, 256, {"steps": 20, **options}, data, "ohwx, portrait")


def _train(engine, tmp_path, stop=None, progress=None):
    plan = engine.plan(job=_job(tmp_path), machine=MACHINE)
    return engine.train(
        plan=plan, workdir=tmp_path / "job", progress=progress or (lambda p: None), stop=stop or StopToken()
    )


@pytest.mark.parametrize(
    "model, options, words",
    [
        ("z-image-turbo", {"destination": DESTINATION}, "no trainer for model 'z-image-turbo'"),
        ("tiny-z-image", {"destination": DESTINATION}, "no trainer for model 'tiny-z-image'"),
        ("flux-dev", {}, 'destination = "owner/model"'),
        ("flux-dev", {"destination": "Not A Model"}, 'write "owner/model"'),
    ],
)
def test_plan_refuses_models_without_a_trainer_and_a_missing_destination(tmp_path, model, options, words):
    with pytest.raises(PlanError) as refused:
        _engine(tmp_path, **options).plan(job=_job(tmp_path, model=model), machine=MACHINE)
    assert words in str(refused.value)


def test_plan_says_the_cost_is_an_estimate_and_guards_it(tmp_path):
    plan = _engine(tmp_path, destination=DESTINATION).plan(
        job=_job(tmp_path, model="flux-dev", steps=1000), machine=MACHINE
    )
    text = "\n".join(plan.summary)
    assert "an estimate" in text and "ostris/flux-dev-lora-trainer" in text and DESTINATION in text
    assert plan.config["cost_usd"] == pytest.approx(1000 * trainers.SECONDS_PER_STEP * 0.001525, abs=0.01)
    with pytest.raises(PlanError, match="max_cost_usd"):
        _engine(tmp_path, destination=DESTINATION, max_cost_usd=0.5).plan(
            job=_job(tmp_path, model="flux-dev", steps=1000), machine=MACHINE
        )


def test_trains_end_to_end_with_one_create(rep, tmp_path):
    seen = []
    result = _train(_engine(tmp_path, rep), tmp_path, progress=seen.append)
    assert result.status is TrainStatus.COMPLETED, result.error
    assert len(rep.creates) == 1 and rep.creates[0]["destination"] == DESTINATION
    assert rep.creates[0]["model"] == STANDIN_TRAINER and rep.creates[0]["input"]["steps"] == 20
    assert rep.creates[0]["input"]["input_images"].startswith(rep.base + "/v1/files/")
    assert len(rep.uploads) == 1 and f"Bearer {TOKEN}" in rep.auth_headers
    assert any(p.note and "training on Replicate (step" in p.note for p in seen)
    assert (tmp_path / "job" / "adapter.safetensors").is_file()
    record = json.loads((tmp_path / "job" / "replicate" / "request.json").read_text())
    assert record["request_id"] == "tr0001"


def test_a_dropped_create_reply_is_one_training_and_submission_uncertain(rep, tmp_path):
    rep.drop_create_replies = 1
    engine = _engine(tmp_path, rep)
    result = _train(engine, tmp_path)
    assert result.status is TrainStatus.FAILED and result.failure is Failure.SUBMISSION_UNCERTAIN
    assert "submission uncertain" in result.error and "Replicate" in result.error
    again = _train(_engine(tmp_path, rep), tmp_path)  # a restart: never sent again by itself
    assert again.failure is Failure.SUBMISSION_UNCERTAIN and len(rep.creates) == 1


def test_a_5xx_on_create_is_uncertain_and_a_429_is_retried(rep, tmp_path):
    rep.fail = {"create": [429]}
    assert _train(_engine(tmp_path, rep), tmp_path).status is TrainStatus.COMPLETED
    assert len(rep.creates) == 1


def test_stop_leaves_the_training_running_and_the_next_train_reattaches(rep, tmp_path):
    rep.hold.clear()
    stop = StopToken()
    stopped = _train(_engine(tmp_path, rep), tmp_path, stop, lambda p: p.step and stop.stop("shutdown"))
    assert stopped.status is TrainStatus.STOPPED and rep.cancels == []
    rep.hold.set()
    done = _train(_engine(tmp_path, rep), tmp_path)
    assert done.status is TrainStatus.COMPLETED, done.error
    assert len(rep.creates) == 1


@pytest.mark.parametrize("runs_on, outcome", [(False, "stopped"), (True, "finished_anyway")])
def test_cancel_cancels_on_replicate_and_learns_the_outcome(rep, tmp_path, runs_on, outcome):
    rep.hold.clear()
    rep.cancel_runs_on = runs_on
    stop = StopToken()

    def on_progress(p):
        if p.step:
            rep.hold.set() if runs_on else None
            stop.stop("cancel")

    result = _train(_engine(tmp_path, rep), tmp_path, stop, on_progress)
    assert result.status is TrainStatus.STOPPED and rep.cancels == ["tr0001"]
    said = json.loads((tmp_path / "job" / "CANCEL_OUTCOME.json").read_text())
    assert said["outcome"] == outcome


def test_missing_destination_on_replicate_is_refused_before_paying(rep, tmp_path):
    rep.models.discard(DESTINATION)
    result = _train(_engine(tmp_path, rep), tmp_path)
    assert result.status is TrainStatus.FAILED and "was not found on Replicate" in result.error
    assert rep.creates == [] and rep.uploads == []


def test_remote_failure_fails_with_replicates_text(rep, tmp_path):
    rep.remote_error = "CUDA out of memory"
    result = _train(_engine(tmp_path, rep), tmp_path)
    assert result.status is TrainStatus.FAILED and "CUDA out of memory" in result.error


def test_a_hostile_archive_is_refused(rep, tmp_path):
    info = tarfile.TarInfo("../lora.safetensors")
    info.size = 3
    rep.weights = _tar([info])
    result = _train(_engine(tmp_path, rep), tmp_path)
    assert result.status is TrainStatus.FAILED and "unsafe path" in result.error


def test_no_token_names_replicate_api_token(rep, tmp_path, monkeypatch):
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    result = _train(_engine(tmp_path, rep), tmp_path)
    assert result.status is TrainStatus.FAILED and "REPLICATE_API_TOKEN" in result.error and rep.creates == []


def test_a_malformed_token_sends_nothing_and_is_never_repeated(rep, tmp_path, monkeypatch):
    secret = "r8_SECRET\nNEXTLINE0123"
    monkeypatch.setenv("REPLICATE_API_TOKEN", secret)
    result = _train(_engine(tmp_path, rep), tmp_path)
    assert result.status is TrainStatus.FAILED and "malformed" in result.error
    assert "SECRET" not in result.error and rep.auth_headers == set()


def test_daily_cap_per_cloud_engine(rep, tmp_path):
    assert _train(_engine(tmp_path, rep, daily=1), tmp_path).status is TrainStatus.COMPLETED
    import shutil

    shutil.rmtree(tmp_path / "job")
    second = _train(_engine(tmp_path, rep, daily=1), tmp_path)
    assert (
        second.status is TrainStatus.FAILED and "cloud_daily_jobs" in second.error and len(rep.creates) == 1
    )


# -- a real daemon ---------------------------------------------------------------------------------


def _daemon(daemon_factory, rep: ReplicateStandIn, token=TOKEN, **env):
    return daemon_factory(
        engine="replicate",
        extra_env={
            **rep.env(token),
            "LORAD_ENGINES_REPLICATE_POLL_S": "0.05",
            "LORAD_ENGINES_REPLICATE_RETRY_BASE_S": "0.05",
            **env,
        },
    )


def _drop(d, name: str):
    folder = make_dataset(d.training_data / name, images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    return folder


@pytest.mark.slow
def test_daemon_publishes_a_replicate_lora_and_never_shows_the_token(daemon_factory, rep):
    from daemon.publish import metadata_of

    d = _daemon(daemon_factory, rep).start()
    folder = _drop(d, "ohwx_alice")
    wait_for(lambda: d.job_states().get("ohwx_alice") in ("done", "failed"), 300, message="replicate job")
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    assert job["remote"]["request_id"] == "tr0001"
    meta = metadata_of(d.assets / "loras" / "alice.safetensors")
    assert (meta["lorad.engine"], meta["lorad.replicate_training_id"]) == ("replicate", "tr0001")
    assert len(rep.creates) == 1
    for text in (
        d.cli("status").stdout,
        (d.state / "logs" / "lorad.jsonl").read_text(),
        (folder / "DONE").read_text(),
    ):
        assert TOKEN not in text
    assert d.log_has("replicate.submitted", training_id="tr0001")


@pytest.mark.slow
def test_no_token_fails_the_job_naming_replicate_api_token_and_the_daemon_stays_up(
    daemon_factory, rep, monkeypatch
):
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    d = _daemon(daemon_factory, rep, token=None).start()
    folder = _drop(d, "ohwx_dave")
    wait_for(lambda: d.job_states().get("ohwx_dave") == "failed", 120, message="failed without a token")
    assert "REPLICATE_API_TOKEN" in d.jobs()[0]["error"]
    assert "REPLICATE_API_TOKEN" in (folder / "FAILED.txt").read_text()
    assert rep.creates == [] and d.proc.poll() is None


@pytest.mark.slow
def test_daemon_dropped_create_reply_is_uncertain_and_never_a_second_training(daemon_factory, rep):
    rep.drop_create_replies = 1
    d = _daemon(daemon_factory, rep).start()
    folder = _drop(d, "ohwx_una")
    wait_for(lambda: d.job_states().get("ohwx_una") == "failed", 120, message="uncertain job failed")
    job = d.jobs()[0]
    assert "submission uncertain" in (folder / "FAILED.txt").read_text()
    assert d.cli("retry", job["id"]).returncode != 0 and len(rep.creates) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, paid, final",
    [
        ("before_intent", 1, "done"),
        ("after_intent", 0, "failed"),
        ("after_accept", 1, "failed"),
        ("after_record", 1, "done"),
    ],
)
def test_kill9_around_the_create_never_pays_twice(daemon_factory, rep, point, paid, final):
    d = _daemon(daemon_factory, rep, TEST_LORAD_KILL_AT=point).start()
    name = f"ohwx_{point}"
    _drop(d, name)
    d.wait(120)
    d.env.pop("TEST_LORAD_KILL_AT")
    d.start()
    wait_for(
        lambda: d.job_states().get(name) in ("done", "failed"), 300, message=f"job after kill at {point}"
    )
    job = d.jobs()[0]
    assert job["state"] == final, job["error"]
    assert len(rep.creates) == paid


@pytest.mark.parametrize(
    "value, engine",
    [
        ("true", "fal"),
        ("false", None),
        ("replicate", "replicate"),
        ("fal", "fal"),
        ("off", None),
        (True, "fal"),
    ],
)
def test_cloud_fallback_names_the_cloud_engine_fal_by_default(value, engine):
    from daemon.pipeline import fallback_engine
    from daemon.settings import Settings, resolve

    assert fallback_engine(resolve(file_values={"cloud_fallback": value})) == engine
    if isinstance(value, str):
        assert fallback_engine(resolve(env={"LORAD_CLOUD_FALLBACK": value})) == engine
    assert fallback_engine(Settings()) is None and fallback_engine(resolve()) is None


def test_cloud_fallback_refuses_an_engine_that_is_not_a_cloud():
    from daemon.settings import SettingsError, resolve

    with pytest.raises(SettingsError, match="cloud_fallback"):
        resolve(file_values={"cloud_fallback": "mflux"})


@pytest.mark.slow
def test_cloud_fallback_replicate_takes_a_job_no_local_plan_fits(daemon_factory, rep):
    d = _daemon(daemon_factory, rep, LORAD_RAM_GB="0.01", LORAD_CLOUD_FALLBACK="replicate")
    d.env["LORAD_ENGINE"] = "mflux"
    d.start()
    _drop(d, "ohwx_erin")
    wait_for(lambda: d.job_states().get("ohwx_erin") in ("done", "failed"), 300, message="fallback job")
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    assert job["settings"]["engine"] == "replicate" and job["settings"]["fallback_from"] == "mflux"
    assert (
        d.log_has("job.cloud_fallback", from_engine="mflux", to_engine="replicate") and len(rep.creates) == 1
    )


def test_flux_dev_is_rendered_by_mflux_but_never_trained_there(tmp_path):
    from engines.mflux.device import Device
    from engines.mflux.weights import weights_check

    local = get_engine("mflux", EngineContext(state_dir=tmp_path / "state"))
    local.device = Device("metal", "Apple M4 Max", total_gb=64)
    job = _job(tmp_path, model="flux-dev")
    with pytest.raises(PlanError) as refused:
        local.plan(job=job, machine=MACHINE)
    assert "cannot train flux-dev" in str(refused.value) and "replicate" in str(refused.value)
    render = local.render_plan(job, MACHINE)
    assert render.config["model"] == "dev" and render.config["steps"] == 25
    check = weights_check("flux-dev", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert "black-forest-labs/FLUX.1-dev" in check.detail


@pytest.mark.slow
def test_status_shows_the_step_and_lorad_cancel_cancels_on_replicate(daemon_factory, rep):
    rep.hold.clear()
    d = _daemon(daemon_factory, rep).start()
    _drop(d, "ohwx_carol")
    wait_for(
        lambda: "training on Replicate (step" in ((d.jobs() or [{}])[0].get("note") or ""),
        120,
        message="remote training with a step",
    )
    status = d.cli("status").stdout
    assert "training on Replicate (step" in status, status
    said = d.cli("cancel", d.jobs()[0]["id"], timeout=120)
    assert said.returncode == 0 and "the training on the cloud stopped" in said.stdout, said.stdout
    wait_for(lambda: d.job_states().get("ohwx_carol") == "cancelled", 60, message="cancelled")
    assert rep.cancels == ["tr0001"] and not (d.assets / "loras" / "carol.safetensors").exists()


def test_lorad_plan_shows_the_trainer_destination_and_an_estimate(tmp_path):
    import os
    import subprocess
    import sys

    folder = make_dataset(tmp_path / "training_data" / "ohwx_plan", images=2, trigger="ohwx")
    (folder / "READY").write_text('engine = "replicate"\nmodel = "flux-dev"\nsteps = 1000\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAD_", "REPLICATE_"))}

    def plan(**extra):
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "--assets", str(tmp_path), "plan", str(folder)],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=120,
        )

    refused = plan()
    assert refused.returncode != 0 and 'destination = "owner/model"' in refused.stderr, refused.stderr
    done = plan(LORAD_ENGINES_REPLICATE_DESTINATION=DESTINATION)
    assert done.returncode == 0, done.stderr
    assert "ostris/flux-dev-lora-trainer" in done.stdout and DESTINATION in done.stdout
    assert "an estimate" in done.stdout and '"steps": 1000' in done.stdout


def test_a_cancel_given_while_lorad_was_down_is_carried_out_at_the_next_start(rep, tmp_path):
    rep.hold.clear()
    stop = StopToken()
    stopped = _train(_engine(tmp_path, rep), tmp_path, stop, lambda p: p.step and stop.stop("shutdown"))
    assert stopped.status is TrainStatus.STOPPED and rep.cancels == []
    assert _engine(tmp_path, rep).cancel_remote(tmp_path / "job") == "stopped"
    assert rep.cancels == ["tr0001"] and not (tmp_path / "job" / "replicate" / "request.json").exists()


def test_the_token_is_a_configured_secret_scrubbed_from_logs(monkeypatch):
    from daemon.logs import secrets_of
    from daemon.settings import Settings

    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    assert TOKEN in secrets_of(Settings())


def test_steps_outside_the_trainers_range_are_refused_at_plan_time(tmp_path):
    with pytest.raises(PlanError) as refused:
        _engine(tmp_path, destination=DESTINATION).plan(
            job=_job(tmp_path, model="flux-dev", steps=7000), machine=MACHINE
        )
    assert "3..6000" in str(refused.value)


def test_an_input_replicate_refuses_fails_the_job_with_its_detail_and_is_not_uncertain(rep, tmp_path):
    from replicate_standin import ACCEPTED_INPUTS

    ACCEPTED_INPUTS[STANDIN_TRAINER].discard("learning_rate")
    try:
        engine = _engine(tmp_path, rep)
        plan = engine.plan(job=_job(tmp_path, learning_rate=0.001), machine=MACHINE)
        result = engine.train(plan=plan, workdir=tmp_path / "job", progress=lambda p: None, stop=StopToken())
    finally:
        ACCEPTED_INPUTS[STANDIN_TRAINER].add("learning_rate")
    assert result.status is TrainStatus.FAILED and result.failure is not Failure.SUBMISSION_UNCERTAIN
    assert "HTTP 422" in result.error and "learning_rate" in result.error and rep.creates == []
