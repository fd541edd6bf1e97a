"""The fal cloud engine against a local stand-in of fal.ai (tests/fal_standin.py); nothing here
reaches the real service. Pure rules first (prices, guards, log parsing, the LoRA conversion),
then the engine in-process, then a real daemon end to end.
"""

from __future__ import annotations

import json
import struct

import pytest
from conftest import wait_for
from fal_standin import ALPHA, RANK, STANDIN_ENDPOINT, FalStandIn, diffusers_lora, standin_options

from daemon.sample import make_dataset
from engines.base import (
    EngineContext,
    JobInput,
    Machine,
    PlanError,
    Progress,
    StopToken,
    TrainStatus,
    get_engine,
)
from engines.fal import pricing
from engines.fal.convert import BadLoRA, convert, plan_conversion, read_header
from engines.fal.engine import request_arguments, step_from_logs

MACHINE = Machine(total_gb=64, available_gb=64, platform="linux", apple_silicon=False)
KEY = "test-fal-key-DO-NOT-LOG-3f9c"

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, max_cost, refused", [(1000, 5.0, False), (1000, 2.0, True), (3000, 5.0, True), (100, 0.25, False)]
)
def test_cost_guard_table(steps, max_cost, refused):
    cost, price = pricing.estimate_usd("fal-ai/z-image-trainer", steps)
    problem = pricing.cost_problem(cost, max_cost, steps, price, "fal-ai/z-image-trainer")
    assert (problem is not None) == refused
    if refused:
        assert f"${cost:.2f}" in problem and f"${max_cost:.2f}" in problem and str(steps) in problem


@pytest.mark.parametrize(
    "count, limit, refused", [(0, 10, False), (9, 10, False), (10, 10, True), (50, 0, False)]
)
def test_daily_limit_table(count, limit, refused):
    assert (pricing.daily_problem(count, limit) is not None) == refused


def test_endpoint_table_and_overrides():
    assert pricing.endpoint_for("z-image-turbo", {}) == "fal-ai/z-image-trainer"
    assert pricing.endpoint_for("flux-dev", {}) == "fal-ai/flux-lora-fast-training"
    assert (
        pricing.endpoint_for("z-image-turbo", pricing.parse_endpoints("z-image-turbo=me/trainer"))
        == "me/trainer"
    )
    assert pricing.endpoint_for("sd15", {}) is None
    with pytest.raises(ValueError, match="model=owner/app"):
        pricing.parse_endpoints("z-image-turbo")


@pytest.mark.parametrize(
    "logs, total, step",
    [
        ([{"message": "Training step 120/1000"}], 1000, 120),
        ([{"message": "step: 5 of 10"}, {"message": "loading"}], 10, 5),
        ([{"message": " 40%|####  | 400/1000 [01:00<01:30]"}], 1000, 400),
        ([{"message": "Training step 50/100"}], 1000, 500),  # the trainer counts differently: scaled
        ([{"message": "uploading"}], 1000, None),
        ([], 1000, None),
    ],
)
def test_step_from_logs_table(logs, total, step):
    assert step_from_logs(logs, total) == step


def test_request_arguments_per_endpoint():
    from engines.fal.endpoints import SCHEMAS

    config = {"steps": 500, "trigger": "ohwx", "learning_rate": None}
    assert request_arguments(SCHEMAS["fal-ai/z-image-trainer"], "u", config) == {
        "steps": 500,
        "image_data_url": "u",
        "default_caption": "ohwx",
    }
    flux = request_arguments(SCHEMAS["fal-ai/flux-lora-fast-training"], "u", config)
    assert flux == {"steps": 500, "images_data_url": "u", "trigger_word": "ohwx"}


def _header(**tensors) -> dict:
    out, offset = {}, 0
    for key, (shape, dtype) in tensors.items():
        size = (
            (shape[0] if shape else 1)
            * (shape[1] if len(shape) > 1 else 1)
            * {"F32": 4, "BF16": 2, "I64": 8}[dtype]
        )
        out[key.replace("__", ".")] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return out


@pytest.mark.parametrize(
    "header, problem",
    [
        (
            _header(**{"transformer__layers__0__attention__to_q__lora_A__weight": ([4, 8], "F32")}),
            "no lora_B",
        ),
        (
            _header(**{"m__lora_A__weight": ([4, 8], "F32"), "m__lora_B__weight": ([8, 2], "F32")}),
            "ranks differ",
        ),
        (
            _header(
                **{
                    "m__lora_A__weight": ([4, 8], "F32"),
                    "m__lora_B__weight": ([8, 4], "F32"),
                    "m__bias": ([8], "F32"),
                }
            ),
            "unexpected tensor",
        ),
        (_header(**{"m__lora_A__weight": ([4, 8], "I64"), "m__lora_B__weight": ([8, 4], "F32")}), "dtype"),
        ({"__metadata__": {}}, "no tensors"),
    ],
)
def test_conversion_refuses_what_is_not_a_lora(header, problem):
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    with pytest.raises(BadLoRA, match=problem):
        plan_conversion(header, data_len, "diffusion_model.")


def test_conversion_renames_keys_and_turns_peft_alpha_into_alpha_tensors(tmp_path):
    src = tmp_path / "fal.safetensors"
    raw = diffusers_lora(src)
    dest = tmp_path / "lorad.safetensors"
    converted = convert(src, dest)
    assert (converted.rank, converted.alpha, converted.modules) == (RANK, ALPHA, 14)
    header, offset = read_header(dest)
    keys = [k for k in header if k != "__metadata__"]
    assert all(k.startswith("diffusion_model.layers.") for k in keys)
    assert (
        "diffusion_model.layers.0.attention.to_q.lora_A.weight" in keys
        and "diffusion_model.layers.1.feed_forward.w2.alpha" in keys
    )
    assert "lora_adapter_metadata" not in header.get(
        "__metadata__", {}
    )  # the alpha is in the tensors now, once
    src_header, src_offset = read_header(src)
    a = src_header["transformer.layers.0.attention.to_q.lora_A.weight"]["data_offsets"]
    b = header["diffusion_model.layers.0.attention.to_q.lora_A.weight"]["data_offsets"]
    assert (
        dest.read_bytes()[offset + b[0] : offset + b[1]] == raw[src_offset + a[0] : src_offset + a[1]]
    )  # untouched
    alpha = header["diffusion_model.layers.0.attention.to_q.alpha"]["data_offsets"]
    assert struct.unpack("<f", dest.read_bytes()[offset + alpha[0] : offset + alpha[1]])[0] == ALPHA


def test_rslora_alpha_gives_peft_scale():
    from engines.fal.convert import peft_alpha

    configs = {"transformer": {"lora_alpha": 8, "use_rslora": True}}
    assert peft_alpha("transformer", "layers.0.x", configs, 16) == pytest.approx(
        8 * 16 / 4
    )  # alpha/rank = 8/sqrt(16)
    assert (
        peft_alpha(
            "transformer", "layers.0.x", {"transformer": {"lora_alpha": 8, "alpha_pattern": {"x": 2}}}, 16
        )
        == 2
    )
    assert peft_alpha("transformer", "m", {}, 16) is None


# -- the engine, in-process, against the stand-in ------------------------------------------------


STANDIN_OPTIONS: dict = {}


@pytest.fixture
def fal(tmp_path, monkeypatch):
    standin = FalStandIn(tmp_path / "fal")
    monkeypatch.setitem(globals(), "STANDIN_OPTIONS", standin.options())
    for name, value in standin.env(KEY).items():
        monkeypatch.setenv(name, value)
    yield standin
    standin.close()


def _engine(tmp_path, **options):
    return get_engine(
        "fal",
        EngineContext(
            state_dir=tmp_path / "state",
            options={"poll_s": 0.02, "retry_base_s": 0.02, "daily_jobs": 10, **STANDIN_OPTIONS, **options},
        ),
    )


def _job(tmp_path, **options) -> JobInput:
    data = make_dataset(tmp_path / "job" / "data", images=2, trigger="ohwx")
    return JobInput(
        "j1", "alice", "ohwx", "tiny-z-image", 2, 256, {"steps": 20, **options}, data, "ohwx, portrait"
    )


def test_a_500_is_retried_and_one_request_is_sent(fal, tmp_path):
    fal.fail = {"submit": [500], "status": [503, 500]}
    engine = _engine(tmp_path)
    job = _job(tmp_path)
    seen: list[Progress] = []
    result = engine.train(
        plan=engine.plan(job=job, machine=MACHINE),
        workdir=tmp_path / "job",
        progress=seen.append,
        stop=StopToken(),
    )
    assert result.status is TrainStatus.COMPLETED, result.error
    assert len(fal.submissions) == 1 and fal.fail == {"submit": [], "status": []}
    assert any(p.note and p.note.startswith("waiting: fal.ai unreachable") for p in seen)
    assert any(p.note == "fal.ai queue, position 1" for p in seen)
    assert json.loads((tmp_path / "job" / "fal" / "request.json").read_text())["request_id"] == "req-0001"


def test_stop_leaves_the_request_running_and_the_next_train_reattaches(fal, tmp_path):
    fal.hold.clear()  # stays IN_PROGRESS until set
    engine = _engine(tmp_path)
    plan = engine.plan(job=_job(tmp_path), machine=MACHINE)
    stop = StopToken()
    stopped = engine.train(
        plan=plan, workdir=tmp_path / "job", progress=lambda p: p.step and stop.stop("shutdown"), stop=stop
    )
    assert stopped.status is TrainStatus.STOPPED and fal.cancels == []
    fal.hold.set()
    done = _engine(tmp_path).train(
        plan=plan, workdir=tmp_path / "job", progress=lambda p: None, stop=StopToken()
    )
    assert done.status is TrainStatus.COMPLETED, done.error
    assert len(fal.submissions) == 1  # re-attached, not paid twice


def test_cancel_cancels_the_remote_request(fal, tmp_path):
    fal.hold.clear()
    engine = _engine(tmp_path)
    stop = StopToken()
    result = engine.train(
        plan=engine.plan(job=_job(tmp_path), machine=MACHINE),
        workdir=tmp_path / "job",
        progress=lambda p: p.step and stop.stop("cancel"),
        stop=stop,
    )
    assert result.status is TrainStatus.STOPPED and fal.cancels == ["req-0001"]


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncated", "bytes"),  # the result announces more bytes than come
        ("structure", "not usable"),  # not a LoRA: a tensor that is no lora_A/lora_B
    ],
)
def test_a_bad_result_is_refused(fal, tmp_path, damage, words):
    if damage == "truncated":
        fal.lora_size = len(fal.lora) + 100
    else:
        import numpy as np
        from safetensors.numpy import save_file

        save_file(
            {"transformer.layers.0.attention.to_q.weight": np.zeros((4, 4), np.float32)},
            str(tmp_path / "bad.safetensors"),
        )
        fal.lora = (tmp_path / "bad.safetensors").read_bytes()
    engine = _engine(tmp_path, unreachable_timeout_s=1)
    result = engine.train(
        plan=engine.plan(job=_job(tmp_path), machine=MACHINE),
        workdir=tmp_path / "job",
        progress=lambda p: None,
        stop=StopToken(),
    )
    assert result.status is TrainStatus.FAILED and words in (result.error or "")
    assert not (tmp_path / "job" / "adapter.safetensors").exists()


def test_remote_failure_fails_with_fals_text(fal, tmp_path):
    fal.remote_error = "Training failed: CUDA out of memory on the worker"
    engine = _engine(tmp_path)
    result = engine.train(
        plan=engine.plan(job=_job(tmp_path), machine=MACHINE),
        workdir=tmp_path / "job",
        progress=lambda p: None,
        stop=StopToken(),
    )
    assert result.status is TrainStatus.FAILED and "CUDA out of memory on the worker" in (result.error or "")


def test_cost_guard_refuses_with_the_numbers(fal, tmp_path):
    with pytest.raises(PlanError, match=r"about \$6\.78 \(3000 steps .* above max_cost_usd = \$1\.00"):
        _engine(tmp_path).plan(job=_job(tmp_path, steps=3000, max_cost_usd=1.0), machine=MACHINE)
    assert fal.submissions == []


def test_daily_limit_refuses_a_second_job(fal, tmp_path):
    engine = get_engine(
        "fal",
        EngineContext(
            state_dir=tmp_path / "state", options={"poll_s": 0.02, **fal.options(), "daily_jobs": 1}
        ),
    )
    job = _job(tmp_path)
    assert (
        engine.train(
            plan=engine.plan(job=job, machine=MACHINE),
            workdir=tmp_path / "job",
            progress=lambda p: None,
            stop=StopToken(),
        ).status
        is TrainStatus.COMPLETED
    )
    other = tmp_path / "job2"
    make_dataset(other / "data", images=2, trigger="ohwx")
    job2 = JobInput("j2", "bob", "ohwx", "tiny-z-image", 2, 256, {"steps": 20}, other / "data", "ohwx")
    result = engine.train(
        plan=engine.plan(job=job2, machine=MACHINE), workdir=other, progress=lambda p: None, stop=StopToken()
    )
    assert result.status is TrainStatus.FAILED and "cloud_daily_jobs = 1" in (result.error or "")
    assert len(fal.submissions) == 1


def test_no_key_names_fal_key(fal, tmp_path, monkeypatch):
    monkeypatch.delenv("FAL_KEY")
    engine = _engine(tmp_path)
    result = engine.train(
        plan=engine.plan(job=_job(tmp_path), machine=MACHINE),
        workdir=tmp_path / "job",
        progress=lambda p: None,
        stop=StopToken(),
    )
    assert result.status is TrainStatus.FAILED and "FAL_KEY" in (result.error or "")
    assert "FAL_KEY" in engine.model_check("tiny-z-image").detail
    assert fal.submissions == []


def test_unreachable_service_waits_then_fails_after_the_bound(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {
        "FAL_KEY": KEY,
        "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{port}",
        "FAL_REST_URL": f"https://127.0.0.1:{port}",
        "FAL_CDN_URL": f"https://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(name, value)
    import fal_client.client as fc

    monkeypatch.setattr(fc, "MAX_ATTEMPTS", 1)  # fal-client's own retries off: lorad's backoff is under test
    engine = _engine(tmp_path, unreachable_timeout_s=1, **standin_options(tmp_path / "fal"))
    notes: list[str] = []
    result = engine.train(
        plan=engine.plan(job=_job(tmp_path), machine=MACHINE),
        workdir=tmp_path / "job",
        progress=lambda p: notes.append(p.note or ""),
        stop=StopToken(),
    )
    assert result.status is TrainStatus.FAILED and "unreachable" in (result.error or "")
    assert any(n.startswith("waiting: fal.ai unreachable") for n in notes)


# -- a real daemon ---------------------------------------------------------------------------------


def _daemon(daemon_factory, fal: FalStandIn, **env):
    return daemon_factory(
        engine="fal",
        extra_env={
            **fal.env(KEY),
            "LORAD_ENGINES_FAL_POLL_S": "0.05",
            "LORAD_ENGINES_FAL_RETRY_BASE_S": "0.05",
            **env,
        },
    )


@pytest.mark.slow
def test_daemon_publishes_a_fal_lora_and_never_shows_the_key(daemon_factory, fal):
    from daemon.publish import metadata_of

    d = _daemon(daemon_factory, fal).start()
    folder = make_dataset(d.training_data / "ohwx_alice", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(lambda: d.job_states().get("ohwx_alice") in ("done", "failed"), 300, message="fal job finished")
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    assert job["remote"]["request_id"] == "req-0001" and job["remote"]["endpoint"] == STANDIN_ENDPOINT
    lora = d.assets / "loras" / "alice.safetensors"
    meta = metadata_of(lora)
    assert (meta["lorad.engine"], meta["lorad.fal_request_id"], meta["lorad.fal_endpoint"]) == (
        "fal",
        "req-0001",
        STANDIN_ENDPOINT,
    )
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), f"{ALPHA:g}")
    assert "alice" in json.loads(d.registry.read_text())["loras"]
    assert (d.assets / "loras" / "alice.png").is_file() or list((d.assets / "loras").glob("alice*.png"))
    assert len(fal.submissions) == 1 and f"Key {KEY}" in fal.auth_headers
    for text in (
        d.cli("status").stdout,
        d.cli("status", "--json", "--all").stdout,
        (d.state / "logs" / "lorad.jsonl").read_text(),
        (folder / "DONE").read_text(),
    ):
        assert KEY not in text
    assert d.log_has("fal.submitted", request_id="req-0001")


@pytest.mark.slow
def test_daemon_killed_mid_request_reattaches_after_restart(daemon_factory, fal):
    fal.hold.clear()
    d = _daemon(daemon_factory, fal).start()
    folder = make_dataset(d.training_data / "ohwx_bob", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(
        lambda: (d.jobs() or [{}])[0].get("remote", {}).get("request_id"),
        120,
        message="request id in the job row",
    )
    wait_for(
        lambda: "training on fal.ai" in ((d.jobs() or [{}])[0].get("note") or ""),
        60,
        message="remote training reported",
    )
    wait_for(
        lambda: (
            "training on fal.ai"
            in ((folder / "TRAINING").read_text() if (folder / "TRAINING").exists() else "")
        ),
        30,
        message="the TRAINING marker shows the remote progress",
    )
    d.kill9()
    fal.hold.set()
    d.start()
    wait_for(
        lambda: d.job_states().get("ohwx_bob") in ("done", "failed"), 300, message="re-attached job finished"
    )
    assert d.jobs()[0]["state"] == "done", d.jobs()[0]["error"]
    assert len(fal.submissions) == 1  # one paid training
    assert d.log_has("fal.reattach", request_id="req-0001")


@pytest.mark.slow
def test_lorad_cancel_cancels_the_fal_request(daemon_factory, fal):
    fal.hold.clear()
    d = _daemon(daemon_factory, fal).start()
    folder = make_dataset(d.training_data / "ohwx_carol", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(
        lambda: "training on fal.ai" in ((d.jobs() or [{}])[0].get("note") or ""),
        120,
        message="remote training",
    )
    said = d.cli("cancel", d.jobs()[0]["id"], timeout=120)
    assert said.returncode == 0 and "the training on the cloud stopped" in said.stdout, said.stdout
    wait_for(lambda: d.job_states().get("ohwx_carol") == "cancelled", 60, message="cancelled")
    assert fal.cancels == ["req-0001"]
    assert not (d.assets / "loras" / "carol.safetensors").exists()


@pytest.mark.slow
def test_no_key_fails_the_job_with_a_reason_naming_fal_key(daemon_factory, fal, monkeypatch):
    monkeypatch.delenv("FAL_KEY")
    d = daemon_factory(engine="fal", extra_env={k: v for k, v in fal.env(None).items()}).start()
    folder = make_dataset(d.training_data / "ohwx_dave", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(lambda: d.job_states().get("ohwx_dave") == "failed", 120, message="failed without a key")
    assert "FAL_KEY" in d.jobs()[0]["error"] and "FAL_KEY" in (folder / "FAILED.txt").read_text()
    assert fal.submissions == [] and d.proc.poll() is None  # the daemon keeps running


@pytest.mark.slow
def test_cloud_fallback_sends_a_job_no_local_plan_fits_to_fal(daemon_factory, fal):
    d = daemon_factory(
        engine="mflux",
        extra_env={
            **fal.env(KEY),
            "LORAD_RAM_GB": "0.01",
            "LORAD_CLOUD_FALLBACK": "true",
            "LORAD_ENGINES_FAL_POLL_S": "0.05",
        },
    ).start()
    folder = make_dataset(d.training_data / "ohwx_erin", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(
        lambda: d.job_states().get("ohwx_erin") in ("done", "failed"), 300, message="fallback job finished"
    )
    job = d.jobs()[0]
    assert job["state"] == "done", job["error"]
    assert job["settings"]["engine"] == "fal" and job["settings"]["fallback_from"] == "mflux"
    assert d.log_has("job.cloud_fallback", from_engine="mflux", to_engine="fal") and len(fal.submissions) == 1


@pytest.mark.slow
def test_without_cloud_fallback_the_memory_refusal_stands(daemon_factory, fal):
    d = daemon_factory(engine="mflux", extra_env={**fal.env(KEY), "LORAD_RAM_GB": "0.01"}).start()
    folder = make_dataset(d.training_data / "ohwx_fay", images=2, trigger="ohwx")
    (folder / "READY").write_text("steps = 20\n")
    wait_for(lambda: d.job_states().get("ohwx_fay") == "failed", 120, message="memory refusal")
    assert fal.submissions == []


def test_engine_option_per_job_is_checked_against_the_known_engines():
    from daemon.intake.options import parse_options
    from daemon.intake.take import effective_settings
    from daemon.settings import Settings

    options, findings = parse_options('engine = "fal"\nmax_cost_usd = 2.5\n', "lora.toml", allow_force=False)
    assert findings == [] and options == {"engine": "fal", "max_cost_usd": 2.5}
    assert effective_settings(options, Settings())["engine"] == "fal"
    assert effective_settings({}, Settings())["engine"] == "mflux"
    _, findings = parse_options('engine = "cloudy"\n', "READY", allow_force=True)
    assert len(findings) == 1 and "fal" in findings[0].hint and "mflux" in findings[0].hint
