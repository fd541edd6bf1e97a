"""mflux checkpoint zips: integrity check, newest good one, pruning, adapter extraction.

mflux writes `checkpoints/NNNNNNN_checkpoint.zip` in place (not atomically), so a crash can
leave a truncated newest zip: resume takes the newest zip that passes the CRC check and holds
every member its checkpoint.json names, falling back to the previous one. No mlx here.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from lorad_base.fsutil import atomic_write_bytes

_NAME = re.compile(r"^(\d{7})_checkpoint\.zip$")
REQUIRED_KEYS = ("lora_adapter", "optimizer", "iterator", "config")
# A checkpoint may come from another machine (scale-out): its verification is bounded (no zip
# bomb: every read is bounded by the declared sizes, and these cap the declared sizes).
MAX_MEMBERS = 64
MAX_UNCOMPRESSED_BYTES = 16 << 30


class CheckpointRefused(ValueError):
    """A checkpoint whose saved config points outside the job's folders: never resumed."""


def bounds_problem(zf: zipfile.ZipFile) -> str | None:
    """None when the zip's member count, names and declared sizes are within bounds (pure)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        return f"{len(infos)} members, more than {MAX_MEMBERS}"
    total = sum(i.file_size for i in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        return f"{total} bytes uncompressed, more than {MAX_UNCOMPRESSED_BYTES}"
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or re.match(r"^[A-Za-z]:", name):
            return f"member name {name!r} points outside the archive"
    return None


def step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint zips, newest (highest step) first."""
    if not directory.is_dir():
        return []
    zips = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(zips, key=step_of, reverse=True)


def verify(path: Path) -> str | None:
    """None when the zip is whole; else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as zf:
            bounds = bounds_problem(zf)
            if bounds is not None:
                return bounds
            bad = zf.testzip()
            if bad is not None:
                return f"CRC error in {bad}"
            names = {Path(n).name for n in zf.namelist()}
            if "checkpoint.json" not in names:
                return "checkpoint.json missing"
            if "run.json" not in names:
                return "run.json missing"
            meta = json.loads(zf.read("checkpoint.json"))
            for key in REQUIRED_KEYS:
                member = meta.get("files", {}).get(key)
                if not member or member not in names:
                    return f"member for {key!r} missing"
    except Exception as exc:  # truncated or being rewritten: EOFError, zlib.error, BadZipFile, ...
        return f"unreadable: {type(exc).__name__}: {exc}"
    return None


_VERIFIED: dict[tuple[str, int, int], str | None] = {}


def verify_cached(path: Path) -> str | None:
    """verify(), remembered per (path, mtime, size): asked at every progress step (scale-out's
    uploader), a multi-hundred-MB zip is read once, not once a step. A zip still being written
    changes size or mtime, so it is verified again when it is complete."""
    try:
        st = Path(path).stat()
    except OSError as exc:
        return f"unreadable: {exc}"
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _VERIFIED:
        if len(_VERIFIED) > 256:
            _VERIFIED.clear()
        _VERIFIED[key] = verify(path)
    return _VERIFIED[key]


def newest_good(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest verified checkpoint, [(corrupt newer ones, why)])."""
    skipped: list[tuple[Path, str]] = []
    for path in list_checkpoints(directory):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def prune(directory: Path, keep: int = 2, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, once the newest one is verified.

    `protect` is the checkpoint a running mflux resumed from: mflux re-reads its config from that
    zip at every save of the resumed run, so it must outlive the run."""
    zips = list_checkpoints(directory)
    if not zips or verify(zips[0]) is not None:
        return []
    removed = []
    for path in zips[keep:]:
        if protect is not None and path.name == Path(protect).name:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def adapter_member(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("checkpoint.json"))
    return meta["files"]["lora_adapter"]


def extract_adapter(path: Path, dest: Path) -> Path:
    """Write the checkpoint's LoRA adapter to dest (atomically)."""
    member = adapter_member(path)
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if Path(n).name == member)
        atomic_write_bytes(dest, zf.read(name))
    return dest


def read_member(path: Path, basename: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if Path(n).name == basename)
        return zf.read(name)


def relocated_config(saved: dict, plan_config: dict) -> dict:
    """A checkpoint's saved mflux config with this work dir's absolute paths (pure): the data
    folder, the model path and the checkpoint output folder come from the plan; everything the
    run trained with stays. What makes a checkpoint from another machine resumable here."""
    want = dict(saved)
    for key in ("data", "model_path", "output_path"):
        if key in plan_config and key in saved:
            want[key] = plan_config[key]
    if isinstance(saved.get("checkpoint"), dict) and isinstance(plan_config.get("checkpoint"), dict):
        want["checkpoint"] = {
            **saved["checkpoint"],
            "output_path": plan_config["checkpoint"].get("output_path"),
        }
    return want


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def config_problem(config: dict, plan_config: dict, base: str = "") -> str | None:
    """None when every path in a (relocated) saved config is inside the job's work dir (the
    folder holding the plan's `data`) or is one of the plan's own values (its model path); else
    the offending path (pure). Relative paths (run.json's `data_root_relative`) are taken from
    `base`, the checkpoint's folder. A checkpoint from a worker is input, not trust."""
    import os

    allowed = set(_strings(plan_config))
    data = plan_config.get("data")
    root = os.path.normpath(os.path.dirname(data)) if isinstance(data, str) and data else None
    for value in _strings(config):
        looks_like_path = (
            value.startswith(("/", "~/", "\\")) or value == "~" or ".." in re.split(r"[/\\]", value)
        )
        if value in allowed or not looks_like_path:
            continue
        norm = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        if root is None or not (norm == root or norm.startswith(root + os.sep)):
            return f"its saved config names {value!r}, outside the job's folder"
    return None


def relocate(path: Path, plan_config: dict) -> bool:
    """Rewrite a checkpoint zip whose saved config or run.json points at another work dir
    (it was written on another machine, scale-out) so that mflux resumes it here; members are
    streamed, the zip replaced atomically. False when nothing needed changing (the usual case)."""
    import os
    import shutil

    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("checkpoint.json"))
        config_name = next(n for n in zf.namelist() if Path(n).name == meta["files"]["config"])
        run_name = next(n for n in zf.namelist() if Path(n).name == "run.json")
        saved = json.loads(zf.read(config_name))
        run = json.loads(zf.read(run_name))
        config = relocated_config(saved, plan_config)
        new_run = dict(run)
        if run.get("data_root") and "data" in plan_config:
            new_run["data_root"] = plan_config["data"]
        problem = config_problem({"config": config, "run": new_run}, plan_config, str(path.parent))
        if problem:
            raise CheckpointRefused(f"{path.name}: {problem}")
        if config == saved and new_run == run:
            return False
        tmp = path.with_name(f".{path.name}.relocate")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in zf.infolist():
                if info.filename == config_name:
                    out.writestr(info, json.dumps(config))
                elif info.filename == run_name:
                    out.writestr(info, json.dumps(new_run))
                else:
                    with zf.open(info) as src, out.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return True
