"""LoRA names: one name owns one set of paths, clashing and too-long names are refused at
validation (byte lengths, PATH_MAX), case and Unicode spellings are one name, and the next version."""

from __future__ import annotations

import pytest

from daemon.intake import contract
from daemon.intake.validate import validate_dataset
from daemon.sample import make_dataset


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


A = "/A/loras"


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
