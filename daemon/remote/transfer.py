"""Files and folders through Redis itself: the scale-out transport (issue 14; docs/ARCHITECTURE.md
"Transport" says why Redis and not HTTP).

API (what the coordinator and workers use; FileRef/TreeRef travel in task payloads as dicts):

    store = ArtifactStore(client, prefix="lorad", ttl_s=DEFAULT_TTL_S)
    ref  = store.put_file("job:42:lora", path)         -> FileRef   (resumable upload)
    path = store.get_file(ref, dest)                   -> Path      (verified, atomic, resumable)
    tref = store.put_tree("job:42:snapshot", folder)   -> TreeRef   (refuses links, special files)
    path = store.get_tree(tref, dest)                  -> Path      (refuses `..`, absolute, links)
    store.delete_prefix("job:42")                      -> int       (every key of the job)
    store.exists(ref) / store.refresh("job:42")        (is it complete / extend the TTL)
    FileRef.to_dict() / FileRef.from_dict(d), TreeRef.to_dict() / TreeRef.from_dict(d)
    errors: TransferError (Redis down, missing data) > IntegrityError (hash/size) and
            HostileEntry (a path or entry that must not be written or sent)

Layout in Redis, under `<prefix>:xfer:<key>`:
    :~c:<i>      chunk i (1 MiB), SET with a TTL
    :~sums       hash i -> sha256 of chunk i, written in the same MULTI/EXEC as the chunk, so a
                 restarted writer skips chunks already there (and intact) and sends only the rest
    :~manifest   JSON {v, size, sha256, chunk_size, chunks, chunk_sha256: [...]}, written LAST:
                 its presence means "complete"
    :~tree       (trees) JSON {v, entries: [{path, type: "dir"|"file", file: FileRef}]}; the
                 files of a tree are stored under `<key>:~f:<n>`, so delete_prefix(key) removes all.
`~` cannot appear in a caller's key, so a caller's keys never collide with these.

Memory: at most `window` chunks (4 MiB by default) are held at a time, on both sides, whatever the
file size. Every Redis call runs on the client's socket timeout (a client without one is refused);
a Redis that dies or hangs mid-transfer ends in TransferError, never a hang.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from daemon.fsutil import NotARegularFile, file_kind, fsync_dir, open_regular

if TYPE_CHECKING:
    import redis

CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_CHUNK_SIZE = 8 << 20  # a manifest asking for larger chunks is refused (bounded memory on get)
WINDOW = 4  # chunks per round trip (pipeline): the memory bound is window * chunk_size
DEFAULT_TTL_S = 7 * 24 * 3600  # a job may wait days for a worker; keys are deleted when it ends
MAX_MANIFEST_BYTES = 16 << 20  # file manifests (64 B per chunk) and tree manifests are read whole
MAX_PATH_CHARS = 4096
MANIFEST_VERSION = 1

# Caller keys: hierarchical with ':', no glob characters (SCAN MATCH-safe), no '~' (ours).
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_REF_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:~-]{0,299}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

Progress = Callable[[int, int], None]  # (done, total): chunks for files, files for trees


class TransferError(Exception):
    """A transfer that did not complete: Redis unreachable/timed out/refused, data missing or
    expired, a destination in the way. Retrying later may succeed (uploads and downloads resume)."""


class IntegrityError(TransferError):
    """Data that does not match its manifest or reference (size, sha256): never written to dest."""


class HostileEntry(TransferError):
    """A tree entry lorad must not send or write: `..`, an absolute path, a symlink, a FIFO,
    a device... `path` is the entry, `reason` what is wrong with it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path!r}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------
# References (they travel in task payloads)


def _want(data: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TransferError(f"{what}: field {name!r} missing or not {kind.__name__}: {value!r}")
    return value


@dataclass(frozen=True)
class FileRef:
    """One uploaded file: where (key), what (size, sha256) and how it is cut (chunks, chunk_size)."""

    key: str
    size: int
    sha256: str
    chunks: int
    chunk_size: int = CHUNK_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": self.chunks,
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "FileRef":
        """Checked: a payload from another machine is input, not trust."""
        what = "file reference"
        if not isinstance(data, dict):
            raise TransferError(f"{what}: not an object: {type(data).__name__}")
        ref = cls(
            key=_want(data, "key", str, what),
            size=_want(data, "size", int, what),
            sha256=_want(data, "sha256", str, what),
            chunks=_want(data, "chunks", int, what),
            chunk_size=_want(data, "chunk_size", int, what),
        )
        ref.check()
        return ref

    def check(self) -> None:
        """The fields agree with each other (pure); raises IntegrityError/TransferError."""
        if not _REF_KEY.match(self.key):
            raise TransferError(f"file reference: bad key {self.key!r}")
        if not _HEX64.match(self.sha256):
            raise TransferError(f"file reference {self.key}: sha256 is not 64 hex digits")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise IntegrityError(
                f"file reference {self.key}: chunk size {self.chunk_size} outside 1..{MAX_CHUNK_SIZE}"
            )
        if self.size < 0 or self.chunks != chunk_count(self.size, self.chunk_size):
            raise IntegrityError(
                f"file reference {self.key}: {self.chunks} chunks do not fit {self.size} bytes in chunks of {self.chunk_size}"
            )


@dataclass(frozen=True)
class TreeRef:
    """One uploaded folder: its key, how many files and bytes, and the sha256 of its tree manifest
    (which holds every file's FileRef, so this one hash pins the whole tree)."""

    key: str
    files: int
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "files": self.files, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any) -> "TreeRef":
        what = "tree reference"
        if not isinstance(data, dict):
            raise TransferError(f"{what}: not an object: {type(data).__name__}")
        ref = cls(
            key=_want(data, "key", str, what),
            files=_want(data, "files", int, what),
            size=_want(data, "size", int, what),
            sha256=_want(data, "sha256", str, what),
        )
        if not _KEY.match(ref.key) or not _HEX64.match(ref.sha256) or ref.files < 0 or ref.size < 0:
            raise TransferError(f"{what}: invalid fields {ref.to_dict()!r}")
        return ref


@dataclass
class TransferStats:
    """Counters since the store was made (tests read them to check what a resume re-sent)."""

    chunks_sent: int = 0
    chunks_skipped: int = 0  # upload: already in Redis and intact
    bytes_sent: int = 0
    chunks_received: int = 0
    chunks_reused: int = 0  # download: already in the partial file and intact
    bytes_received: int = 0
    files_reused: int = 0  # download: dest already held the content


# --------------------------------------------------------------------------------------------
# Pure rules


def chunk_count(size: int, chunk_size: int) -> int:
    return math.ceil(size / chunk_size) if size > 0 else 0


def check_key(key: str) -> str:
    """A caller's key: `job:42:snapshot` style; raises ValueError (a programming error)."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"transfer key {key!r}: use letters, digits and . _ : - (no glob characters, no ~)")
    return key


def check_entry_path(path: Any) -> str:
    """A tree entry's path as it may be written under a destination folder (pure): relative,
    '/'-separated, no '.' / '..' / empty components, no NUL, no backslash, no drive letter.
    Raises HostileEntry naming what is wrong."""
    if not isinstance(path, str):
        raise HostileEntry(repr(path), "the path is not a string")
    if not path:
        raise HostileEntry(path, "empty path")
    if len(path) > MAX_PATH_CHARS:
        raise HostileEntry(path[:80] + "...", f"path longer than {MAX_PATH_CHARS} characters")
    if "\x00" in path:
        raise HostileEntry(path, "NUL character in the path")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise HostileEntry(path, "absolute path (entries must be relative to the folder)")
    if "\\" in path:
        raise HostileEntry(path, "backslash in the path (only '/' separates folders)")
    for part in path.split("/"):
        if part == "..":
            raise HostileEntry(path, "'..' component (it would write outside the folder)")
        if part in ("", "."):
            raise HostileEntry(path, "empty or '.' component")
    return path


def check_tree_entries(entries: Any, tree_key: str) -> list[tuple[str, str, FileRef | None]]:
    """The entries of a tree manifest as (path, "dir"|"file", FileRef|None) (pure), refusing
    hostile ones: bad paths, links/FIFOs/devices, duplicates, a file used as a folder, file
    references pointing outside this tree's keys."""
    if not isinstance(entries, list):
        raise IntegrityError(f"tree {tree_key}: entries is not a list")
    out: list[tuple[str, str, FileRef | None]] = []
    seen: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise IntegrityError(f"tree {tree_key}: an entry is not an object: {entry!r}"[:300])
        path = check_entry_path(entry.get("path"))
        kind = entry.get("type")
        if kind not in ("dir", "file"):
            raise HostileEntry(
                path, f"a {kind!r} entry: only files and folders travel (no links, FIFOs or devices)"
            )
        if path in seen:
            raise HostileEntry(path, "listed twice")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if seen.get(parent) == "file":
                raise HostileEntry(path, f"its parent {parent!r} is a file")
        ref: FileRef | None = None
        if kind == "file":
            ref = FileRef.from_dict(entry.get("file"))
            if not ref.key.startswith(f"{tree_key}:~f:"):
                raise HostileEntry(path, f"its data key {ref.key!r} is outside the tree {tree_key!r}")
        seen[path] = kind
        out.append((path, kind, ref))
    used_as_folder = {"/".join(p.split("/")[:depth]) for p in seen for depth in range(1, p.count("/") + 1)}
    for path, kind in seen.items():  # a file listed after entries below it
        if kind == "file" and path in used_as_folder:
            raise HostileEntry(path, "a file that other entries use as a folder")
    return out


def _manifest_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------------------------
# The store


class ArtifactStore:
    """Streams files and folders through one Redis (see the module docstring)."""

    def __init__(
        self,
        client: "redis.Redis",
        prefix: str = "lorad",
        *,
        ttl_s: int = DEFAULT_TTL_S,
        chunk_size: int = CHUNK_SIZE,
        window: int = WINDOW,
    ):
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("socket_timeout") is None:
            raise ValueError(
                "ArtifactStore needs a client with a socket timeout (daemon.remote.redisurl.make_client)"
            )
        if kwargs.get("decode_responses"):
            raise ValueError("ArtifactStore needs a client with decode_responses=False (chunks are bytes)")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or window < 1 or ttl_s < 1:
            raise ValueError(f"bad chunk_size/window/ttl_s: {chunk_size}/{window}/{ttl_s}")
        check_key(prefix)
        self.client = client
        self.prefix = prefix
        self.ttl_s = int(ttl_s)
        self.chunk_size = chunk_size
        self.window = window
        self.stats = TransferStats()

    # ---- keys ------------------------------------------------------------------------------
    def _base(self, key: str) -> str:
        return f"{self.prefix}:xfer:{key}"

    def _chunk(self, key: str, i: int) -> str:
        return f"{self._base(key)}:~c:{i}"

    def _sums(self, key: str) -> str:
        return f"{self._base(key)}:~sums"

    def _manifest(self, key: str) -> str:
        return f"{self._base(key)}:~manifest"

    def _tree(self, key: str) -> str:
        return f"{self._base(key)}:~tree"

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis round trip; every Redis failure becomes a TransferError saying what failed."""
        import redis

        try:
            return fn()
        except redis.AuthenticationError as exc:
            raise TransferError(
                f"{what}: Redis refused the credentials ({exc}); check the password in the queue URL"
            ) from exc
        except redis.OutOfMemoryError as exc:
            raise TransferError(
                f"{what}: Redis is out of memory (its maxmemory is reached): free memory on the Redis machine or "
                f"raise maxmemory (redis.conf / CONFIG SET maxmemory); the transfer resumes where it stopped"
            ) from exc
        except redis.RedisError as exc:
            raise TransferError(f"{what}: Redis {type(exc).__name__}: {_redis_message(exc)}") from exc

    # ---- files: upload -----------------------------------------------------------------------
    def put_file(self, key: str, path: Path | str, *, progress: Progress | None = None) -> FileRef:
        """Upload one regular file (a symlink or special file is refused with HostileEntry).
        Resumes: chunks already in Redis with the same sha256 are not sent again."""
        return self._put_file(check_key(key), Path(path), progress)

    def _put_file(self, key: str, path: Path, progress: Progress | None) -> FileRef:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise TransferError(f"{path}: no such file") from None
        if stat.S_ISLNK(st.st_mode):
            raise HostileEntry(str(path), "a symlink; only regular files are sent")
        try:
            fh = open_regular(path)
        except NotARegularFile as exc:
            raise HostileEntry(str(path), f"{exc.kind}; only regular files are sent") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            chunks = chunk_count(size, self.chunk_size)
            old_manifest = self._call(f"read manifest {key}", lambda: self.client.get(self._manifest(key)))
            resuming = old_manifest is not None or bool(
                self._call(f"check {key}", lambda: self.client.exists(self._sums(key)))
            )
            whole = hashlib.sha256()
            sums: list[str] = []
            sent = 0
            for start in range(0, chunks, self.window):
                batch = []
                for i in range(start, min(chunks, start + self.window)):
                    data = fh.read(self.chunk_size)
                    expected = min(self.chunk_size, size - i * self.chunk_size)
                    if len(data) != expected:
                        raise TransferError(
                            f"{path}: changed while being sent (chunk {i}: {len(data)} bytes, expected {expected})"
                        )
                    digest = hashlib.sha256(data).hexdigest()
                    whole.update(data)
                    sums.append(digest)
                    batch.append((i, data, digest))
                present = self._present(key, batch) if resuming else set()
                if len(present) < len(batch) and old_manifest is not None:
                    # Different content under this key: it is not complete any more.
                    self._call(f"invalidate {key}", lambda: self.client.delete(self._manifest(key)))
                    old_manifest = None
                self._send(key, batch, present)
                sent += len(batch)
                if progress is not None:
                    progress(sent, chunks)
            if fh.read(1):
                raise TransferError(f"{path}: changed while being sent (it grew past {size} bytes)")
        sha = whole.hexdigest()
        manifest = {
            "v": MANIFEST_VERSION,
            "size": size,
            "sha256": sha,
            "chunk_size": self.chunk_size,
            "chunks": chunks,
            "chunk_sha256": sums,
        }
        raw = _manifest_bytes(manifest)

        def finish() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._manifest(key), raw, ex=self.ttl_s)
            pipe.expire(self._sums(key), self.ttl_s)
            pipe.execute()

        self._call(f"write manifest {key}", finish)
        return FileRef(key=key, size=size, sha256=sha, chunks=chunks, chunk_size=self.chunk_size)

    def _present(self, key: str, batch: list[tuple[int, bytes, str]]) -> set[int]:
        """Indexes of the batch's chunks already in Redis, intact (same sha256 and length)."""

        def ask() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self._sums(key), [str(i) for i, _, _ in batch])
            for i, _, _ in batch:
                pipe.strlen(self._chunk(key, i))
            return pipe.execute()

        answer = self._call(f"check chunks of {key}", ask)
        stored_sums, lengths = answer[0], answer[1:]
        present = set()
        for (i, data, digest), stored, length in zip(batch, stored_sums, lengths):
            if stored is not None and stored.decode() == digest and length == len(data):
                present.add(i)
        return present

    def _send(self, key: str, batch: list[tuple[int, bytes, str]], present: set[int]) -> None:
        """One MULTI/EXEC: the missing chunks with their sums; the TTL of those present refreshed."""

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            for i, data, digest in batch:
                if i in present:
                    pipe.expire(self._chunk(key, i), self.ttl_s)
                else:
                    pipe.set(self._chunk(key, i), data, ex=self.ttl_s)
                    pipe.hset(self._sums(key), str(i), digest)
            pipe.expire(self._sums(key), self.ttl_s)
            pipe.execute()

        if batch:
            self._call(f"send chunks {batch[0][0]}..{batch[-1][0]} of {key}", write)
        for i, data, _ in batch:
            if i in present:
                self.stats.chunks_skipped += 1
            else:
                self.stats.chunks_sent += 1
                self.stats.bytes_sent += len(data)

    # ---- files: download ---------------------------------------------------------------------
    def _load_manifest(self, ref: FileRef) -> list[str]:
        """The per-chunk sha256 list of a complete upload, checked against the reference."""
        ref.check()
        raw = self._call(f"read manifest {ref.key}", lambda: self.client.get(self._manifest(ref.key)))
        if raw is None:
            raise TransferError(
                f"{ref.key}: no manifest in Redis (the upload did not finish, or it expired or was deleted)"
            )
        if len(raw) > MAX_MANIFEST_BYTES:
            raise IntegrityError(
                f"{ref.key}: manifest of {len(raw)} bytes is larger than {MAX_MANIFEST_BYTES}"
            )
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise IntegrityError(f"{ref.key}: the manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("v") != MANIFEST_VERSION:
            raise IntegrityError(
                f"{ref.key}: manifest version {manifest.get('v') if isinstance(manifest, dict) else None!r} unknown"
            )
        for name in ("size", "sha256", "chunk_size", "chunks"):
            if manifest.get(name) != getattr(ref, name):
                raise IntegrityError(
                    f"{ref.key}: the manifest's {name} {manifest.get(name)!r} differs from the reference's {getattr(ref, name)!r}"
                )
        sums = manifest.get("chunk_sha256")
        if (
            not isinstance(sums, list)
            or len(sums) != ref.chunks
            or not all(isinstance(s, str) and _HEX64.match(s) for s in sums)
        ):
            raise IntegrityError(f"{ref.key}: the manifest's chunk list does not match {ref.chunks} chunks")
        return sums

    def get_file(self, ref: FileRef, dest: Path | str, *, progress: Progress | None = None) -> Path:
        """Download to `dest`: into a partial file beside it, every chunk and the whole checked by
        sha256, then an atomic rename. A restart resumes from the partial file's intact prefix.
        IntegrityError (tampered data) removes the partial file and leaves dest untouched."""
        dest = Path(dest)
        sums = self._load_manifest(ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self._already_there(ref, dest):
            self.stats.files_reused += 1
            return dest
        part = dest.parent / f".{dest.name}.{ref.sha256[:16]}.part"
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(part, flags, 0o644)
        except OSError as exc:
            raise TransferError(f"{part}: cannot open the partial file ({exc.strerror})") from exc
        try:
            with os.fdopen(fd, "r+b") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise TransferError(f"{part}: is {file_kind(os.fstat(fh.fileno()).st_mode)}, not a file")
                whole, done = self._verified_prefix(fh, ref, sums)
                fh.truncate(done * ref.chunk_size if done < ref.chunks else ref.size)
                fh.seek(0, os.SEEK_END)
                for start in range(done, ref.chunks, self.window):
                    indexes = list(range(start, min(ref.chunks, start + self.window)))
                    self._receive(ref, sums, indexes, fh, whole)
                    fh.flush()  # what progress reports is in the file (a crash keeps it for the resume)
                    if progress is not None:
                        progress(indexes[-1] + 1, ref.chunks)
                if whole.hexdigest() != ref.sha256:
                    raise IntegrityError(
                        f"{ref.key}: sha256 of the whole file is {whole.hexdigest()}, expected {ref.sha256}"
                    )
                fh.flush()
                os.fsync(fh.fileno())
        except IntegrityError:
            _unlink(part)
            raise
        os.replace(part, dest)
        fsync_dir(dest.parent)
        return dest

    def _already_there(self, ref: FileRef, dest: Path) -> bool:
        """dest is a regular file with exactly the referenced content (a resumed tree download)."""
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != ref.size:
            return False
        h = hashlib.sha256()
        with open_regular(dest) as fh:
            for block in iter(lambda: fh.read(self.chunk_size), b""):
                h.update(block)
        return h.hexdigest() == ref.sha256

    def _verified_prefix(self, fh, ref: FileRef, sums: list[str]) -> tuple[Any, int]:
        """(running sha256, number of chunks) of the partial file's leading chunks that match the
        manifest: those are not downloaded again."""
        whole = hashlib.sha256()
        have = os.fstat(fh.fileno()).st_size
        fh.seek(0)
        done = 0
        for i in range(ref.chunks):
            length = min(ref.chunk_size, ref.size - i * ref.chunk_size)
            if have < i * ref.chunk_size + length:
                break
            data = fh.read(length)
            if hashlib.sha256(data).hexdigest() != sums[i]:
                break
            whole.update(data)
            done += 1
            self.stats.chunks_reused += 1
        return whole, done

    def _receive(self, ref: FileRef, sums: list[str], indexes: list[int], fh, whole) -> None:
        def fetch() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i in indexes:
                pipe.get(self._chunk(ref.key, i))
            return pipe.execute()

        datas = self._call(f"fetch chunks {indexes[0]}..{indexes[-1]} of {ref.key}", fetch)
        for i, data in zip(indexes, datas):
            if data is None:
                raise TransferError(f"{ref.key}: chunk {i} is missing in Redis (expired, evicted or deleted)")
            length = min(ref.chunk_size, ref.size - i * ref.chunk_size)
            if len(data) != length or hashlib.sha256(data).hexdigest() != sums[i]:
                raise IntegrityError(
                    f"{ref.key}: chunk {i} does not match its sha256 ({len(data)} bytes, expected {length})"
                )
            fh.write(data)
            whole.update(data)
            self.stats.chunks_received += 1
            self.stats.bytes_received += len(data)
        del datas

    # ---- trees ---------------------------------------------------------------------------------
    def put_tree(self, key: str, folder: Path | str, *, progress: Progress | None = None) -> TreeRef:
        """Upload a folder: regular files and folders only. Every entry is checked BEFORE anything
        is sent: a symlink, FIFO, socket, device or a name that is not UTF-8 raises HostileEntry and
        nothing is uploaded. Resumable like put_file (files keep their keys in walk order)."""
        key = check_key(key)
        root = Path(folder)
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            raise TransferError(f"{root}: no such folder") from None
        if stat.S_ISLNK(st.st_mode):
            raise HostileEntry(str(root), "the folder is a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise TransferError(f"{root}: is {file_kind(st.st_mode)}, not a folder")
        walked = list(_walk(root))
        files = [(rel, path) for rel, kind, path in walked if kind == "file"]
        entries: list[dict[str, Any]] = []
        total = 0
        n = 0
        for rel, kind, path in walked:
            if kind == "dir":
                entries.append({"path": rel, "type": "dir"})
                continue
            ref = self._put_file(f"{key}:~f:{n}", path, None)
            n += 1
            total += ref.size
            entries.append({"path": rel, "type": "file", "file": ref.to_dict()})
            if progress is not None:
                progress(n, len(files))
        raw = _manifest_bytes({"v": MANIFEST_VERSION, "entries": entries})
        if len(raw) > MAX_MANIFEST_BYTES:
            raise TransferError(f"{root}: too many entries ({len(entries)}) for one tree")
        self._call(f"write tree {key}", lambda: self.client.set(self._tree(key), raw, ex=self.ttl_s))
        return TreeRef(key=key, files=len(files), size=total, sha256=hashlib.sha256(raw).hexdigest())

    def get_tree(self, ref: TreeRef, dest: Path | str, *, progress: Progress | None = None) -> Path:
        """Download a folder to `dest` (which must not exist, or be an empty folder). Every entry is
        checked before anything is written (HostileEntry for `..`, absolute paths, links, special
        files, data keys outside the tree); files land in a staging folder beside dest that a
        restart resumes, renamed to dest when all are verified."""
        dest = Path(dest)
        raw = self._call(f"read tree {ref.key}", lambda: self.client.get(self._tree(ref.key)))
        if raw is None:
            raise TransferError(
                f"{ref.key}: no tree manifest in Redis (the upload did not finish, or it expired or was deleted)"
            )
        if len(raw) > MAX_MANIFEST_BYTES or hashlib.sha256(raw).hexdigest() != ref.sha256:
            raise IntegrityError(f"{ref.key}: the tree manifest does not match the reference's sha256")
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise IntegrityError(f"{ref.key}: the tree manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("v") != MANIFEST_VERSION:
            raise IntegrityError(f"{ref.key}: tree manifest version unknown")
        entries = check_tree_entries(manifest.get("entries"), ref.key)
        file_refs = [r for _, _, r in entries if r is not None]
        if len(file_refs) != ref.files or sum(r.size for r in file_refs) != ref.size:
            raise IntegrityError(
                f"{ref.key}: the tree holds {len(file_refs)} files / {sum(r.size for r in file_refs)} bytes, the reference says {ref.files} / {ref.size}"
            )
        if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
            raise TransferError(f"{dest}: already exists and is not an empty folder; not overwriting it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".{dest.name}.{ref.sha256[:16]}.part"
        try:
            staging.mkdir()
        except FileExistsError:
            if staging.is_symlink() or not staging.is_dir():
                raise TransferError(f"{staging}: in the way (not a folder)") from None
        root = os.path.realpath(staging)
        done = 0
        for rel, kind, file_ref in entries:
            target = staging.joinpath(*rel.split("/"))
            parent = target if kind == "dir" else target.parent
            _mkdirs_inside(staging, parent)
            if os.path.commonpath([root, os.path.realpath(parent)]) != root:
                raise HostileEntry(rel, "resolves outside the destination folder")
            if file_ref is not None:
                self.get_file(file_ref, target)
                done += 1
                if progress is not None:
                    progress(done, len(file_refs))
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
        fsync_dir(dest.parent)
        return dest

    # ---- housekeeping --------------------------------------------------------------------------
    def exists(self, ref: FileRef | TreeRef) -> bool:
        """True when the upload is complete (its manifest is in Redis)."""
        name = self._manifest(ref.key) if isinstance(ref, FileRef) else self._tree(ref.key)
        return bool(self._call(f"check {ref.key}", lambda: self.client.exists(name)))

    def _scan(self, key: str) -> Iterator[bytes]:
        return self.client.scan_iter(match=f"{self._base(check_key(key))}:*", count=1000)

    def delete_prefix(self, key: str) -> int:
        """Delete every key under `key` (e.g. "job:42" removes the job's snapshot, checkpoints and
        artifacts); returns how many. Keys of "job:420" are not touched."""

        def run() -> int:
            removed = 0
            batch: list[bytes] = []
            for name in self._scan(key):
                batch.append(name)
                if len(batch) >= 500:
                    removed += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.client.unlink(*batch))
            return removed

        return int(self._call(f"delete {key}", run))

    def refresh(self, key: str, ttl_s: int | None = None) -> int:
        """Extend the TTL of every key under `key` (a job that waits longer than the TTL)."""
        ttl = int(ttl_s or self.ttl_s)

        def run() -> int:
            count = 0
            pipe = self.client.pipeline(transaction=False)
            for name in self._scan(key):
                pipe.expire(name, ttl)
                count += 1
                if count % 500 == 0:
                    pipe.execute()
            pipe.execute()
            return count

        return int(self._call(f"refresh {key}", run))


# --------------------------------------------------------------------------------------------
# Local file system helpers


def _walk(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(relative posix path, "dir"|"file", path) of every entry under root, sorted, depth first;
    raises HostileEntry for anything that is neither a regular file nor a folder."""
    stack: list[tuple[str, Path]] = [("", root)]
    while stack:
        prefix, folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise TransferError(f"{folder}: cannot list ({exc.strerror})") from exc
        subdirs = []
        for item in items:
            rel = f"{prefix}{item.name}"
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise HostileEntry(
                    rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), "the name is not UTF-8"
                ) from None
            check_entry_path(rel)
            try:
                mode = item.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise TransferError(f"{item.path}: cannot read ({exc.strerror})") from exc
            if stat.S_ISLNK(mode):
                raise HostileEntry(
                    rel, f"a symlink (to {os.readlink(item.path)!r}); only regular files and folders are sent"
                )
            if stat.S_ISDIR(mode):
                yield rel, "dir", Path(item.path)
                subdirs.append((rel + "/", Path(item.path)))
            elif stat.S_ISREG(mode):
                yield rel, "file", Path(item.path)
            else:
                raise HostileEntry(rel, f"{file_kind(mode)}; only regular files and folders are sent")
        stack.extend(reversed(subdirs))


def _mkdirs_inside(root: Path, folder: Path) -> None:
    """mkdir -p of `folder` below `root`, refusing to pass through anything that is not a real
    folder (a symlink planted in the staging folder must not redirect the writes)."""
    rel = folder.relative_to(root)
    current = root
    for part in rel.parts:
        current = current / part
        try:
            os.mkdir(current)
        except FileExistsError:
            st = os.lstat(current)
            if not stat.S_ISDIR(st.st_mode):
                raise HostileEntry(str(rel), f"{current} is {file_kind(st.st_mode)}, not a folder") from None


def _redis_message(exc: Exception) -> str:
    """redis-py's message without the command it quotes (a pipeline error quotes the chunk bytes)."""
    text = str(exc)
    marker = "of pipeline caused error: "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text if len(text) <= 300 else text[:300] + "..."


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
