"""Publish a finished job: LoRA with provenance header, renders, report, registry entry.

Two phases. *Prepare* writes everything that can fail (disk full, read-only folder, broken
registry) as temp files next to their targets. *Commit* only renames. So a failure leaves the
previous LoRA, its renders and the registry byte-identical, and `lorad retry` can redo it.

An existing `<name>.safetensors` from another job is never overwritten: it and its renders move
to `<name>.v<N>.*` (N = 1, 2, ... the lowest unused number; higher N = newer). Re-publishing
the same job (after a crash mid-publish) replaces its own files in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

from daemon import __version__, registry
from daemon.fsutil import fsync_dir, temp_beside, temp_dir_beside

LORA_SUFFIXES = (".safetensors", ".png", ".compare.png")
REPORT_SUFFIX = ".report"


class PublishError(Exception):
    pass


# -- safetensors header ----------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, data offset) of a safetensors file, without loading tensors (no torch/mlx)."""
    with Path(path).open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path} has an implausible header size")
        header = json.loads(fh.read(size))
    return header, 8 + size


def metadata_of(path: Path) -> dict:
    header, _ = read_header(path)
    return dict(header.get("__metadata__") or {})


def write_with_metadata(src: Path, dest: Path, extra: dict[str, str]) -> None:
    """Copy a safetensors file to dest with extra `__metadata__` keys (tensor data untouched)."""
    header, offset = read_header(src)
    meta = dict(header.get("__metadata__") or {})
    meta.update({k: str(v) for k, v in extra.items()})
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # keep the data section 8-byte aligned
    with Path(src).open("rb") as fin, Path(dest).open("wb") as fout:
        fout.write(struct.pack("<Q", len(blob)))
        fout.write(blob)
        fin.seek(offset)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def provenance(*, job, plan: dict, fingerprint: str, image_count: int, engine_keys: dict[str, str] | None = None) -> dict[str, str]:
    """lorad's metadata keys; `engine_keys` are the engine's own (Engine.adapter_metadata: rank, alpha)."""
    return {
        **(engine_keys or {}),
        "modelspec.title": job.name,
        "modelspec.architecture": f"{plan.get('model')}/lora",
        "modelspec.trigger_phrase": job.trigger_word,
        "ss_output_name": job.name,
        "ss_steps": str(plan.get("total_steps", "")),
        "ss_num_train_images": str(image_count),
        "lorad.version": __version__,
        "lorad.fingerprint": fingerprint,
        "lorad.job_id": job.id,
        "lorad.plan": json.dumps({k: v for k, v in plan.items() if k != "config"}, sort_keys=True),
    }


# -- versioning ------------------------------------------------------------------------------


def versioned_name(loras: Path, name: str) -> str:
    """The lowest `<name>.v<N>` with no file of that stem yet."""
    n = 1
    while any((loras / f"{name}.v{n}{suffix}").exists() for suffix in (*LORA_SUFFIXES, REPORT_SUFFIX)):
        n += 1
    return f"{name}.v{n}"


# -- publish ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _copy_to_temp(src: Path, dest: Path) -> Path:
    """A fsynced copy of src in a hidden temp file beside dest (renamed into place at commit)."""
    fd, tmp = temp_beside(dest)
    try:
        with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def publish(
    *,
    loras: Path,
    registry_path: Path,
    job,
    lora_file: Path,
    render_with: Path,
    render_compare: Path,
    report_files: list[Path],
    plan: dict,
) -> dict:
    """Put the job's outputs in place; returns the outputs dict (paths as strings)."""
    name = job.name
    temps: list[Path] = []
    try:
        loras.mkdir(parents=True, exist_ok=True)
        if not os.access(loras, os.W_OK):
            raise PermissionError(13, "permission denied", str(loras))
        dest = {
            ".safetensors": loras / f"{name}.safetensors",
            ".png": loras / f"{name}.png",
            ".compare.png": loras / f"{name}.compare.png",
        }
        staged = {
            ".safetensors": _copy_to_temp(lora_file, dest[".safetensors"]),
        }
        temps.append(staged[".safetensors"])
        for suffix, src in ((".png", render_with), (".compare.png", render_compare)):
            staged[suffix] = _copy_to_temp(src, dest[suffix])
            temps.append(staged[suffix])
        report_tmp = temp_dir_beside(loras / f"{name}{REPORT_SUFFIX}")
        temps.append(report_tmp)
        for src in report_files:
            shutil.copy2(src, report_tmp / src.name)
        (report_tmp / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
        fsync_dir(report_tmp)

        # An existing LoRA of another job keeps its place under a versioned name.
        previous = None
        if dest[".safetensors"].exists():
            try:
                owner = metadata_of(dest[".safetensors"]).get("lorad.job_id")
            except (OSError, ValueError):
                owner = None
            if owner != job.id:
                previous = versioned_name(loras, name)

        entry = {
            "path": str(dest[".safetensors"]),
            "trigger": job.trigger_word,
            "model": plan.get("model"),
            "rank": int(metadata_of(staged[".safetensors"]).get("ss_network_dim") or 0) or None,
            "steps": plan.get("total_steps"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sha256": _sha256(staged[".safetensors"]),
            "render": str(dest[".png"]),
            "compare": str(dest[".compare.png"]),
            "job_id": job.id,
        }
        with registry.Transaction(registry_path) as txn:
            updates = {name: entry}
            old_entry = txn.read().get("loras", {}).get(name)
            if previous and isinstance(old_entry, dict):
                # The superseded version stays listed, under its versioned name.
                updates[previous] = {
                    **old_entry,
                    "path": str(loras / f"{previous}.safetensors"),
                    "render": str(loras / f"{previous}.png"),
                    "compare": str(loras / f"{previous}.compare.png"),
                }
            txn.prepare(updates)
            # -- commit: renames only --------------------------------------------------------
            if previous:
                for suffix in LORA_SUFFIXES:
                    old_path = loras / f"{name}{suffix}"
                    if old_path.exists():
                        os.replace(old_path, loras / f"{previous}{suffix}")
                old_report = loras / f"{name}{REPORT_SUFFIX}"
                if old_report.exists():
                    os.replace(old_report, loras / f"{previous}{REPORT_SUFFIX}")
            for suffix, tmp in staged.items():
                os.replace(tmp, dest[suffix])
            report_dest = loras / f"{name}{REPORT_SUFFIX}"
            if report_dest.exists():
                shutil.rmtree(report_dest)
            os.replace(report_tmp, report_dest)
            txn.commit()
        fsync_dir(loras)
        temps.clear()
        outputs = {
            "lora": str(dest[".safetensors"]),
            "render": str(dest[".png"]),
            "compare": str(dest[".compare.png"]),
            "report": str(loras / f"{name}{REPORT_SUFFIX}"),
            "registry": str(registry_path),
        }
        if previous:
            outputs["previous"] = str(loras / f"{previous}.safetensors")
        return outputs
    except registry.RegistryError as exc:
        raise PublishError(str(exc)) from None
    except OSError as exc:
        where = exc.filename or loras
        raise PublishError(
            f"could not write {where}: {exc.strerror or exc}. Nothing was replaced; free space or fix "
            f"permissions, then run: lorad retry {job.id}"
        ) from None
    finally:
        for tmp in temps:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
