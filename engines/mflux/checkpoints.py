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
    for key in ("data", "model_path"):
        if key in plan_config and key in saved:
            want[key] = plan_config[key]
    if isinstance(saved.get("checkpoint"), dict) and isinstance(plan_config.get("checkpoint"), dict):
        want["checkpoint"] = {
            **saved["checkpoint"],
            "output_path": plan_config["checkpoint"].get("output_path"),
        }
    return want


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
