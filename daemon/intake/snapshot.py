"""Copy a validated dataset into the job's work dir; training reads only this copy.

Files are real copies (not hard links: an in-place edit of the original would show through).
Each copy is hashed while it is written and compared with the hash validation saw, so a file
edited between validation and snapshot is caught instead of trained. Names in the snapshot
are normalised (0001.png + 0001.txt): no user file name can trip mflux's name rules
(preview*, *_in/*_out edit pairs, odd unicode).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from daemon.fsutil import atomic_write_text, fsync_dir, open_regular
from daemon.intake.validate import Report
from lorad_base.workdir import WorkDir

# The work-dir names, for modules that join them themselves (spelled in lorad_base/workdir.py).
MANIFEST = WorkDir(Path()).manifest.name
CAPTIONS_LIST = WorkDir(Path()).captions_list.name


class DatasetChanged(Exception):
    """A file changed between validation and snapshot; intake retries later."""


def fingerprint(report: Report, effective: dict) -> str:
    """sha256 over the LoRA's name and trigger, sorted names + contents (image bytes, normalised
    captions) + effective settings. The name is in it: the same images under another name are
    another LoRA (trained, not "unchanged"). The folder's own path is not."""
    h = hashlib.sha256()
    identity = {"name": report.name or report.folder.name, "trigger": report.trigger}
    h.update(json.dumps(identity, sort_keys=True).encode("utf-8", "surrogateescape") + b"\0")
    for image in sorted(report.images, key=lambda i: i.name):
        h.update(image.name.encode("utf-8", "surrogateescape") + b"\0")
        h.update(image.sha256.encode() + b"\0")
        h.update(report.captions.get(image.name, "").encode("utf-8") + b"\0")
    h.update(json.dumps(effective, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _copy_verified(src: Path, dst: Path, expected_sha: str) -> None:
    h = hashlib.sha256()
    with open_regular(src) as fin, dst.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    if h.hexdigest() != expected_sha:
        raise DatasetChanged(f"{src.name} changed while lorad was reading it")


def _convert(src: Path, dst: Path, expected_sha: str) -> None:
    from PIL import Image

    from daemon.intake.validate import hash_file

    with open_regular(src) as fh:
        # Hashed before and after decoding: an edit while it is decoded is caught too.
        if hash_file(fh) != expected_sha:
            raise DatasetChanged(f"{src.name} changed while lorad was reading it")
        _convert_open(Image.open(fh), dst)
        if hash_file(fh) != expected_sha:
            raise DatasetChanged(f"{src.name} changed while lorad was reading it")
    with dst.open("rb") as fh:
        os.fsync(fh.fileno())


def _convert_open(opened, dst: Path) -> None:
    """Decode from the open file (never the whole file in memory) and save an 8-bit RGB PNG."""
    import numpy as np
    from PIL import Image, ImageOps

    with opened:
        im: Image.Image = ImageOps.exif_transpose(opened)
        if im.mode.startswith("I;16") or im.mode == "I":
            arr = np.asarray(im).astype(np.int64)
            top = 65535 if arr.max() > 255 else 255
            im = Image.fromarray((arr * 255 // top).clip(0, 255).astype(np.uint8), "L")
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            peak = arr.max() if arr.max() > 1.0 else 1.0
            im = Image.fromarray((arr / peak * 255).clip(0, 255).astype(np.uint8), "L")
        if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
        im.convert("RGB").save(dst, format="PNG")


def take_snapshot(
    report: Report,
    job_dir: Path,
    *,
    preview_prompt: str,
    effective: dict,
    preview_prompts: list[str] | None = None,
    sample_every: int | None = None,
) -> dict:
    """Write job_dir/data (images + captions + preview*.txt) and job_dir/manifest.json.

    The sample prompts become mflux's own preview files: preview.txt (the first), preview_2.txt, ..."""
    data = WorkDir(job_dir).data
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    entries = []
    for index, image in enumerate(sorted(report.images, key=lambda i: i.name), start=1):
        src = report.folder / image.name
        suffix = ".png" if image.convert else Path(image.name).suffix.lower()
        target = f"{index:04d}{suffix}"
        if image.convert:
            _convert(src, data / target, image.sha256)
        else:
            _copy_verified(src, data / target, image.sha256)
        caption = report.captions.get(image.name)  # None: left for the captioner (missing_captions = "vlm")
        if caption is not None:
            (data / f"{index:04d}.txt").write_text(caption + "\n", encoding="utf-8")
        entries.append(
            {
                "source": image.name,
                "image": target,
                "caption": caption,
                "caption_source": report.caption_sources.get(image.name) if caption is not None else None,
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "converted": image.convert,
            }
        )
    prompts = list(preview_prompts or [preview_prompt])
    for index, prompt in enumerate(prompts, start=1):
        name = "preview.txt" if index == 1 else f"preview_{index}.txt"
        (data / name).write_text(prompt + "\n", encoding="utf-8")
    fsync_dir(data)
    manifest = {
        "dataset": str(report.folder),
        "trigger": report.trigger,
        "name": report.name,
        "options": report.options,
        "effective": effective,
        "preview_prompt": preview_prompt,
        "preview_prompts": prompts,
        "sample_every": sample_every,
        "images": entries,
    }
    atomic_write_text(WorkDir(job_dir).manifest, json.dumps(manifest, indent=2, ensure_ascii=False))
    write_captions_list(job_dir, entries)
    return manifest


def write_captions_list(job_dir: Path, entries: list[dict]) -> None:
    """job_dir/captions.jsonl: one line per captioned image (file_name in the user's folder, the
    caption trained, where it came from). Published as <name>.report/captions.jsonl."""
    lines = [
        json.dumps(
            {"file_name": e["source"], "text": e["caption"], "source": e["caption_source"]},
            ensure_ascii=False,
        )
        for e in entries
        if e.get("caption") is not None
    ]
    atomic_write_text(WorkDir(job_dir).captions_list, "".join(line + "\n" for line in lines))


def choose_preview_prompts(report: Report, default_prompts: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The prompts sampled during training (pure): the dataset's `preview_prompts`, else its
    one-prompt form `preview_prompt`, else the `preview_prompts` setting, else the preview prompt."""
    if report.options.get("preview_prompts"):
        return list(report.options["preview_prompts"])
    if report.options.get("preview_prompt"):
        return [report.options["preview_prompt"]]
    if default_prompts:
        return list(default_prompts)
    return [choose_preview_prompt(report)]


def choose_preview_prompt(report: Report) -> str:
    """preview_prompt option, else the first preview*.txt, else "<trigger>, portrait photo"."""
    if report.options.get("preview_prompt"):
        return report.options["preview_prompt"]
    for name in sorted(report.previews):
        if report.previews[name]:
            return report.previews[name]
    return f"{report.trigger}, portrait photo"
