"""The transfer's pure checks: a file reference from hostile JSON, entry paths of a tree manifest
(refused and accepted), and the tree-entry check that orders nothing."""

from __future__ import annotations

import hashlib

import pytest

from daemon.remote.transfer import (
    FileRef,
    HostileEntry,
    TransferError,
    check_entry_path,
    check_tree_entries,
)


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"key": "k", "size": 1, "sha256": "0" * 64, "chunks": 1},  # no chunk_size
        {"key": "k", "size": 1, "sha256": "xyz", "chunks": 1, "chunk_size": 1024},
        {"key": "k", "size": 5000, "sha256": "0" * 64, "chunks": 1, "chunk_size": 1024},
        {"key": "k", "size": 1, "sha256": "0" * 64, "chunks": 1, "chunk_size": 1 << 30},  # memory
        {"key": "k", "size": True, "sha256": "0" * 64, "chunks": 1, "chunk_size": 1024},
        {"key": "k*", "size": 1, "sha256": "0" * 64, "chunks": 1, "chunk_size": 1024},
    ],
)
def test_file_ref_from_dict_refuses_garbage(data):
    with pytest.raises(TransferError):
        FileRef.from_dict(data)


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../../x",
        "/etc/cron.d/x",
        "a//b",
        "./a",
        "a/.",
        "",
        "C:/x",
        "a\\..\\x",
        "a\x00b",
        "x/" + "a" * 5000,
    ],
)
def test_check_entry_path_refuses(path):
    with pytest.raises(HostileEntry):
        check_entry_path(path)


@pytest.mark.parametrize("path", ["a", "0001.png", "sub/deep/x.bin", "..a", "a..", "é/ü.txt", ".hidden"])
def test_check_entry_path_accepts(path):
    assert check_entry_path(path) == path


def test_check_tree_entries_is_pure_and_orders_nothing():
    ref = {
        "key": "t:~f:0",
        "size": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "chunks": 0,
        "chunk_size": 1024,
    }
    got = check_tree_entries(
        [{"path": "d", "type": "dir"}, {"path": "d/f", "type": "file", "file": ref}], "t"
    )
    assert [(p, k) for p, k, _ in got] == [("d", "dir"), ("d/f", "file")]
