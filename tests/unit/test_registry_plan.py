"""The registry's pure rules: what a publish changes in config.json (versions, moves, clashes), the
lock timeout setting, and when two registry paths are the same file."""

from __future__ import annotations

import pytest

from daemon import registry

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


def test_lock_timeout_setting():
    from daemon.settings import SettingsError, resolve

    assert resolve().lock_timeout_s == 30.0
    assert resolve(env={"LORAD_LOCK_TIMEOUT_S": "2.5"}).lock_timeout_s == 2.5
    with pytest.raises(SettingsError, match="lock_timeout_s"):
        resolve(file_values={"lock_timeout_s": 0})


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
