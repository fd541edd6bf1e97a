"""The LoRA registry (config.json, key "loras"): read-modify-write under a lock, atomically.

Every other key is preserved as it was (order included). A registry that is not valid JSON, or
whose "loras" is not an object, is never overwritten: the caller fails the job with the reason.
The write is split in two (prepare a temp file, then commit by rename) so publishing can do
every write that may fail (disk full) before it changes anything the user sees.

A registry that is a symlink is written through: the temp file goes beside the link's target
and replaces the target (mode kept), and the lock file sits beside the target too, so two
daemons reaching one file through different links still take turns. The lock is awaited for
at most `timeout_s` (setting lock_timeout_s), with a `registry.lock_wait` log line at the start
and every LOCK_LOG_EVERY_S; then RegistryLockTimeout names the process holding it.

Entry keys (`plan_entries`, pure): a LoRA is listed under its name (older versions under
`<name>.v<N>`). A key whose entry describes another file (another assets folder sharing the
registry, a hand-written entry) is never overwritten: the new entry goes under
`<key>@<tag>`, tag = 8 hex digits of the sha256 of the loras folder's path, and the clash is
reported to the caller (logged as `registry.clash`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.fsutil import fsync_dir, temp_beside
from daemon.intake.contract import name_key

LOCK_POLL_S = 0.05
LOCK_LOG_EVERY_S = 10.0


class RegistryError(Exception):
    pass


class RegistryLockTimeout(RegistryError):
    """Another program held the registry lock for longer than the configured bound."""

    def __init__(self, message: str, *, lock_path: Path, holder: str, waited_s: float):
        super().__init__(message)
        self.lock_path, self.holder, self.waited_s = lock_path, holder, waited_s


# -- who holds a lock ----------------------------------------------------------------------


def _describe_pid(pid: int) -> str:
    try:
        import psutil

        cmd = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
    except Exception:
        return f"pid {pid}"
    return f"pid {pid} ({cmd[:120]})"


def _holders_from_proc_locks(path: Path) -> list[int]:
    """Linux: the pids /proc/locks lists for this file's inode."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with open("/proc/locks", encoding="ascii", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if "->" in parts:  # a waiter, not a holder
                continue
            if len(parts) >= 6 and parts[5] == dev and parts[4].isdigit():
                pids.append(int(parts[4]))
    return pids


def _holders_from_lsof(path: Path) -> list[int]:
    """macOS and others: processes with the lock file open (lsof, bounded to 5 s)."""
    import subprocess

    from daemon.childenv import child_env

    try:
        out = subprocess.run(
            ["lsof", "-t", "--", str(path)],
            capture_output=True,
            text=True,
            timeout=5,
            env=child_env(os.environ),
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def lock_holders(path: Path) -> str:
    """Who holds (or has open) the lock file, for the user: "pid N (command)" or a plain guess."""
    try:
        pids = _holders_from_proc_locks(path) if os.path.exists("/proc/locks") else _holders_from_lsof(path)
    except OSError:
        pids = []
    pids = [p for p in dict.fromkeys(pids) if p != os.getpid()]
    if not pids:
        return "another program (lorad could not tell which)"
    return ", ".join(_describe_pid(p) for p in pids)


# -- entry keys (pure) -----------------------------------------------------------------------


def folder_tag(folder: str) -> str:
    """8 hex digits naming a loras folder in alternative keys (`<name>@<tag>`)."""
    return hashlib.sha256(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass(frozen=True)
class Clash:
    key: str  # the key that was taken
    kept_as: str  # where the new entry went
    other: str  # the path of the entry that holds `key`


@dataclass
class EntryPlan:
    updates: dict = field(default_factory=dict)
    removals: set = field(default_factory=set)
    clashes: list = field(default_factory=list)


def _path_of(entry: object) -> str:
    return str(entry.get("path")) if isinstance(entry, dict) else json.dumps(entry)


def same_path(a: str, b: str) -> bool:
    """Do two registry paths name one file, as a case-folding file system sees it? (pure; the
    folder must match exactly, the file name by contract.name_key)."""
    if a == b:
        return True
    head_a, _, file_a = a.rpartition("/")
    head_b, _, file_b = b.rpartition("/")
    return head_a == head_b and name_key(file_a) == name_key(file_b)


def _holder(key: str, taken: dict) -> str | None:
    """The key in `taken` that is `key` by name_key (the exact spelling first), or None."""
    if key in taken:
        return key
    folded = name_key(key)
    return next((k for k in taken if name_key(k) == folded), None)


def _key_for(stem: str, path: str, taken: dict, tag: str) -> tuple[str, Clash | None]:
    """`stem` (in the spelling the registry already has for it), unless that key describes
    another file: then `stem@tag` (again while that is taken). Keys differing only in case or
    normalisation are one key."""
    key, clash = stem, None
    while (holder := _holder(key, taken)) is not None:
        if same_path(_path_of(taken[holder]), path):
            return holder, (Clash(clash.key, holder, clash.other) if clash else None)
        clash = clash or Clash(stem, "", _path_of(taken[holder]))
        key = f"{key}@{tag}"
    return key, (Clash(clash.key, key, clash.other) if clash else None)


def _relocated(entry: dict, folder: str, stem: str) -> dict:
    return {
        **entry,
        "path": f"{folder}/{stem}.safetensors",
        "render": f"{folder}/{stem}.png",
        "compare": f"{folder}/{stem}.compare.png",
    }


def plan_entries(
    entries: dict, *, name: str, entry: dict, folder: str, versions: dict[str, str], moved: str | None = None
) -> EntryPlan:
    """The registry changes that list `entry` (the LoRA published at entry["path"] in `folder`).

    Entries that described the file previously at that path (another job) follow it to its
    version: `versions` maps a job id to the `<name>.v<N>` stem its LoRA now has on disk,
    `moved` is the stem the previous file got in this publish (for entries without a job id).
    """
    path, tag = entry["path"], folder_tag(folder)
    plan = EntryPlan()
    view = dict(entries)
    for key, old in entries.items():
        if not isinstance(old, dict) or not same_path(str(old.get("path")), path):
            continue
        if old.get("job_id") == entry.get("job_id"):
            plan.removals.add(key)  # our own entry: listed again below, under its current key
            del view[key]
            continue
        stem = versions.get(str(old.get("job_id"))) or moved
        if stem is None:
            continue  # its file is gone: the entry is replaced if it holds our key
        plan.removals.add(key)
        del view[key]
        new = _relocated(old, folder, stem)
        vkey, clash = _key_for(stem, new["path"], view, tag)
        view[vkey] = plan.updates[vkey] = new
        if clash:
            plan.clashes.append(clash)
    key, clash = _key_for(name, path, view, tag)
    plan.updates[key] = entry
    if clash:
        plan.clashes.append(clash)
    plan.removals -= set(plan.updates)
    return plan


def load(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(
            f"registry {path} cannot be read ({exc}); fix or move it, then lorad retry"
        ) from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"registry {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"lorad left it untouched. Fix it, then run lorad retry"
        ) from None
    if not isinstance(data, dict):
        raise RegistryError(
            f"registry {path} holds a JSON {type(data).__name__}, not an object; lorad left it untouched"
        )
    if "loras" in data and not isinstance(data["loras"], dict):
        raise RegistryError(f'registry {path}: "loras" is not an object; lorad left it untouched')
    return data


class Transaction:
    """Hold the registry lock; `prepare` writes the new file aside, `commit` renames it in.

    `path` may be a symlink: the target is what is read, replaced and locked. `timeout_s` bounds
    the wait for the lock (None: wait as long as it takes); `log` gets the lock_wait lines."""

    def __init__(self, path: Path, *, timeout_s: float | None = None, log=None):
        self.path = Path(path)
        self.target = Path(os.path.realpath(self.path))
        self.lock_path = self.target.with_name(self.target.name + ".lock")
        self.timeout_s = timeout_s
        self.log = log
        self.lock_fd: int | None = None
        self.tmp: str | None = None

    def __enter__(self) -> "Transaction":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire()
        except BaseException:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise
        return self

    def _acquire(self) -> None:
        """flock, waiting at most timeout_s and saying so while it waits."""
        assert self.lock_fd is not None
        start = time.monotonic()
        next_log = start
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            waited = now - start
            if self.timeout_s is not None and waited >= self.timeout_s:
                holder = lock_holders(self.lock_path)
                if self.log is not None:
                    self.log.warning(
                        "registry.lock_timeout",
                        lock=str(self.lock_path),
                        waited_s=round(waited, 1),
                        holder=holder,
                    )
                raise RegistryLockTimeout(
                    f"the registry lock {self.lock_path} is held by {holder} and was not released within "
                    f"{self.timeout_s:g} s (setting lock_timeout_s)",
                    lock_path=self.lock_path,
                    holder=holder,
                    waited_s=waited,
                )
            if now >= next_log and self.log is not None:
                self.log.info(
                    "registry.lock_wait",
                    lock=str(self.lock_path),
                    waited_s=round(waited, 1),
                    timeout_s=self.timeout_s,
                    holder=lock_holders(self.lock_path),
                )
                next_log = now + LOCK_LOG_EVERY_S
            time.sleep(LOCK_POLL_S)

    def read(self) -> dict:
        return load(self.target)

    def prepare(self, updates: dict[str, dict], removals: set[str] | frozenset[str] = frozenset()) -> None:
        """Write the registry with these "loras" entries set (and `removals` gone), every other
        key kept, aside."""
        data = load(self.target)
        loras = data.setdefault("loras", {})
        for key in removals:
            loras.pop(key, None)
        loras.update(updates)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        fd, self.tmp = temp_beside(self.target)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            if self.target.exists():
                os.chmod(self.tmp, self.target.stat().st_mode & 0o777)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        assert self.tmp is not None
        os.replace(self.tmp, self.target)
        self.tmp = None
        fsync_dir(self.target.parent)

    def abort(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None

    def __exit__(self, *exc) -> None:
        self.abort()
        if self.lock_fd is not None:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            os.close(self.lock_fd)
            self.lock_fd = None
