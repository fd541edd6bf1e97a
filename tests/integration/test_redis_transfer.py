"""Scale-out transport: files and folders through Redis (daemon/remote/transfer.py) and queue URLs
with a password or TLS, against a real redis-server per test (tests/redis_fixture.py).

Kills are deterministic: a writer/reader subprocess SIGKILLs itself from its progress callback after
N chunks; Redis is killed or stopped from the same callback. Nothing sleeps and hopes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.remote import redisurl
from daemon.remote.transfer import (
    ArtifactStore,
    FileRef,
    HostileEntry,
    IntegrityError,
    TransferError,
    TreeRef,
)

ROOT = Path(__file__).resolve().parents[2]


MIB = 1 << 20


def write_random(path: Path, size: int, block: int = MIB) -> str:
    """Write `size` random bytes in blocks (the test process never holds the whole file)."""
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            data = os.urandom(min(block, left))
            fh.write(data)
            h.update(data)
            left -= len(data)
    return h.hexdigest()


def sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def all_keys(client) -> list[bytes]:
    return sorted(client.scan_iter(match="*", count=1000))


def run_script(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_password_url_works_and_wrong_password_is_a_clear_error(redis_factory, tmp_path):
    server = redis_factory(password="hunter2")
    src = tmp_path / "a.bin"
    write_random(src, 5000)
    store = ArtifactStore(server.client(), chunk_size=1024)
    ref = store.put_file("job:1:a", src)
    assert sha_of(store.get_file(ref, tmp_path / "b.bin")) == ref.sha256

    wrong = ArtifactStore(redisurl.make_client(server.url.replace("hunter2", "wrong"), socket_timeout=2))
    with pytest.raises(TransferError) as err:
        wrong.get_file(ref, tmp_path / "c.bin")
    assert "password" in str(err.value) or "credentials" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_tls_url_round_trip_and_unknown_ca_refused(redis_factory, tmp_path):
    server = redis_factory(tls=True, password="hunter2")
    assert server.url.startswith("rediss://")
    src = tmp_path / "a.bin"
    write_random(src, 3 * 1024 + 5)
    store = ArtifactStore(server.client(), chunk_size=1024)
    ref = store.put_file("job:1:a", src)
    assert sha_of(store.get_file(ref, tmp_path / "b.bin")) == ref.sha256

    # Same server, but the client trusts another CA: the handshake fails, nothing is sent.
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    untrusted = server.url.split("?")[0] + f"?ssl_ca_certs={other}"
    with pytest.raises(TransferError) as err:
        ArtifactStore(redisurl.make_client(untrusted, socket_timeout=2)).put_file("job:2:a", src)
    assert "hunter2" not in str(err.value)
    # A plain redis:// client against the TLS port fails too (no silent downgrade).
    plain = server.url.split("?")[0].replace("rediss://", "redis://")
    with pytest.raises(TransferError):
        ArtifactStore(redisurl.make_client(plain, socket_timeout=2, retries=0)).put_file("job:3:a", src)


def test_store_refuses_clients_that_could_hang_or_decode(redis_server):
    import redis

    with pytest.raises(ValueError, match="socket timeout"):
        ArtifactStore(redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=None))
    with pytest.raises(ValueError, match="decode_responses"):
        ArtifactStore(
            redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5, decode_responses=True)
        )


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 4 * 1024, 5 * 1024 + 17])
def test_round_trip_sizes(redis_server, tmp_path, size):
    src = tmp_path / "src.bin"
    sha = write_random(src, size)
    store = ArtifactStore(redis_server.client(), chunk_size=1024, window=2)
    ref = store.put_file("job:7:file", src)
    assert (ref.size, ref.sha256, ref.chunks) == (size, sha, -(-size // 1024))
    again = FileRef.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref and store.exists(again)
    out = store.get_file(again, tmp_path / "out" / "dst.bin")
    assert sha_of(out) == sha
    assert [p.name for p in out.parent.iterdir()] == ["dst.bin"]  # no partial file left


def test_every_key_has_a_ttl_and_delete_prefix_removes_only_that_job(redis_server, tmp_path):
    client = redis_server.client()
    store = ArtifactStore(client, chunk_size=1024, ttl_s=3600)
    write_random(tmp_path / "f.bin", 3000)
    tree = tmp_path / "tree"
    write_random(tree / "a" / "b.bin", 2500)
    (tree / "empty").mkdir()
    store.put_file("job:42:lora", tmp_path / "f.bin")
    store.put_tree("job:42:snapshot", tree)
    store.put_file("job:420:lora", tmp_path / "f.bin")
    keys = all_keys(client)
    assert len(keys) > 6
    for key in keys:
        assert 0 < client.ttl(key) <= 3600, key

    removed = store.delete_prefix("job:42")
    left = all_keys(client)
    assert removed == len(keys) - len(left) > 0
    assert left and all(k.startswith(b"lorad:xfer:job:420:") for k in left)
    assert store.refresh("job:420", 7200) == len(left)
    assert all(3600 < client.ttl(k) <= 7200 for k in left)


def test_bad_keys_are_refused(redis_server):
    store = ArtifactStore(redis_server.client())
    for key in ("", "job:*", "job:[1]", "a b", "x~y", "job?"):
        with pytest.raises(ValueError):
            store.delete_prefix(key)


RSS_SCRIPT = """
    import json, resource, sys
    from pathlib import Path
    from daemon.remote.redisurl import make_client
    from daemon.remote.transfer import ArtifactStore

    def peak():
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    url, src, small, dst = sys.argv[1:5]
    store = ArtifactStore(make_client(url))
    # Warm up on a small file: imports, connection, buffers; then the baseline.
    store.get_file(store.put_file("warm", small), Path(dst).with_name("warm.bin"))
    base = peak()
    ref = store.put_file("big", src)
    after_put = peak()
    store.get_file(ref, dst)
    print(json.dumps({"base": base, "after_put": after_put, "after_get": peak(), "size": ref.size}))
"""


def test_memory_stays_bounded_for_a_file_larger_than_64_mib(redis_server, tmp_path):
    """Peak RSS of a process that uploads and downloads a 96 MiB file grows by far less than the
    file (the store holds window x 1 MiB at a time)."""
    size = 96 * MIB
    src = tmp_path / "big.bin"
    sha = write_random(src, size)
    small = tmp_path / "small.bin"
    write_random(small, 3 * MIB)
    dst = tmp_path / "out" / "big.bin"
    dst.parent.mkdir()
    proc = run_script(RSS_SCRIPT, redis_server.url, str(src), str(small), str(dst), timeout=240)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    growth_put = got["after_put"] - got["base"]
    growth_all = got["after_get"] - got["base"]
    print(
        f"RSS base {got['base'] / MIB:.1f} MiB, +{growth_put / MIB:.1f} MiB after put, +{growth_all / MIB:.1f} MiB after get of {size / MIB:.0f} MiB"
    )
    assert growth_all < 24 * MIB, got
    assert sha_of(dst) == sha


KILL_SCRIPT = """
    import os, signal, sys
    from daemon.remote.redisurl import make_client
    from daemon.remote.transfer import ArtifactStore, FileRef
    import json

    url, mode, key, path, stop_after = sys.argv[1:6]
    store = ArtifactStore(make_client(url), chunk_size=1024, window=1)

    def progress(done, total):
        if done >= int(stop_after):
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash: no cleanup, no flush

    if mode == "put":
        store.put_file(key, path, progress=progress)
    else:
        store.get_file(FileRef.from_dict(json.loads(key)), path, progress=progress)
    print("not killed")
"""


def cmd_calls(client, name: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_upload_killed_midway_resumes_sending_only_the_missing_chunks(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "ckpt.bin"
    sha = write_random(src, 20 * 1024 + 100)  # 21 chunks of 1 KiB
    proc = run_script(KILL_SCRIPT, redis_server.url, "put", "job:5:ckpt", str(src), "8")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    chunk_keys = [k for k in all_keys(client) if b":~c:" in k]
    assert len(chunk_keys) == 8
    assert client.get(b"lorad:xfer:job:5:ckpt:~manifest") is None  # not complete

    store = ArtifactStore(client, chunk_size=1024, window=4)
    sets_before = cmd_calls(client, "set")
    ref = store.put_file("job:5:ckpt", src)
    assert (store.stats.chunks_skipped, store.stats.chunks_sent) == (8, 13)
    assert cmd_calls(client, "set") - sets_before == 13 + 1  # 13 chunks and the manifest
    print("resume upload: 8 of 21 chunks kept, 13 sent")
    assert sha_of(store.get_file(ref, tmp_path / "back.bin")) == sha


def test_download_killed_midway_resumes_from_the_partial_file(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "lora.bin"
    sha = write_random(src, 20 * 1024 + 100)
    ref = ArtifactStore(client, chunk_size=1024).put_file("job:6:lora", src)
    dest = tmp_path / "out" / "lora.safetensors"
    proc = run_script(KILL_SCRIPT, redis_server.url, "get", json.dumps(ref.to_dict()), str(dest), "9")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not dest.exists()
    partial = list(dest.parent.glob(".lora.safetensors.*.part"))
    assert len(partial) == 1 and partial[0].stat().st_size == 9 * 1024

    store = ArtifactStore(client, chunk_size=1024)
    gets_before = cmd_calls(client, "get")
    store.get_file(ref, dest)
    assert (store.stats.chunks_reused, store.stats.chunks_received) == (9, 12)
    assert cmd_calls(client, "get") - gets_before == 12 + 1  # 12 chunks and the manifest
    print("resume download: 9 of 21 chunks reused, 12 fetched")
    assert sha_of(dest) == sha and not partial[0].exists()


def test_a_corrupt_partial_file_is_fetched_again_from_the_first_bad_chunk(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "a.bin"
    sha = write_random(src, 10 * 1024)
    store = ArtifactStore(client, chunk_size=1024)
    ref = store.put_file("job:8:a", src)
    dest = tmp_path / "a.out"
    part = tmp_path / f".a.out.{ref.sha256[:16]}.part"
    data = bytearray(src.read_bytes()[: 6 * 1024])
    data[3 * 1024 + 5] ^= 0xFF  # chunk 3 damaged on the local disk
    part.write_bytes(bytes(data))
    store.get_file(ref, dest)
    assert (store.stats.chunks_reused, store.stats.chunks_received) == (3, 7)
    assert sha_of(dest) == sha


def test_tampered_chunk_is_refused_and_nothing_lands(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "a.bin"
    write_random(src, 5000)
    store = ArtifactStore(client, chunk_size=1024)
    ref = store.put_file("job:9:a", src)
    chunk = client.get(b"lorad:xfer:job:9:a:~c:2")
    client.set(b"lorad:xfer:job:9:a:~c:2", bytes([chunk[0] ^ 1]) + chunk[1:], keepttl=True)
    dest = tmp_path / "out" / "a.bin"
    with pytest.raises(IntegrityError, match="chunk 2"):
        store.get_file(ref, dest)
    assert list(dest.parent.iterdir()) == []  # no dest, no partial file


def test_tampered_manifest_or_reference_is_refused(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "a.bin"
    write_random(src, 5000)
    store = ArtifactStore(client, chunk_size=1024)
    ref = store.put_file("job:10:a", src)
    dest = tmp_path / "out" / "a.bin"

    # A reference claiming other content (a swapped artifact).
    other = FileRef(ref.key, ref.size, "0" * 64, ref.chunks, ref.chunk_size)
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_file(other, dest)

    # A manifest whose chunk hashes were rewritten to match tampered chunks, but not the whole hash.
    name = b"lorad:xfer:job:10:a:~manifest"
    manifest = json.loads(client.get(name))
    bad = b"\x00" * 1024
    client.set(b"lorad:xfer:job:10:a:~c:1", bad, keepttl=True)
    manifest["chunk_sha256"][1] = hashlib.sha256(bad).hexdigest()
    client.set(name, json.dumps(manifest), keepttl=True)
    with pytest.raises(IntegrityError, match="whole file"):
        store.get_file(ref, dest)

    # A manifest that disagrees with the reference (size).
    manifest["size"] = ref.size + 1
    client.set(name, json.dumps(manifest), keepttl=True)
    with pytest.raises(IntegrityError, match="size"):
        store.get_file(ref, dest)

    client.set(name, b"{not json", keepttl=True)
    with pytest.raises(IntegrityError):
        store.get_file(ref, dest)
    assert list(dest.parent.iterdir()) == []


def test_missing_data_is_a_transfer_error(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "a.bin"
    write_random(src, 5000)
    store = ArtifactStore(client, chunk_size=1024)
    ref = store.put_file("job:11:a", src)
    client.delete(b"lorad:xfer:job:11:a:~c:3")
    with pytest.raises(TransferError, match="chunk 3 is missing") as err:
        store.get_file(ref, tmp_path / "b.bin")
    assert not isinstance(err.value, IntegrityError)
    store.delete_prefix("job:11")
    with pytest.raises(TransferError, match="no manifest"):
        store.get_file(ref, tmp_path / "b.bin")


def make_tree(root: Path) -> None:
    write_random(root / "0001.png", 3000)
    (root / "0001.txt").write_text("a caption\n")
    write_random(root / "sub" / "deep" / "x.bin", 1500)
    (root / "sub" / "empty").mkdir()
    (root / "zero").write_bytes(b"")


def tree_listing(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else sha_of(p)) for p in sorted(root.rglob("*"))}


def test_tree_round_trip(redis_server, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    store = ArtifactStore(redis_server.client(), chunk_size=1024)
    ref = store.put_tree("job:12:snapshot", src)
    assert (ref.files, ref.size) == (4, 3000 + 10 + 1500 + 0)
    again = TreeRef.from_dict(json.loads(json.dumps(ref.to_dict())))
    dest = tmp_path / "job" / "data"
    assert store.get_tree(again, dest) == dest
    assert tree_listing(dest) == tree_listing(src)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data"]  # staging renamed away


def test_tree_download_interrupted_by_redis_death_resumes(redis_factory, tmp_path):
    server = redis_factory(appendonly=True)
    src = tmp_path / "src"
    make_tree(src)
    ref = ArtifactStore(server.client(), chunk_size=1024).put_tree("job:13:snapshot", src)

    def kill_after_first(done: int, total: int) -> None:
        if done == 1:
            server.kill9()

    dest = tmp_path / "job" / "data"
    store = ArtifactStore(server.client(socket_timeout=2, retries=0), chunk_size=1024)
    with pytest.raises(TransferError):
        store.get_tree(ref, dest, progress=kill_after_first)
    assert not dest.exists()
    server.restart(keep_data=True)
    store = ArtifactStore(server.client(), chunk_size=1024)
    store.get_tree(ref, dest)
    assert store.stats.files_reused == 1
    assert tree_listing(dest) == tree_listing(src)


def test_get_tree_will_not_overwrite_a_folder_with_content(redis_server, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    store = ArtifactStore(redis_server.client(), chunk_size=1024)
    ref = store.put_tree("job:14:snapshot", src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    with pytest.raises(TransferError, match="not an empty folder"):
        store.get_tree(ref, dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    (dest / "mine.txt").unlink()
    store.get_tree(ref, dest)  # an empty folder is fine
    assert tree_listing(dest) == tree_listing(src)


@pytest.mark.parametrize(
    "plant, reason",
    [
        (lambda d: (d / "link").symlink_to("/etc/passwd"), "symlink"),
        (lambda d: (d / "sub" / "dirlink").symlink_to(d), "symlink"),
        (lambda d: os.mkfifo(d / "pipe"), "FIFO"),
        (lambda d: socket.socket(socket.AF_UNIX).bind(str(d / "sock")), "socket"),
    ],
)
def test_put_tree_refuses_links_and_special_files_before_sending_anything(
    redis_server, tmp_path, plant, reason
):
    client = redis_server.client()
    src = tmp_path / "src"
    make_tree(src)
    plant(src)
    with pytest.raises(HostileEntry, match=reason):
        ArtifactStore(client, chunk_size=1024).put_tree("job:15:snapshot", src)
    assert all_keys(client) == []  # nothing uploaded


def test_put_tree_refuses_a_name_that_is_not_utf8(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "src"
    make_tree(src)
    fd = os.open(os.fsencode(src) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    with pytest.raises(HostileEntry, match="not UTF-8"):
        ArtifactStore(client).put_tree("job:23:snapshot", src)
    assert all_keys(client) == []


def test_put_file_refuses_a_fifo_without_blocking_and_a_symlink(redis_server, tmp_path):
    store = ArtifactStore(redis_server.client())
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would block forever without a writer
    with pytest.raises(HostileEntry, match="FIFO"):
        store.put_file("job:16:x", tmp_path / "pipe")
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HostileEntry, match="symlink"):
        store.put_file("job:16:x", tmp_path / "link")
    with pytest.raises(HostileEntry, match="symlink"):
        store.put_tree("job:16:t", tmp_path / "link")
    with pytest.raises(TransferError, match="no such"):
        store.put_file("job:16:x", tmp_path / "missing")


def real_file_in_tree(store: ArtifactStore, client, tmp_path: Path, tree_key: str) -> dict:
    """Upload a one-file tree and return that file's reference (real data under the tree's keys)."""
    folder = tmp_path / f"upload-{tree_key.replace(':', '-')}"
    folder.mkdir()
    (folder / "fine.txt").write_bytes(b"evil")
    store.put_tree(tree_key, folder)
    return json.loads(client.get(f"lorad:xfer:{tree_key}:~tree".encode()))["entries"][0]["file"]


def plant_tree_manifest(client, tree_key: str, entries: list[dict]) -> TreeRef:
    """A hostile worker's upload: a tree manifest written straight into Redis, with a reference
    whose hash matches it (so only the entry checks stand between it and the disk)."""
    raw = json.dumps({"v": 1, "entries": entries}).encode()
    client.set(f"lorad:xfer:{tree_key}:~tree".encode(), raw, ex=600)
    files = [e["file"] for e in entries if e.get("type") == "file" and isinstance(e.get("file"), dict)]
    return TreeRef(tree_key, len(files), sum(f["size"] for f in files), hashlib.sha256(raw).hexdigest())


@pytest.mark.parametrize(
    "entry_path, entry_type, fragment",
    [
        ("../escaped", "file", "'..'"),
        ("ok/../../escaped", "file", "'..'"),
        ("/tmp/escaped", "file", "absolute"),
        ("link", "symlink", "only files and folders"),
        ("pipe", "fifo", "only files and folders"),
        ("dev", "chardev", "only files and folders"),
    ],
)
def test_get_tree_refuses_a_hostile_manifest_and_writes_nothing(
    redis_server, tmp_path, entry_path, entry_type, fragment
):
    client = redis_server.client()
    store = ArtifactStore(client, chunk_size=1024)
    file_ref = real_file_in_tree(store, client, tmp_path, "job:17:evil")
    entries = [
        {"path": "fine.txt", "type": "file", "file": file_ref},
        {"path": entry_path, "type": entry_type, "file": file_ref},
    ]
    ref = plant_tree_manifest(client, "job:17:evil", entries)
    dest = tmp_path / "work" / "data"
    with pytest.raises(HostileEntry) as err:
        store.get_tree(ref, dest)
    assert fragment in str(err.value)
    assert not (tmp_path / "work").exists()  # nothing written, not even the good entry
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()


def test_get_tree_refuses_entries_pointing_at_other_keys_duplicates_and_file_parents(redis_server, tmp_path):
    client = redis_server.client()
    store = ArtifactStore(client, chunk_size=1024)
    (tmp_path / "p").write_bytes(b"data")
    other_job = store.put_file("job:99:lora", tmp_path / "p")
    mine = FileRef.from_dict(real_file_in_tree(store, client, tmp_path, "job:18:t"))
    cases = [
        ([{"path": "a", "type": "file", "file": other_job.to_dict()}], "outside the tree"),
        (
            [{"path": "a", "type": "file", "file": mine.to_dict()}, {"path": "a", "type": "dir"}],
            "listed twice",
        ),
        (
            [{"path": "a", "type": "file", "file": mine.to_dict()}, {"path": "a/b", "type": "dir"}],
            "is a file",
        ),
        (
            [{"path": "a/b", "type": "dir"}, {"path": "a", "type": "file", "file": mine.to_dict()}],
            "as a folder",
        ),
    ]
    for entries, fragment in cases:
        ref = plant_tree_manifest(client, "job:18:t", entries)
        with pytest.raises(HostileEntry, match=fragment):
            store.get_tree(ref, tmp_path / "dest")
        assert not (tmp_path / "dest").exists()


def test_a_tree_manifest_swapped_for_another_is_an_integrity_error(redis_server, tmp_path):
    client = redis_server.client()
    src = tmp_path / "src"
    make_tree(src)
    store = ArtifactStore(client, chunk_size=1024)
    ref = store.put_tree("job:19:snapshot", src)
    name = b"lorad:xfer:job:19:snapshot:~tree"
    manifest = json.loads(client.get(name))
    manifest["entries"] = manifest["entries"][1:]
    client.set(name, json.dumps(manifest), keepttl=True)
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_tree(ref, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("direction", ["put", "get"])
def test_redis_killed_mid_transfer_is_a_prompt_transfer_error(redis_factory, tmp_path, direction):
    server = redis_factory(appendonly=True)
    src = tmp_path / "a.bin"
    sha = write_random(src, 40 * 1024)
    client = server.client(socket_timeout=3, connect_timeout=2)
    store = ArtifactStore(client, chunk_size=1024, window=2)
    ref = store.put_file("job:20:a", src) if direction == "get" else None

    def kill_at_10(done: int, total: int) -> None:
        if done >= 10 and server.alive():
            server.kill9()

    started = time.monotonic()
    with pytest.raises(TransferError) as err:
        if ref is None:
            store.put_file("job:20:a", src, progress=kill_at_10)
        else:
            store.get_file(ref, tmp_path / "out.bin", progress=kill_at_10)
    elapsed = time.monotonic() - started
    print(f"redis killed mid-{direction}: TransferError after {elapsed:.2f} s: {err.value}")
    assert elapsed < 30, elapsed  # bounded (connect refused + 2 retries); never a hang
    assert "Redis" in str(err.value) and "job:20:a" in str(err.value)
    assert not isinstance(err.value, IntegrityError)
    assert not (tmp_path / "out.bin").exists()

    server.restart(keep_data=True)  # the AOF kept what was acknowledged: the transfer resumes
    store = ArtifactStore(server.client(), chunk_size=1024)
    if ref is None:
        ref = store.put_file("job:20:a", src)
        assert store.stats.chunks_skipped >= 10
    else:
        store.get_file(ref, tmp_path / "out.bin")
        assert store.stats.chunks_reused >= 10
    assert sha_of(store.get_file(ref, tmp_path / "out2.bin")) == sha


def test_a_hung_redis_is_a_transfer_error_after_the_socket_timeout(redis_server, tmp_path):
    src = tmp_path / "a.bin"
    write_random(src, 20 * 1024)
    store = ArtifactStore(
        redis_server.client(socket_timeout=1, connect_timeout=1, retries=1), chunk_size=1024, window=2
    )
    ref = store.put_file("job:21:a", src)

    def stop_at_4(done: int, total: int) -> None:
        if done == 4:
            redis_server.pause()  # SIGSTOP: the socket stays open, nothing answers

    started = time.monotonic()
    try:
        with pytest.raises(TransferError, match="Timeout"):
            store.get_file(ref, tmp_path / "out.bin", progress=stop_at_4)
    finally:
        redis_server.resume()
    print(f"redis stopped mid-get: TransferError after {time.monotonic() - started:.2f} s")
    assert time.monotonic() - started < 20
    store.get_file(ref, tmp_path / "out.bin")  # and it resumes once Redis answers again
    assert store.stats.chunks_reused >= 4


def test_redis_out_of_memory_is_named_and_the_upload_resumes_after(redis_server, tmp_path):
    client = redis_server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(used + 5 * MIB))  # noeviction (the default): writes fail
    src = tmp_path / "a.bin"
    sha = write_random(src, 8 * MIB)
    with pytest.raises(TransferError, match="out of memory") as err:
        ArtifactStore(client, window=1).put_file("job:22:a", src)
    assert "maxmemory" in str(err.value) and len(str(err.value)) < 400  # no chunk bytes quoted
    stored = len([k for k in all_keys(client) if b":~c:" in k])
    assert 1 <= stored < 8
    client.config_set("maxmemory", "0")
    store = ArtifactStore(client, window=1)
    ref = store.put_file("job:22:a", src)
    assert (store.stats.chunks_skipped, store.stats.chunks_sent) == (stored, 8 - stored)
    assert sha_of(store.get_file(ref, tmp_path / "b.bin")) == sha
