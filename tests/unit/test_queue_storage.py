"""huey's bytes have one owner: daemon/remote/redisqueue.py `ClaimingPriorityRedisStorage`.

Pure (reads source, no Redis): outside that class no code in daemon/, engines/ or lorad_base/
names huey's queue key, spells its Redis key, slices a member's 8-byte prefix off, runs the CLAIM
script or decodes a message with the serializer directly instead of huey's `deserialize_task`.
The checker is itself table-tested on planted violations, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "engines", "lorad_base")
OWNER_FILE = "daemon/remote/redisqueue.py"
OWNER_CLASS = "ClaimingPriorityRedisStorage"


def _is_prefix_slice(node: ast.Subscript) -> bool:
    """`x[8:]` (or `x[MEMBER_PREFIX:]`): the shape of unprefixing a huey priority-queue member."""
    s = node.slice
    if not isinstance(s, ast.Slice) or s.upper is not None or s.lower is None:
        return False
    lower = s.lower
    if isinstance(lower, ast.Constant):
        return lower.value == 8
    return isinstance(lower, ast.Attribute | ast.Name) and "PREFIX" in ast.unparse(lower)


def _finding(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and node.attr in ("queue_key", "MEMBER_PREFIX"):
        return f"names huey's {node.attr}"
    if isinstance(node, ast.Name) and node.id in ("queue_key", "MEMBER_PREFIX"):
        return f"names huey's {node.id}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "huey.redis" in node.value:
        return "spells huey's Redis queue key"
    if isinstance(node, ast.Subscript) and _is_prefix_slice(node):
        return "slices a huey member's prefix"
    if (
        isinstance(node, ast.Attribute)
        and node.attr == "CLAIM"
        or isinstance(node, ast.Name)
        and node.id == "CLAIM"
    ):
        if isinstance(node.ctx, ast.Load):
            return "runs the CLAIM script"
    if isinstance(node, ast.Attribute) and node.attr == "deserialize":
        if isinstance(node.value, ast.Attribute) and node.value.attr == "serializer":
            return "decodes a message past huey's deserialize_task"
    return None


def violations(source: str, *, owner_class: str | None = None) -> list[tuple[int, str]]:
    """(line, what) for every touch of huey's bytes outside `owner_class` (None: no owner here)."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == owner_class:
            allowed |= {id(n) for n in ast.walk(node)}
    return sorted(
        (node.lineno, what)
        for node in ast.walk(tree)
        if id(node) not in allowed and (what := _finding(node)) is not None
    )


PLANTED = [
    ("key = queue.storage.queue_key", "names huey's queue_key"),
    ("client.zrange('huey.redis.lorad', 0, -1)", "spells huey's Redis queue key"),
    ("data = member[8:]", "slices a huey member's prefix"),
    ("data = member[Storage.MEMBER_PREFIX:]", "names huey's MEMBER_PREFIX"),
    ("script = client.register_script(lease.CLAIM)", "runs the CLAIM script"),
    ("msg = huey.serializer.deserialize(data)", "decodes a message past huey's deserialize_task"),
]


@pytest.mark.parametrize("source, what", PLANTED)
def test_the_checker_finds_a_planted_touch(source, what):
    assert what in [w for _, w in violations(source)]


@pytest.mark.parametrize(
    "source",
    [
        "head = data[:8]",
        "ok = head[8:9] == b'{'",
        "task = huey.deserialize_task(message)",
        "CLAIM = 'lua'",  # defining the script text is not running it
        "key = lease.token_key(job_id)",
        "rest = text[1:]",
    ],
)
def test_the_checker_leaves_ordinary_code_alone(source):
    assert violations(source) == []


def test_inside_the_owner_class_is_allowed_and_outside_is_not():
    source = (
        "class ClaimingPriorityRedisStorage:\n"
        "    def members(self):\n"
        "        return [m[8:] for m in self.conn.zrange(self.queue_key, 0, -1)]\n"
        "def elsewhere(storage):\n"
        "    return storage.queue_key\n"
    )
    assert violations(source, owner_class=OWNER_CLASS) == [(5, "names huey's queue_key")]


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_nothing_outside_the_storage_subclass_touches_hueys_bytes():
    found = []
    for rel, source in _sources():
        owner = OWNER_CLASS if rel == OWNER_FILE else None
        found += [f"{rel}:{line}: {what}" for line, what in violations(source, owner_class=owner)]
    assert found == []


def test_the_owner_exists_and_owns_listing_and_claiming():
    tree = ast.parse((ROOT / OWNER_FILE).read_text(encoding="utf-8"))
    (owner,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == OWNER_CLASS]
    methods = {n.name for n in owner.body if isinstance(n, ast.FunctionDef)}
    assert {"members", "claim", "discard"} <= methods
    assert "PriorityRedisStorage" in [ast.unparse(b) for b in owner.bases]
