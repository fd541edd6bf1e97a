"""The Redis wire against hostile and unlucky peers (issue 19, cases 3-7 and the checkpoint zip):
whoever can write to the coordinator's Redis forges offers and events; a coordinator stopped for
a while or a Redis that restarts reorders what arrives. Real redis-server, real `lorad run` and
`lorad worker` processes, the scripted engine; every wait is a generous liveness deadline.
docs/RELIABILITY.md "Hostile peers" lists these cases with the trust model.
"""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path

import pytest
import test_remote
from conftest import wait_for
from test_remote import count_events, drop, hold_env, published

from daemon.remote import lease
from daemon.remote.messages import MessageRefused, Offer, WorkerEvent, report_name, state_path

cluster = test_remote.cluster  # the fixture: a coordinator and workers on one real Redis

SHA = "ab" * 32
TOKEN = "1.0123456789ab"


def _ref(key: str, size: int = 10) -> dict:
    return {"key": key, "size": size, "sha256": SHA, "chunks": 1 if size else 0, "chunk_size": 1 << 20}


def _offer(job_id: str = "20260101-120000-ab12", **changes) -> dict:
    offer = {
        "job_id": job_id, "token": TOKEN, "attempt": 1, "name": "alice", "trigger": "ohwx",
        "model": "tiny-z-image", "engine": "scripted", "image_count": 2, "max_side": 512, "options": {},
        "preview_prompt": "a photo of ohwx",
        "snapshot": {"key": f"job:{job_id}:snapshot", "files": 0, "size": 0, "sha256": SHA},
        "manifest": _ref(f"job:{job_id}:manifest"),
        "state": [{"rel": "train/checkpoints/0000002_checkpoint.zip", "ref": _ref(f"job:{job_id}:resume:0")}],
    }  # fmt: skip
    offer.update(changes)
    return offer


# -- the validating constructors (pure, table tests) ----------------------------------------------


def test_a_well_formed_offer_round_trips():
    offer = Offer.from_dict(_offer())
    assert offer.job_id == "20260101-120000-ab12" and offer.state[0].rel.startswith("train/checkpoints/")
    assert Offer.from_dict(offer.to_dict()) == offer


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"job_id": "/tmp/victim"}, "job_id"),
        ({"job_id": "../../victim"}, "job_id"),
        ({"job_id": ".."}, "job_id"),
        ({"job_id": "a/b"}, "job_id"),
        ({"job_id": 42}, "job_id"),
        ({"token": "x"}, "token"),
        ({"token": None}, "token"),
        ({"engine": "../bin/sh"}, "engine"),
        ({"image_count": -1}, "image_count"),
        ({"image_count": True}, "image_count"),
        ({"max_side": "512"}, "max_side"),
        ({"name": "x" * 5000}, "name"),
        ({"options": ["not", "a", "dict"]}, "options"),
        ({"snapshot": {"key": "job:other:snapshot", "files": 0, "size": 0, "sha256": SHA}}, "snapshot"),
        ({"manifest": _ref("job:20260101-120000-ab12:manifest", size=1 << 40)}, "manifest"),
        ({"manifest": _ref("job:other:manifest")}, "manifest"),
        ({"state": [{"rel": "job.json", "ref": _ref("job:20260101-120000-ab12:r")}]}, "state[0].rel"),
        ({"state": [{"rel": "../x", "ref": _ref("job:20260101-120000-ab12:r")}]}, "state[0].rel"),
        ({"state": [{"rel": "/etc/x", "ref": _ref("job:20260101-120000-ab12:r")}]}, "state[0].rel"),
        ({"state": [{"rel": "train/checkpoints/x", "ref": {"key": 1}}]}, "state[0].ref"),
    ],
)
def test_a_forged_offer_is_refused_naming_the_field(changes, field):
    with pytest.raises(MessageRefused) as refused:
        Offer.from_dict(_offer(**changes))
    assert refused.value.field == field, str(refused.value)


@pytest.mark.parametrize(
    "rel, ok",
    [
        ("train/checkpoints/0000004_checkpoint.zip", True),
        ("fal/request.json", True),
        ("train/checkpoints/", False),
        ("job.json", False),
        ("manifest.json", False),
        ("data/img.png", False),
        ("result/result.json", False),
        ("remote-state.json", False),
        ("train/checkpoints/../../job.json", False),
        ("train//checkpoints/x", False),
        ("./train/checkpoints/x", False),
        ("/abs/train/checkpoints/x", False),
        ("train\\checkpoints\\x", False),
        ("train/checkpoints/x\x00", False),
    ],
)
def test_saved_state_lands_only_in_the_saved_state_areas(rel, ok):
    if ok:
        assert state_path(rel) == rel
    else:
        with pytest.raises(MessageRefused):
            state_path(rel)


@pytest.mark.parametrize("name, ok", [("loss.html", True), ("../x", False), ("/etc/passwd", False),
                                      ("a/b", False), (".hidden", False), ("", False), (3, False)])  # fmt: skip
def test_report_names_are_plain_file_names(name, ok):
    if ok:
        assert report_name(name) == name
    else:
        with pytest.raises(MessageRefused, match="plain file name|not a string|empty"):
            report_name(name)


def _event(event_kind: str, data: dict, **envelope) -> dict:
    fields = {
        "job": "20260101-120000-ab12",
        "token": TOKEN,
        "kind": event_kind,
        "worker": "host-abc123",
        "data": json.dumps(data),
    }
    return {k.encode(): str(v).encode() for k, v in {**fields, **envelope}.items()}


PREFIX = f"job:20260101-120000-ab12:{TOKEN}"


@pytest.mark.parametrize(
    "kind, data, envelope, field",
    [
        ("progress", {"step": 3, "total": 10}, {}, None),
        (
            "checkpoint",
            {
                "step": 4,
                "files": [
                    {"rel": "train/checkpoints/0000004_checkpoint.zip", "ref": _ref(f"{PREFIX}:state:4:0")}
                ],
            },
            {},
            None,
        ),  # fmt: skip
        (
            "done",
            {
                "files": {k: _ref(f"{PREFIX}:result:{k}") for k in ("adapter", "render", "compare")},
                "report": [{"name": "loss.html", "ref": _ref(f"{PREFIX}:result:report:0")}],
            },
            {},
            None,
        ),  # fmt: skip
        ("progress", {"step": 3, "total": 10}, {"job": "/etc"}, "job"),
        ("progress", {"step": 3, "total": 10}, {"kind": "publish"}, "kind"),
        ("progress", {"step": 3, "total": 10}, {"token": "1.x"}, "token"),
        ("progress", {"step": 3, "total": 10}, {"worker": "a b"}, "worker"),
        ("progress", {"step": "3", "total": 10}, {}, "step"),
        ("progress", {"step": 3, "total": 10, "loss": float("nan")}, {}, None),  # a diverged loss: None
        ("progress", {"step": 3, "total": 10, "eta_s": "soon"}, {}, "eta_s"),
        ("progress", {"total": 10}, {}, "step"),
        ("declined", {"reason": "x", "needs_gb": float("inf")}, {}, "needs_gb"),
        (
            "checkpoint",
            {"step": 4, "files": [{"rel": "job.json", "ref": _ref(f"{PREFIX}:state:4:0")}]},
            {},
            "files[0].rel",
        ),  # fmt: skip
        (
            "checkpoint",
            {"step": 4, "files": [{"rel": "result/result.json", "ref": _ref(f"{PREFIX}:s")}]},
            {},
            "files[0].rel",
        ),  # fmt: skip
        (
            "checkpoint",
            {
                "step": 4,
                "files": [{"rel": "train/checkpoints/x", "ref": _ref("job:20260101-120000-ab12:other:s")}],
            },
            {},
            "files[0].ref",
        ),  # fmt: skip  (another dispatch's keys)
        ("checkpoint", {"step": 4, "files": []}, {}, "files"),
        (
            "done",
            {"files": {k: _ref(f"{PREFIX}:result:{k}") for k in ("adapter", "render")}},
            {},
            "files.compare",
        ),
        (
            "done",
            {
                "files": {
                    k: _ref(f"{PREFIX}:result:{k}", size=1 << 40) for k in ("adapter", "render", "compare")
                }
            },
            {},
            "files.adapter",
        ),  # fmt: skip  (declared size over the absolute cap)
        (
            "done",
            {
                "files": {k: _ref(f"{PREFIX}:result:{k}") for k in ("adapter", "render", "compare")},
                "report": [{"name": "../../job.json", "ref": _ref(f"{PREFIX}:r")}],
            },
            {},
            "report[0].name",
        ),  # fmt: skip
    ],
)
def test_worker_events_are_checked_field_by_field(kind, data, envelope, field):
    if field is None:
        event = WorkerEvent.from_dict(_event(kind, data, **envelope))
        assert event.kind == kind and event.job_id == "20260101-120000-ab12"
        return
    with pytest.raises(MessageRefused) as refused:
        WorkerEvent.from_dict(_event(kind, data, **envelope))
    assert refused.value.field == field, str(refused.value)


# -- case 3: a forged offer with a path for a job id ---------------------------------------------


def _sacrificial(tmp_path: Path, name: str) -> Path:
    victim = tmp_path / name
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def _forge_offer(redis, job_id: str) -> None:
    """What anyone with access to Redis can do: queue an offer (and set its token, so that it
    claims) whose job id is a path."""
    from daemon.remote.redisqueue import RedisQueue, client_pair

    client, pool = client_pair(redis.url, name="attacker")
    offer = _offer(job_id=job_id, state=[], snapshot={"key": "job:x:snapshot", "files": 0, "size": 0, "sha256": SHA},
                   manifest=_ref("job:x:manifest"))  # fmt: skip
    client.set(lease.token_key(job_id), TOKEN)
    RedisQueue(pool, client).enqueue(offer, priority=0, ready_at=0.0)


@pytest.mark.parametrize("where", ["lorad worker", "built-in worker"])
def test_a_forged_offer_with_a_path_job_id_touches_nothing_and_the_queue_moves(
    cluster, redis_server, tmp_path, where
):
    make_coordinator, make_worker = cluster
    local = where == "built-in worker"
    d = make_coordinator(redis_server, local_worker=local).start()
    w = d if local else make_worker(redis_server, "a").start()
    absolute = _sacrificial(tmp_path, "victim-abs")
    relative = _sacrificial(tmp_path, "victim-rel")
    # The worker's jobs_dir is <state>/work: enough `..` to reach tmp_path from there.
    jobs_dir = (d.state if local else w.state) / "work"
    dotted = os.path.relpath(relative, jobs_dir)
    assert ".." in dotted
    _forge_offer(redis_server, str(absolute))
    _forge_offer(redis_server, dotted)
    drop(d, "ohwx_innocent", ready="steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_innocent") == "done", 90, message="the innocent job is done")
    for victim in (absolute, relative):
        assert (victim / "precious.txt").read_text() == "keep me"
    assert w.log_has("worker.offer_refused") or d.log_has("coordinator.offer_refused")
    assert not w.log_has("worker.claimed", job_id=str(absolute))
    assert published(d, "innocent") == ["innocent.safetensors"]


# -- cases 4 and 5: a hostile worker plants the job's record and a result -----------------------


def test_a_checkpoint_event_planting_job_json_and_a_result_is_refused_and_the_queue_moves(
    cluster, redis_server, tmp_path
):
    from daemon.remote.redisurl import make_client
    from daemon.remote.transfer import ArtifactStore

    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    env, held = hold_env(tmp_path, "a", 3)
    a = make_worker(redis_server, "a", env).start()
    drop(d, "ohwx_victim", ready="steps = 8\n")
    wait_for(held.exists, 60, message="worker a holding at step 3")
    job_id = d.jobs()[0]["id"]
    workdir = d.state / "jobs" / job_id
    record_before = (workdir / "job.json").read_bytes()
    manifest_before = (workdir / "manifest.json").read_bytes()
    secret = tmp_path / "secret.txt"
    secret.write_text("the coordinator's secret")

    # The hostile worker (here: the test, holding the job's current token) plants files.
    client = make_client(redis_server.url, socket_timeout=5.0)
    token = client.get(lease.token_key(job_id)).decode()
    files = ArtifactStore(client)
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"id": "x", "hacked": True}))
    planted_result = tmp_path / "result.json"
    planted_result.write_text(json.dumps({"plan": {}, "report": ["../../../../secret.txt", str(secret)]}))
    items = []
    for i, (rel, path) in enumerate(
        [("job.json", junk), ("manifest.json", junk), ("result/result.json", planted_result)]
    ):
        ref = files.put_file(f"{lease.files_key(job_id, token)}:state:99:{i}", path)
        items.append({"rel": rel, "ref": ref.to_dict()})
    fields = ["job", job_id, "token", token, "kind", "checkpoint", "worker", "evil",
              "data", json.dumps({"step": 99, "files": items})]  # fmt: skip
    client.xadd(lease.EVENTS, dict(zip(fields[::2], fields[1::2])))
    a.kill9()  # its lease lapses: the path that published the planted result

    wait_for(lambda: d.job_states().get("ohwx_victim") in ("failed", "queued", "interrupted"), 60,
             message="the hostile job fails or retries visibly")  # fmt: skip
    wait_for(lambda: d.log_has("coordinator.event_refused", job_id=job_id), 30, message="event refused")
    record = json.loads((workdir / "job.json").read_text())  # the daemon's own record, not the planted one
    assert "hacked" not in record and record_before.startswith(b"{")
    assert (workdir / "manifest.json").read_bytes() == manifest_before
    assert not (workdir / "result" / "result.json").exists()
    job = next(j for j in d.jobs() if j["id"] == job_id)
    assert job["state"] == "failed" and "refused" in job["error"] and "lorad retry" in job["error"]

    make_worker(redis_server, "b").start()
    drop(d, "ohwx_next", ready="steps = 2\n", seed=1)
    wait_for(
        lambda: d.job_states().get("ohwx_next") == "done",
        90,
        message="an innocent job is dispatched and done",
    )
    assert not [p for p in (d.assets / "loras").rglob("*") if p.is_file() and "secret" in p.read_bytes().decode(
        "utf-8", "replace")]  # fmt: skip
    assert not d.log_has("coordinator.error")


# -- case 6: a coordinator stopped while workers checkpoint and finish ------------------------


def test_sigstopped_coordinator_publishes_each_finished_job_once_and_discards_nothing(
    cluster, redis_server, tmp_path
):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    workers = [make_worker(redis_server, n, {"SCRIPTED_ENGINE_STEP_S": "0.3"}).start() for n in ("a", "b")]
    drop(d, "ohwx_one", ready="steps = 12\n")
    drop(d, "ohwx_two", ready="steps = 12\n", seed=1)
    wait_for(lambda: len(d.jobs()) == 2 and all(j["state"] == "training" for j in d.jobs()), 60,
             message="both jobs training remotely")  # fmt: skip
    ids = [j["id"] for j in d.jobs()]
    wait_for(lambda: all(d.log_has("job.checkpoint_received", job_id=i, step=2) for i in ids), 60,
             message="checkpoint 2 of both jobs recorded")  # fmt: skip
    client = redis_server.client()
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:  # the workers checkpoint every 2 steps, finish, stop renewing: their leases lapse
        wait_for(lambda: all(any(w.log_has("worker.delivered", job_id=i) for w in workers) for i in ids), 90,
                 message="both workers delivered")  # fmt: skip
        wait_for(lambda: not any(client.exists(lease.lease_key(i)) for i in ids), 30, message="leases lapsed")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_for(lambda: set(d.job_states().values()) == {"done"}, 90, message="both jobs done")
    for job_id in ids:
        assert count_events(d, "job.done", job_id=job_id) == 1
        assert sum(count_events(w, "worker.claimed", job_id=job_id) for w in workers) == 1  # never retrained
        assert not d.log_has("job.lease_lapsed", job_id=job_id)
    assert published(d, "one") == ["one.safetensors"] and published(d, "two") == ["two.safetensors"]
    assert not d.log_has("coordinator.redis_unreachable")
    assert not list(client.scan_iter(match="lorad:xfer:job:*"))


# -- case 7: Redis killed, a READY during the outage, Redis back ----------------------------------


def test_a_ready_dropped_while_redis_is_down_is_dispatched_once_redis_returns(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    w = make_worker(redis_server, "a").start()
    wait_for(lambda: d.log_has("coordinator.attached"), 30, message="coordinator attached")
    redis_server.kill9()
    wait_for(lambda: d.log_has("coordinator.redis_unreachable"), 60, message="coordinator notices")
    drop(d, "ohwx_outage", ready="steps = 2\n")
    wait_for(
        lambda: d.job_states().get("ohwx_outage") == "queued", 60, message="job queued during the outage"
    )
    redis_server.restart(keep_data=False)
    wait_for(
        lambda: d.job_states().get("ohwx_outage") == "done", 120, message="dispatched after Redis returns"
    )
    assert w.log_has("worker.claimed", job_id=d.jobs()[0]["id"])


def test_no_blocking_redis_read_is_unbounded():
    """`BLOCK 0` waits forever: no read in the coordinator or the worker may ask for it."""
    root = Path(__file__).resolve().parents[2] / "daemon" / "remote"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "block=0" not in text.replace(" ", "") and "BLOCK 0" not in text, path.name


# -- a checkpoint from a worker is input: bounded, and its config stays in the job's folders ------


def _checkpoint_zip(path: Path, config: dict, extra: dict | None = None) -> Path:
    files = {"config": "c.json", "optimizer": "o.bin", "lora_adapter": "a.safetensors", "iterator": "i.json"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c.json", json.dumps(config))
        zf.writestr("o.bin", b"o")
        zf.writestr("a.safetensors", b"a")
        zf.writestr("i.json", json.dumps({"num_iterations": 2}))
        zf.writestr("checkpoint.json", json.dumps({"files": files}))
        zf.writestr("run.json", json.dumps({"version": 1, "data_root": config.get("data", "")}))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_a_hostile_checkpoint_zip_is_refused_before_resume(tmp_path, monkeypatch):
    from engines.mflux import checkpoints

    work = tmp_path / "work" / "j1"
    plan = {"data": str(work / "data"), "output_path": str(work / "train"), "model_path": "/models/z",
            "checkpoint": {"output_path": str(work / "train")}}  # fmt: skip
    good = _checkpoint_zip(tmp_path / "0000002_checkpoint.zip", {**plan, "rank": 4})
    assert checkpoints.verify(good) is None
    assert checkpoints.relocate(good, plan) is False

    foreign = _checkpoint_zip(tmp_path / "0000004_checkpoint.zip", {"data": "/other/work/j1/data", "rank": 4})
    assert checkpoints.relocate(foreign, plan) is True  # another machine's work dir: moved here

    for i, config in enumerate([{"data": "x", "resume_from": "/etc/shadow"},
                                {"data": "x", "examples": {"path": str(work / ".." / ".." / "elsewhere")}},
                                {"data": "x", "lora": "~/.ssh/id_rsa"}]):  # fmt: skip
        bad = _checkpoint_zip(tmp_path / f"000001{i}_checkpoint.zip", config)
        with pytest.raises(checkpoints.CheckpointRefused, match="outside the job's folder"):
            checkpoints.relocate(bad, plan)

    monkeypatch.setattr(checkpoints, "MAX_UNCOMPRESSED_BYTES", 1000)
    bomb = _checkpoint_zip(tmp_path / "0000020_checkpoint.zip", plan, {"bomb.bin": b"\0" * 100_000})
    assert "uncompressed" in (checkpoints.verify(bomb) or "")
    monkeypatch.setattr(checkpoints, "MAX_MEMBERS", 5)
    assert "members" in (checkpoints.verify(good) or "")
    monkeypatch.undo()
    evil = _checkpoint_zip(tmp_path / "0000030_checkpoint.zip", plan, {"../../escape.txt": b"x"})
    assert "outside the archive" in (checkpoints.verify(evil) or "")


# -- unlucky Redis: a full one, a checkpoint whose files are gone --------------------------------


def test_a_full_redis_leaves_the_job_queued_with_the_reason_then_it_runs(cluster, redis_server):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    wait_for(lambda: d.log_has("coordinator.attached"), 30, message="coordinator attached")
    admin = redis_server.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", str(max(1, used - 1)))  # full: every write is refused (OOM)
    drop(d, "ohwx_full", ready="steps = 2\n")
    wait_for(lambda: d.log_has("job.dispatch_failed"), 60, message="the dispatch fails on the full Redis")
    job = d.jobs()[0]
    assert job["state"] == "queued" and "Redis" in (job.get("waiting") or ""), job
    assert "memory" in job["waiting"].lower()
    assert "Redis" in d.cli("status").stdout
    admin.config_set("maxmemory", "0")
    make_worker(redis_server, "a").start()
    wait_for(lambda: d.job_states().get("ohwx_full") == "done", 90, message="dispatched once Redis has room")


def test_a_checkpoint_event_naming_missing_files_is_logged_as_such_and_the_job_goes_on(
    cluster, redis_server, tmp_path
):
    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    make_worker(redis_server, "a", {"SCRIPTED_ENGINE_STEP_S": "0.3"}).start()
    drop(d, "ohwx_gone", ready="steps = 16\n")
    wait_for(lambda: d.job_states().get("ohwx_gone") == "training", 60, message="training remotely")
    job_id = d.jobs()[0]["id"]
    client = redis_server.client()
    token = client.get(lease.token_key(job_id)).decode()
    missing = _ref(f"{lease.files_key(job_id, token)}:state:98:0")
    item = {"rel": "train/checkpoints/0000098_checkpoint.zip", "ref": missing}
    client.xadd(lease.EVENTS, {"job": job_id, "token": token, "kind": "checkpoint", "worker": "a-1",
                               "data": json.dumps({"step": 98, "files": [item]})})  # fmt: skip
    wait_for(
        lambda: d.log_has("coordinator.checkpoint_unusable", job_id=job_id), 60, message="logged as unusable"
    )
    wait_for(lambda: d.job_states().get("ohwx_gone") == "done", 120, message="the job goes on")
    assert not d.log_has("coordinator.redis_unreachable") and not d.log_has("job.lease_lapsed", job_id=job_id)


@pytest.mark.parametrize(
    "worker, raw, field",
    [
        (b"host-1", json.dumps({"token": TOKEN, "reason": "too big", "needs_gb": 64, "has_gb": 16}), None),
        (b"host-1", json.dumps({"token": TOKEN, "needs_gb": "lots"}), "needs_gb"),
        (b"host-1", json.dumps({"token": TOKEN, "reason": ["x"]}), "reason"),
        (b"host-1", json.dumps({"token": "nope"}), "token"),
        (b"../x", json.dumps({"token": TOKEN}), "worker"),
        (b"host-1", b"\xff", "declined"),
    ],
)
def test_decline_records_are_checked(worker, raw, field):
    from daemon.remote.messages import DeclineRecord

    if field is None:
        assert DeclineRecord.from_dict(worker, raw).needs_gb == 64
        return
    with pytest.raises(MessageRefused) as refused:
        DeclineRecord.from_dict(worker, raw)
    assert refused.value.field == field


def test_config_problem_table():
    from engines.mflux.checkpoints import config_problem

    work = "/srv/w/work/j1"
    plan = {"data": f"{work}/data", "model_path": "/models/z", "checkpoint": {"output_path": f"{work}/train"}}
    base = f"{work}/train/checkpoints"
    ok = [{"data_root_relative": "../../data"}, {"model_path": "/models/z"}, {"p": f"{work}/train/x"},
          {"prompt": "a photo of ohwx ~ on a beach"}, {"n": 3, "l": ["a", "b"]}]  # fmt: skip
    bad = [{"data_root_relative": "../../../other/data"}, {"x": "/etc/shadow"}, {"x": "~/.ssh/id_rsa"},
           {"nested": {"list": [f"{work}/../j2/data"]}}, {"x": "../../../../etc"}]  # fmt: skip
    for config in ok:
        assert config_problem(config, plan, base) is None, config
    for config in bad:
        assert "outside the job's folder" in (config_problem(config, plan, base) or ""), config


def test_a_planted_result_found_at_restart_is_checked_like_any_result(cluster, redis_server, tmp_path):
    """Whatever led to a result in <work>/result (here: found there when the coordinator restarts),
    it is published only through collect_result's checks: a report name leaving the folder fails
    the job, nothing is published, and the queue moves on."""
    from test_remote import _result_parts

    make_coordinator, make_worker = cluster
    d = make_coordinator(redis_server).start()
    holds = tmp_path / "holds"
    holds.mkdir()
    (holds / "trained.hold").write_text("")
    make_worker(redis_server, "a", {"SCRIPTED_ENGINE_HOLD_DIR": str(holds)}).start()
    drop(d, "ohwx_planted", ready="steps = 2\n")
    wait_for((holds / "trained.reached").exists, 60, message="worker finished training, holding")
    job_id = d.jobs()[0]["id"]
    d.kill9()
    secret = tmp_path / "secret.txt"
    secret.write_text("the coordinator's secret")
    result = d.state / "jobs" / job_id / "result"
    (result / "report").mkdir(parents=True)
    parts = _result_parts(tmp_path)
    for name, path in (("adapter.safetensors", parts["adapter"]), ("render.png", parts["render"]),
                       ("compare.png", parts["compare"])):  # fmt: skip
        (result / name).write_bytes(path.read_bytes())
    (result / "result.json").write_text(json.dumps({"plan": {}, "report": ["../../../../../../secret.txt"]}))
    d.start()
    wait_for(lambda: d.job_states().get("ohwx_planted") == "failed", 60, message="the planted result refused")
    assert "refused" in d.jobs()[0]["error"] and d.log_has("job.artifact_refused", job_id=job_id)
    assert not published(d, "planted")
    (holds / "trained.hold").unlink()
    drop(d, "ohwx_after", ready="steps = 2\n", seed=1)
    wait_for(lambda: d.job_states().get("ohwx_after") == "done", 90, message="the next job is done")
    assert not [p for p in (d.assets / "loras").rglob("*") if p.is_file() and b"secret" in p.read_bytes()]


def test_checkpoints_out_of_order_are_stale_and_announced_ones_stay_until_a_newer_is_recorded(
    tmp_path, redis_server
):
    """The event order a stopped coordinator sees (checkpoints 2, 4, 6 all queued, then a late 4
    again): each is downloaded from its own keys; 4's handling leaves 6's keys alone; 4 repeated
    after 6 is stale and deletes nothing; a new dispatch may start lower (a retry from scratch)."""
    from test_remote import _coordinator

    from daemon.remote.messages import WorkerEvent

    c = _coordinator(tmp_path, redis_server.url)
    job = c.store.create(job_id="20260101-120000-ab12", dataset_path=tmp_path / "ohwx_x", name="x", trigger="ohwx",
                         fingerprint="f", ready_token=None, settings={}, marker=False)  # fmt: skip
    token, other = "1.aaaaaaaaaaaa", "2.bbbbbbbbbbbb"

    def announce(step: int, tok: str = token) -> dict:
        src = tmp_path / f"ckpt-{tok}-{step}.zip"
        src.write_bytes(b"checkpoint %d" % step)
        ref = c.files.put_file(f"{lease.files_key(job.id, tok)}:state:{step}:0", src)
        item = {"rel": f"train/checkpoints/{step:07d}_checkpoint.zip", "ref": ref.to_dict()}
        return {"job": job.id, "token": tok, "kind": "checkpoint", "worker": "w-1",
                "data": json.dumps({"step": step, "files": [item]})}  # fmt: skip

    events = [announce(s) for s in (2, 4, 6)]  # all announced before the coordinator reads any
    ckpts = c.settings.jobs_dir / job.id / "train" / "checkpoints"
    for fields in events:
        c._checkpoint(job, WorkerEvent.from_dict(fields))
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000006_checkpoint.zip"]
    assert c.store.get(job.id).step == 6
    client = redis_server.client()
    left = {k.decode().split(":state:")[1] for k in client.scan_iter(match="lorad:xfer:job:*:state:*")}
    assert {k.split(":")[0] for k in left} == {"6"}  # older ones deleted only after 6 was recorded

    c._checkpoint(job, WorkerEvent.from_dict(events[1]))  # 4 again, late
    assert c.store.get(job.id).step == 6 and (ckpts / "0000006_checkpoint.zip").is_file()
    assert {
        k.decode().split(":state:")[1].split(":")[0] for k in client.scan_iter(match="lorad:xfer:*:state:*")
    } == {"6"}

    c._checkpoint(job, WorkerEvent.from_dict(announce(2, other)))  # a new dispatch, from scratch
    assert c.store.get(job.id).step == 2 and sorted(p.name for p in ckpts.iterdir()) == [
        "0000002_checkpoint.zip"
    ]
