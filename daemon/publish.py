"""Publish a finished job: LoRA with provenance header, renders, report, registry entry.

Three steps. *Prepare* writes everything that can fail (disk full, read-only folder) as temp
files next to their targets, and reads the registry (a broken one fails here). *Commit* only
renames the files into place. *Register* then lists the LoRA in the registry under its lock
(bounded by lock_timeout_s). A failure in the first step leaves the previous LoRA, its renders
and the registry byte-identical. A failure in the last (the lock held by another program, the
registry's disk full) leaves the new LoRA published and the registry untouched; the job fails
with the reason, and `lorad retry` (or the next start) runs only `complete_registry`: the
LoRA's header names its job, so nothing is trained, rendered or versioned again.

An existing `<name>.safetensors` from another job is never overwritten: it and its renders move
to `<name>.v<N>.*` (N = 1, 2, ... the lowest unused number; higher N = newer). Re-publishing
the same job (after a crash mid-publish) replaces its own files in place. Registry entries are
derived from the files on disk (registry.plan_entries), so a retry lists the moved version too.

Names are compared as macOS's file system compares them (contract.name_key: case and Unicode
normalisation folded), on every platform: `alice` published where `Alice.safetensors` exists is
the same LoRA name, so it goes under the existing spelling (`Alice.*`, the old one kept as
`Alice.v1.*`), never beside it (on APFS the two spellings are one file: the second publish
would silently replace the first's LoRA and renders).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from daemon import __version__, registry, safetensors_file
from daemon.fsutil import fsync_dir, temp_beside, temp_dir_beside
from daemon.intake.contract import name_key
from daemon.logs import get_logger
from daemon.safetensors_file import read_header

LORA_SUFFIXES = (".safetensors", ".png", ".compare.png")
REPORT_SUFFIX = ".report"
METRICS_FILE = "metrics.json"  # the learning metrics (daemon/metrics.py) inside <name>.report/


class PublishError(Exception):
    pass


# -- safetensors header ----------------------------------------------------------------------


def metadata_of(path: Path) -> dict:
    header, _ = read_header(path)
    return dict(header.get("__metadata__") or {})


def write_with_metadata(src: Path, dest: Path, extra: dict[str, str]) -> None:
    """Copy a safetensors file to dest (atomically) with extra `__metadata__` keys (tensor data untouched)."""
    size = Path(src).stat().st_size
    header, offset = read_header(src, size)
    meta = dict(header.get("__metadata__") or {})
    meta.update({k: str(v) for k, v in extra.items()})
    header["__metadata__"] = meta
    safetensors_file.write(src, dest, header, offset=offset, data_len=size - offset)


def provenance(
    *, job, plan: dict, fingerprint: str, image_count: int, engine_keys: dict[str, str] | None = None
) -> dict[str, str]:
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


_VERSION_STEM = re.compile(r"(.+)\.v([0-9]+)")


def output_stem(entry: str) -> str | None:
    """`Alice` for `Alice.compare.png`, `Alice.v2` for `Alice.v2.report` (pure); None for a file
    lorad does not publish (hidden temp files included)."""
    if entry.startswith("."):
        return None
    for suffix in (".compare.png", ".safetensors", ".png", REPORT_SUFFIX):
        if entry.endswith(suffix) and len(entry) > len(suffix):
            return entry[: -len(suffix)]
    return None


def choose_spelling(name: str, entries: list[str]) -> str:
    """The spelling a LoRA called `name` publishes under, given the loras folder's entries
    (pure): `name` itself when its files exist or no other spelling of it does, else the
    existing spelling (a LoRA file's first, in sorted order)."""
    stems = [output_stem(e) for e in sorted(entries, key=lambda e: (not e.endswith(".safetensors"), e))]
    if name in stems:
        return name
    key = name_key(name)
    return next((stem for stem in stems if stem is not None and name_key(stem) == key), name)


def next_version(name: str, entries: list[str]) -> int:
    """The lowest N with no `<name>.v<N>` output in any spelling of `name` (pure)."""
    key, used = name_key(name), set()
    for entry in entries:
        match = _VERSION_STEM.fullmatch(output_stem(entry) or "")
        if match and name_key(match.group(1)) == key:
            used.add(int(match.group(2)))
    n = 1
    while n in used:
        n += 1
    return n


def _entries(loras: Path) -> list[str]:
    try:
        return os.listdir(loras)
    except OSError:
        return []


def spelling_on_disk(loras: Path, name: str) -> str:
    """The spelling under which the LoRA `name` is (or will be) published in `loras`."""
    return choose_spelling(name, _entries(loras))


def versioned_name(loras: Path, name: str) -> str:
    """The lowest `<name>.v<N>` with no file of that stem (in any spelling of the name) yet."""
    return f"{name}.v{next_version(name, _entries(loras))}"


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


def published_by(loras: Path, job) -> bool:
    """True when `<name>.safetensors` in the loras folder is this job's (its header says so):
    its files are in place and at most its registry entry is missing."""
    try:
        path = loras / f"{spelling_on_disk(loras, job.name)}.safetensors"
        return metadata_of(path).get("lorad.job_id") == job.id
    except (OSError, ValueError):
        return False


def version_owners(loras: Path, name: str) -> dict[str, str]:
    """job id -> `<name>.v<N>` for the older versions of `name` (any spelling) on disk (from
    their headers)."""
    key = name_key(name)
    owners: dict[str, str] = {}
    try:
        entries = list(os.scandir(loras))
    except OSError:
        return owners
    for entry in entries:
        stem = entry.name[: -len(".safetensors")] if entry.name.endswith(".safetensors") else ""
        match = _VERSION_STEM.fullmatch(stem)
        if not match or name_key(match.group(1)) != key:
            continue
        try:
            job_id = metadata_of(Path(entry.path)).get("lorad.job_id")
        except (OSError, ValueError):
            continue
        if job_id:
            owners[job_id] = stem
    return owners


_OUTPUT_SUFFIXES = (("lora", ".safetensors"), ("render", ".png"), ("compare", ".compare.png"),
                    ("report", REPORT_SUFFIX))  # fmt: skip


def moved_outputs(outputs: dict, loras: Path, stem: str, registry_key: str | None) -> dict | None:
    """A job's outputs after its LoRA moved to `<stem>.*` (`<name>.v<N>`), or None when they
    already name those files (pure): status, DONE and the dashboard then name what holds *its* LoRA."""
    if outputs.get("lora") == str(loras / f"{stem}.safetensors"):
        return None
    new = dict(outputs)
    for key, suffix in _OUTPUT_SUFFIXES:
        if key in new:
            new[key] = str(loras / f"{stem}{suffix}")
    if registry_key:
        new["registry_key"] = registry_key
    new.pop("previous", None)  # that was the version before it; it is not this job's file
    return new


def _outputs(loras: Path, name: str, registry_path: Path) -> dict:
    return {
        "lora": str(loras / f"{name}.safetensors"),
        "render": str(loras / f"{name}.png"),
        "compare": str(loras / f"{name}.compare.png"),
        "report": str(loras / f"{name}{REPORT_SUFFIX}"),
        "registry": str(registry_path),
    }


def read_metrics(report: Path) -> dict | None:
    """The published `<name>.report/metrics.json` (None when absent or unreadable)."""
    try:
        data = json.loads((report / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _register(
    *, loras: Path, registry_path: Path, job, name: str, lock_timeout_s: float | None, moved: str | None
) -> dict:
    """List the published LoRA `name` (its spelling on disk) in the registry (entry built from
    the file itself); the outputs."""
    outputs = _outputs(loras, name, registry_path)
    dest = Path(outputs["lora"])
    meta = metadata_of(dest)
    try:
        summary = json.loads(meta.get("lorad.plan") or "{}")
    except ValueError:
        summary = {}
    entry = {
        "path": outputs["lora"],
        "trigger": job.trigger_word,
        "model": summary.get("model"),
        "rank": int(meta.get("ss_network_dim") or 0) or None,
        "steps": summary.get("total_steps"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sha256": _sha256(dest),
        "render": outputs["render"],
        "compare": outputs["compare"],
        "job_id": job.id,
    }
    log = get_logger()
    with registry.Transaction(registry_path, timeout_s=lock_timeout_s, log=log) as txn:
        plan = registry.plan_entries(
            txn.read().get("loras", {}),
            name=name,
            entry=entry,
            folder=str(loras),
            versions=version_owners(loras, name),
            moved=moved,
        )
        txn.prepare(plan.updates, plan.removals)
        txn.commit()
    for clash in plan.clashes:
        log.warning(
            "registry.clash", key=clash.key, kept_as=clash.kept_as, other=clash.other, path=entry["path"]
        )
    metrics = read_metrics(loras / f"{name}{REPORT_SUFFIX}")
    if metrics is not None:
        outputs["metrics"] = metrics
    outputs["registry_key"] = next(k for k, v in plan.updates.items() if v is entry)
    previous = [v["path"] for v in plan.updates.values() if v is not entry]
    if moved or previous:
        outputs["previous"] = str(loras / f"{moved}.safetensors") if moved else previous[0]
    return outputs


def _registry_failed(
    exc: registry.RegistryError | OSError, job, lora: Path, registry_path: Path
) -> PublishError:
    if isinstance(exc, registry.RegistryError):
        reason = str(exc)
    else:
        reason = f"{exc.strerror or exc} ({exc.filename or registry_path})"
    return PublishError(
        f"{lora} is published, but its registry entry in {registry_path} was not written: {reason}. "
        f"When that is resolved, run: lorad retry {job.id} (only the registry entry is written; nothing is retrained)"
    )


def complete_registry(*, loras: Path, registry_path: Path, job, lock_timeout_s: float | None = 30.0) -> dict:
    """The registry step alone, for a job whose files are already published (published_by)."""
    name = spelling_on_disk(loras, job.name)
    try:
        return _register(
            loras=loras,
            registry_path=registry_path,
            job=job,
            name=name,
            lock_timeout_s=lock_timeout_s,
            moved=None,
        )
    except (registry.RegistryError, OSError) as exc:
        raise _registry_failed(exc, job, loras / f"{name}.safetensors", registry_path) from None


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
    lock_timeout_s: float | None = 30.0,
) -> dict:
    """Put the job's outputs in place, then list them in the registry; returns the outputs dict."""
    temps: list[Path] = []
    name = job.name
    try:
        loras.mkdir(parents=True, exist_ok=True)
        name = spelling_on_disk(loras, job.name)  # `alice` where `Alice` exists publishes as `Alice`
        if name != job.name:
            get_logger().info("publish.spelling", name=job.name, published_as=name)
        if not os.access(loras, os.W_OK):
            raise PermissionError(13, "permission denied", str(loras))
        registry.load(registry_path)  # a broken registry fails the job before anything changes
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
            if src.is_dir():  # samples/: the previews made during training
                shutil.copytree(src, report_tmp / src.name)
            else:
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

        # -- commit: renames only ------------------------------------------------------------
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
        fsync_dir(loras)
        temps.clear()
    except registry.RegistryError as exc:
        raise PublishError(f"{exc}. Nothing was published") from None
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
    # -- register: the files are in place; a failure here leaves only the entry to write ----
    try:
        return _register(
            loras=loras,
            registry_path=registry_path,
            job=job,
            name=name,
            lock_timeout_s=lock_timeout_s,
            moved=previous,
        )
    except (registry.RegistryError, OSError) as exc:
        raise _registry_failed(exc, job, loras / f"{name}.safetensors", registry_path) from None
