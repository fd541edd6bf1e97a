"""Issue 12, items 2, 3, 5, 8: unambiguous LoRA names, name byte lengths checked at validation,
a symlinked or shared registry, a bounded registry lock with a publish-only retry."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import wait_for

from daemon import registry
from daemon.intake import contract
from daemon.intake.validate import validate_dataset
from daemon.publish import metadata_of
from daemon.sample import make_dataset

# -- item 2: one LoRA name, one set of paths ---------------------------------------------------


@pytest.mark.parametrize(
    "name, clash",
    [
        ("alice", None),
        ("a..b", None),
        ("ünï cödé 名前", None),
        ("alice.compared", None),
        ("alice.v2x", None),
        ("alice.v", None),
        ("john@work", None),
        ("alice.compare", "alice.compare.png is the side-by-side render of the LoRA 'alice'"),
        ("Alice.COMPARE", "Alice.compare.png is the side-by-side render of the LoRA 'Alice'"),
        ("alice.report", "alice.report/ is the report folder of the LoRA 'alice'"),
        ("alice.png", "alice.png is the test render of the LoRA 'alice'"),
        ("alice.safetensors", "alice.safetensors is the LoRA file of the LoRA 'alice'"),
        ("alice.v2", "alice.v2.safetensors is where version 2 of the LoRA 'alice' is kept"),
        ("alice.V17", "alice.V17.safetensors is where version 17 of the LoRA 'alice' is kept"),
        ("bad\udcff", "not valid UTF-8"),
    ],
)
def test_lora_name_rule(name, clash):
    findings = contract.check_lora_name(name, "READY")
    if clash is None:
        assert findings == []
    else:
        assert len(findings) == 1 and findings[0].level == "error" and findings[0].file == "READY"
        assert clash in findings[0].message, findings[0].message


def _paths_of(name: str) -> set[str]:
    return {n.casefold() for n in contract.created_names(name) if not n.startswith(".")}


def test_accepted_names_own_disjoint_paths():
    """Every pair of names the rule accepts owns disjoint output paths (the property item 2 asks)."""
    names = [
        "alice",
        "alice.compar",
        "alice.comparex",
        "alice.v",
        "alice.vx",
        "alice.report-x",
        "bob",
        "Alice-2",
        "a..b",
    ]
    assert all(contract.check_lora_name(n, ".") == [] for n in names)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a.casefold() != b.casefold():
                assert not (_paths_of(a) & _paths_of(b)), (a, b)


def test_clashing_name_is_refused_at_validation(tmp_path):
    folder = make_dataset(tmp_path / "assets" / "training_data" / "ohwx_alice", images=1)
    report = validate_dataset(folder, ready_text=b'name = "alice.compare"\n')
    assert not report.valid
    (error,) = [f for f in report.errors if f.code == "name.reserved"]
    assert error.file == "READY" and "alice.compare.png" in error.message and "'alice'" in error.message
    folder2 = make_dataset(tmp_path / "assets" / "training_data" / "ohwx_bob.v1", images=1)
    report = validate_dataset(folder2, ready_text=b"")
    assert [f.file for f in report.errors if f.code == "name.reserved"] == ["."]


# -- item 8: every path lorad will create fits the file system ---------------------------------


@pytest.mark.parametrize(
    "name, longest_bytes",
    [
        ("alice", 39),  # .alice.safetensors.9999999.ffffffff.tmp
        ("é" * 10, 20 + 34),
        ("😀" * 100, 400 + 34),
        ("x" * 221, 255),
    ],
)
def test_longest_created_name(name, longest_bytes):
    longest, size = contract.longest_created_name(name)
    assert size == longest_bytes and longest.startswith(".") and longest.endswith(".tmp")


@pytest.mark.parametrize(
    "name, loras_dir, dataset_dir, path_max, expect",
    [
        ("x" * 221, "/a/loras", "/a/training_data/o_x", 1024, None),
        (
            "x" * 222,
            "/a/loras",
            "/a/training_data/o_x",
            1024,
            "256 bytes, over the file system's limit of 255 bytes",
        ),
        ("😀" * 100, "/a/loras", "/a/training_data/o_x", 1024, "is 400 bytes in UTF-8"),
        (
            "alice",
            "/" + "d" * 990,
            "/a/training_data/o_x",
            1024,
            "over the file system's path limit of 1024 bytes",
        ),
        ("alice", "/a/loras", "/" + "d" * 1000, 1024, "a marker in the dataset folder"),
        ("alice", "/" + "d" * 990, "/a/training_data/o_x", 4096, None),
    ],
)
def test_name_length_rule(name, loras_dir, dataset_dir, path_max, expect):
    findings = contract.check_name_lengths(
        name, ".", loras_dir=loras_dir, dataset_dir=dataset_dir, name_max=255, path_max=path_max
    )
    if expect is None:
        assert findings == []
    else:
        assert len(findings) == 1 and expect in findings[0].message, findings


def test_too_long_names_are_refused_at_validation(tmp_path):
    td = tmp_path / "assets" / "training_data"
    emoji = make_dataset(td / "ohwx_emoji", images=1)
    report = validate_dataset(emoji, ready_text=('name = "' + "😀" * 100 + '"\n').encode())
    (error,) = [f for f in report.errors if f.code == "name.toolong"]
    assert error.file == "READY" and "400 bytes" in error.message and "255" in error.message
    long_folder = make_dataset(td / ("ohwx_" + "a" * 235), images=1)  # a 240-character folder name
    report = validate_dataset(long_folder, ready_text=b"")
    (error,) = [f for f in report.errors if f.code == "name.toolong"]
    assert error.file == "." and "269 bytes" in error.message


# -- through the daemon --------------------------------------------------------------------


@pytest.fixture
def daemons(daemon_factory):
    """Daemons with their own assets folders under one tmp_path (conftest's daemon_factory)."""
    return daemon_factory


def test_refused_names_never_train_and_leave_other_loras_alone(daemons):
    d = daemons("one").start()
    alice = make_dataset(d.training_data / "ohwx_alice", images=1)
    (alice / "READY").write_text("")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 60, message="alice done")
    compare = d.assets / "loras" / "alice.compare.png"
    before = compare.read_bytes()
    clash = make_dataset(d.training_data / "ohwx_other", images=1, seed=3)
    (clash / "READY").write_text('name = "alice.compare"\n')
    emoji = make_dataset(d.training_data / "ohwx_emoji", images=1, seed=4)
    (emoji / "READY").write_text('name = "' + "😀" * 100 + '"\n')
    wait_for(
        lambda: (clash / "FAILED.txt").exists() and (emoji / "FAILED.txt").exists(), 60, message="refusals"
    )
    assert "alice.compare.png" in (clash / "FAILED.txt").read_text()
    assert "400 bytes" in (emoji / "FAILED.txt").read_text()
    assert compare.read_bytes() == before
    assert sorted(p.name for p in (d.assets / "loras").iterdir()) == [
        "alice.compare.png",
        "alice.png",
        "alice.report",
        "alice.safetensors",
    ]
    assert not d.log_has("job.started", dataset="ohwx_other") and not d.log_has(
        "job.started", dataset="ohwx_emoji"
    )


# -- item 3: a symlinked registry shared by two assets folders --------------------------------


def test_two_daemons_share_a_symlinked_registry_without_clobbering(daemons, tmp_path):
    shared = tmp_path / "shared" / "config.json"
    shared.parent.mkdir()
    shared.write_text(json.dumps({"app": {"theme": "dark"}, "loras": {}}))
    shared.chmod(0o640)
    ds = []
    for sub in ("a", "b"):
        link = tmp_path / sub / "config.json"
        link.parent.mkdir()
        link.symlink_to(shared)
        ds.append(daemons(sub, extra_env={"LORAD_REGISTRY": str(link)}).start())
    for i, d in enumerate(ds):
        folder = make_dataset(d.training_data / "ohwx_alice", images=1, seed=i)
        (folder / "READY").write_text("")
    for d in ds:
        wait_for(lambda d=d: d.job_states().get("ohwx_alice") == "done", 90, message="both done")
    for sub in ("a", "b"):
        assert (tmp_path / sub / "config.json").is_symlink()  # still a link: the target got the entries
    assert shared.stat().st_mode & 0o777 == 0o640
    data = json.loads(shared.read_text())
    assert data["app"] == {"theme": "dark"}
    entries = data["loras"]
    assert len(entries) == 2, entries
    keys = sorted(entries, key=len)
    assert keys[0] == "alice" and keys[1].startswith("alice@")
    for d in ds:
        lora = d.assets / "loras" / "alice.safetensors"
        (mine,) = [e for e in entries.values() if e["path"] == str(lora)]
        assert mine["job_id"] == metadata_of(lora)["lorad.job_id"]
    later = next(d for d in ds if str(d.assets) in entries[keys[1]]["path"])
    assert later.log_has("registry.clash", key="alice", kept_as=keys[1])
    assert not [p for p in shared.parent.iterdir() if p.name.endswith(".tmp")]


# -- item 5: a held registry lock fails one job after lock_timeout_s; the queue goes on ---------


def _hold_lock(lock: Path) -> subprocess.Popen:
    """`flock -x <lock> sleep 300`: another program holding the registry lock (its own group, so
    the sleep that inherits the lock goes too)."""
    return subprocess.Popen(["flock", "-x", str(lock), "sleep", "300"], start_new_session=True)


def _release(holder: subprocess.Popen) -> None:
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()


def _lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_held_registry_lock_fails_the_job_next_job_runs_retry_completes_registry_only(daemons):
    d = daemons("one", extra_env={"LORAD_LOCK_TIMEOUT_S": "1", "SCRIPTED_ENGINE_STEP_S": "0.2"})
    lock = d.registry.with_name(d.registry.name + ".lock")
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        d.start()
        first = make_dataset(d.training_data / "ohwx_first", images=1)
        (first / "READY").write_text("steps = 2\n")
        wait_for(lambda: "ohwx_first" in d.job_states(), 30, message="first queued")
        second = make_dataset(d.training_data / "ohwx_second", images=1, seed=2)
        (second / "READY").write_text("steps = 60\n")
        wait_for(lambda: d.job_states().get("ohwx_first") == "failed", 60, message="first fails on the lock")
        job = next(j for j in d.jobs() if j["dataset"] == "ohwx_first")
        assert str(lock) in job["error"] and f"pid {holder.pid}" in job["error"] and "flock" in job["error"]
        assert f"lorad retry {job['id']}" in job["error"]
        assert d.log_has("registry.lock_wait", job_id=job["id"]) and d.log_has(
            "registry.lock_timeout", job_id=job["id"]
        )
        lora = d.assets / "loras" / "first.safetensors"
        assert metadata_of(lora)["lorad.job_id"] == job["id"]  # the LoRA itself is published
        assert not d.registry.exists()  # the registry was never written
        # The queue is not stalled: the next job runs while the lock is still held.
        wait_for(
            lambda: d.job_states().get("ohwx_second") in ("training", "rendering", "publishing"),
            60,
            message="second runs while the lock is held",
        )
        assert holder.poll() is None
    finally:
        _release(holder)
    wait_for(lambda: d.job_states().get("ohwx_second") == "done", 90, message="second done")
    lora_bytes = lora.read_bytes()
    children = len([e for e in d.events() if e["event"] == "job.child" and e.get("job_id") == job["id"]])
    assert d.cli("retry", job["id"]).returncode == 0
    wait_for(lambda: d.job_states().get("ohwx_first") == "done", 60, message="first done after retry")
    events = [e for e in d.events() if e.get("job_id") == job["id"]]
    assert len([e for e in events if e["event"] == "job.child"]) == children  # no retraining, no re-render
    assert not [e for e in events if e["event"] == "train.resume"]
    assert d.log_has("job.registry_only", job_id=job["id"])
    assert lora.read_bytes() == lora_bytes
    assert sorted(p.name for p in (d.assets / "loras").glob("first*")) == [
        "first.compare.png",
        "first.png",
        "first.report",
        "first.safetensors",
    ]  # no .v1 of its own file
    entries = json.loads(d.registry.read_text())["loras"]
    assert set(entries) == {"first", "second"}
    assert entries["first"]["job_id"] == job["id"] and entries["first"]["path"] == str(lora)
    done = next(j for j in d.jobs() if j["dataset"] == "ohwx_first")
    assert done["outputs"]["lora"] == str(lora)


def test_kill9_while_waiting_for_the_registry_lock_next_start_completes_registry_only(daemons):
    d = daemons("one").start()
    lock = d.registry.with_name(d.registry.name + ".lock")
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        folder = make_dataset(d.training_data / "ohwx_pub", images=1)
        (folder / "READY").write_text("")
        wait_for(lambda: d.log_has("registry.lock_wait"), 60, message="waiting for the lock (files renamed)")
        d.kill9()
    finally:
        _release(holder)
    job = d.jobs()[0]
    lora = d.assets / "loras" / "pub.safetensors"
    assert metadata_of(lora)["lorad.job_id"] == job["id"]
    lora_bytes = lora.read_bytes()
    d.start()
    wait_for(lambda: d.job_states().get("ohwx_pub") == "done", 60, message="done after restart")
    assert d.log_has("job.registry_only", job_id=job["id"]) and not d.log_has(
        "train.resume", job_id=job["id"]
    )
    assert lora.read_bytes() == lora_bytes and not list((d.assets / "loras").glob("pub.v*"))
    assert json.loads(d.registry.read_text())["loras"]["pub"]["job_id"] == job["id"]


# -- registry keys: a pure plan ------------------------------------------------------------

A = "/A/loras"
P = f"{A}/alice.safetensors"
B_ALICE = {"path": "/B/loras/alice.safetensors", "job_id": "jb"}


def _e(path, job):
    return {"path": path, "job_id": job, "render": path[: -len(".safetensors")] + ".png"}


NEW = _e(P, "j2")
OLD = _e(P, "j1")
OLD_V1 = {
    **OLD,
    "path": f"{A}/alice.v1.safetensors",
    "render": f"{A}/alice.v1.png",
    "compare": f"{A}/alice.v1.compare.png",
}


@pytest.mark.parametrize(
    "entries, versions, moved, updates, removals, clashes",
    [
        ({}, {}, None, {"alice": NEW}, set(), []),
        ({"alice": NEW}, {}, None, {"alice": NEW}, set(), []),  # the same job again
        ({"alice": OLD}, {"j1": "alice.v1"}, None, {"alice": NEW, "alice.v1": OLD_V1}, set(), []),
        ({"alice": OLD}, {}, "alice.v1", {"alice": NEW, "alice.v1": OLD_V1}, set(), []),
        (
            {"alice": OLD},
            {},
            None,
            {"alice": NEW},
            set(),
            [],
        ),  # its file is gone: the stale entry is replaced
        ({"alice": B_ALICE}, {}, None, {"alice@TAG": NEW}, set(), [("alice", "alice@TAG", B_ALICE["path"])]),
        ({"alice": 1}, {}, None, {"alice@TAG": NEW}, set(), [("alice", "alice@TAG", "1")]),
        (
            {"alice": {"path": f"{A}/bob.safetensors"}},
            {},
            None,
            {"alice@TAG": NEW},
            set(),
            [("alice", "alice@TAG", f"{A}/bob.safetensors")],
        ),
        (
            {"alice": B_ALICE, "alice@TAG": OLD},
            {"j1": "alice.v1"},
            None,
            {"alice@TAG": NEW, "alice.v1": OLD_V1},
            set(),
            [("alice", "alice@TAG", B_ALICE["path"])],
        ),
        (
            {"alice.v1": {"path": "/B/loras/alice.v1.safetensors"}, "alice": OLD},
            {"j1": "alice.v1"},
            None,
            {"alice": NEW, "alice.v1@TAG": OLD_V1},
            set(),
            [("alice.v1", "alice.v1@TAG", "/B/loras/alice.v1.safetensors")],
        ),
        ({"alice@TAG": NEW}, {}, None, {"alice": NEW}, {"alice@TAG"}, []),  # back to its plain key
        # Keys and paths differing only in case are one (issue 19 case 9):
        ({"ALICE": B_ALICE}, {}, None, {"alice@TAG": NEW}, set(), [("alice", "alice@TAG", B_ALICE["path"])]),
        (
            {"Alice": {**OLD, "path": f"{A}/Alice.safetensors"}},
            {"j1": "alice.v1"},
            None,
            {"alice": NEW, "alice.v1": OLD_V1},
            {"Alice"},
            [],
        ),  # the entry of the file now kept as alice.v1 follows it, whatever its path's case
        ({"ALICE": {**NEW, "path": f"{A}/ALICE.safetensors"}}, {}, None, {"alice": NEW}, {"ALICE"}, []),
    ],
)
def test_registry_plan(entries, versions, moved, updates, removals, clashes):
    tag = registry.folder_tag(A)

    def real(value):  # "@TAG" in the table stands for this folder's tag
        if isinstance(value, str):
            return value.replace("@TAG", "@" + tag)
        if isinstance(value, dict):
            return {real(k): v for k, v in value.items()}
        if isinstance(value, set):
            return {real(v) for v in value}
        return [tuple(real(x) for x in c) for c in value]

    entries, updates, removals, clashes = real(entries), real(updates), real(removals), real(clashes)
    plan = registry.plan_entries(entries, name="alice", entry=NEW, folder=A, versions=versions, moved=moved)
    assert plan.updates == updates
    assert plan.removals == removals
    assert [(c.key, c.kept_as, c.other) for c in plan.clashes] == clashes


def test_lock_timeout_names_the_holder(tmp_path):
    path = tmp_path / "config.json"
    lock = tmp_path / "config.json.lock"
    holder = _hold_lock(lock)
    try:
        wait_for(lambda: _lock_is_held(lock), 10, message="flock holds the lock")
        with pytest.raises(registry.RegistryLockTimeout) as info:
            with registry.Transaction(path, timeout_s=0.3):
                pass
        assert (
            f"pid {holder.pid}" in str(info.value)
            and "flock" in str(info.value)
            and str(lock) in str(info.value)
        )
    finally:
        _release(holder)
    with registry.Transaction(path, timeout_s=5) as txn:  # free again
        txn.prepare({"x": {"path": "p"}})
        txn.commit()
    assert json.loads(path.read_text())["loras"] == {"x": {"path": "p"}}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_lock_timeout_setting():
    from daemon.settings import SettingsError, resolve

    assert resolve().lock_timeout_s == 30.0
    assert resolve(env={"LORAD_LOCK_TIMEOUT_S": "2.5"}).lock_timeout_s == 2.5
    with pytest.raises(SettingsError, match="lock_timeout_s"):
        resolve(file_values={"lock_timeout_s": 0})


# -- names compared as the file system compares them (issue 19 case 9) ---------------------------


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("Alice", "alice", True),
        ("ALICE", "alice", True),
        ("\u00e9lodie", "e\u0301lodie", True),  # NFC vs NFD (APFS folds both)
        ("\u00c9LODIE", "e\u0301lodie", True),
        ("stra\u00dfe", "STRASSE", True),  # full case folding
        ("\u212bngstr\u00f6m", "\u00e5ngstr\u00f6m", True),  # the Angstrom sign is A-ring
        ("alice", "alice2", False),
        ("alice", "al ice", False),
        ("e\u0301", "e", False),  # an accent is not dropped
        ("alice", "alice.v1", False),
    ],
)
def test_name_key(a, b, same):
    assert (contract.name_key(a) == contract.name_key(b)) is same
    assert contract.name_key(a) == contract.name_key(contract.name_key(a))  # a fixed point


@pytest.mark.parametrize(
    "name, entries, spelling",
    [
        ("alice", [], "alice"),
        ("alice", ["Alice.safetensors", "Alice.png"], "Alice"),
        ("Alice", ["alice.safetensors", "Alice.png"], "Alice"),  # its own files exist: itself
        ("alice", ["Alice.png", "ALICE.safetensors"], "ALICE"),  # the LoRA file's spelling first
        ("alice", ["Alice.v1.safetensors"], "alice"),  # only an old version: nothing to follow
        ("e\u0301lodie", ["\u00e9lodie.safetensors"], "\u00e9lodie"),
        ("alice", [".Alice.safetensors.12.abcd.tmp", "Alice.report"], "Alice"),
        ("bob", ["Alice.safetensors"], "bob"),
    ],
)
def test_choose_spelling(name, entries, spelling):
    from daemon.publish import choose_spelling

    assert choose_spelling(name, entries) == spelling


@pytest.mark.parametrize(
    "name, entries, other",
    [
        ("alice", [], None),
        ("alice", ["alice.safetensors", "Alice.safetensors"], None),  # its own spelling exists
        ("alice", ["Alice.safetensors", "Alice.png"], "Alice"),
        ("e\u0301lodie", ["\u00e9lodie.safetensors"], "\u00e9lodie"),
        ("alice", ["Alice.v1.safetensors", ".Alice.safetensors.1.ab.tmp"], None),
        ("bob", ["Alice.safetensors"], None),
    ],
)
def test_name_spelling_warning(name, entries, other):
    found = contract.check_name_spelling(name, "READY", entries)
    if other is None:
        assert found == []
    else:
        assert [(f.level, f.code) for f in found] == [("warning", "name.spelling")]
        assert f"{other}.safetensors" in found[0].message and f"{other}.v<N>" in found[0].message


@pytest.mark.parametrize(
    "name, entries, n",
    [
        ("alice", [], 1),
        ("alice", ["alice.v1.safetensors"], 2),
        ("Alice", ["alice.v1.safetensors", "ALICE.v2.png"], 3),  # any spelling holds the number
        ("alice", ["alice.v2.report"], 1),
        ("alice", ["bob.v1.safetensors", "alice.safetensors"], 1),
    ],
)
def test_next_version(name, entries, n):
    from daemon.publish import next_version

    assert next_version(name, entries) == n


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("/A/loras/alice.safetensors", "/A/loras/alice.safetensors", True),
        ("/A/loras/Alice.safetensors", "/A/loras/alice.safetensors", True),
        ("/A/loras/alice.safetensors", "/B/loras/alice.safetensors", False),
        ("/A/Loras/alice.safetensors", "/A/loras/alice.safetensors", False),  # folders: exactly
    ],
)
def test_registry_same_path(a, b, same):
    assert registry.same_path(a, b) is same


def test_datasets_differing_only_in_case_are_one_lora_name(daemons):
    """`ohwx_Alice` then `ohwx_alice`: the second publishes under the first's spelling and keeps
    it as `Alice.v1` with its renders (on APFS the two spellings are one file, and the second
    publish silently replaced the first's LoRA and renders)."""
    d = daemons("case").start()
    first = make_dataset(d.training_data / "ohwx_Alice", images=1)
    (first / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_Alice") == "done", 60, message="Alice done")
    loras = d.assets / "loras"
    before = {p.name: p.read_bytes() for p in loras.iterdir() if p.is_file()}
    second = make_dataset(d.training_data / "ohwx_alice", images=1, seed=7)
    (second / "READY").write_text("steps = 2\n")
    wait_for(lambda: d.job_states().get("ohwx_alice") == "done", 60, message="alice done")
    jobs = {j["dataset"]: j for j in d.jobs()}
    assert sorted(p.name for p in loras.iterdir()) == [
        "Alice.compare.png",
        "Alice.png",
        "Alice.report",
        "Alice.safetensors",
        "Alice.v1.compare.png",
        "Alice.v1.png",
        "Alice.v1.report",
        "Alice.v1.safetensors",
    ]
    for name, data in before.items():
        assert (loras / name.replace("Alice", "Alice.v1", 1)).read_bytes() == data, name
    assert metadata_of(loras / "Alice.safetensors")["lorad.job_id"] == jobs["ohwx_alice"]["id"]
    entries = json.loads(d.registry.read_text())["loras"]
    assert {k: v["job_id"] for k, v in entries.items()} == {
        "Alice": jobs["ohwx_alice"]["id"],
        "Alice.v1": jobs["ohwx_Alice"]["id"],
    }
    assert jobs["ohwx_alice"]["outputs"]["lora"] == str(loras / "Alice.safetensors")
    assert d.log_has("publish.spelling", name="alice", published_as="Alice")
    assert "is the LoRA 'Alice' already published" in (second / "DONE").read_text()  # said up front
