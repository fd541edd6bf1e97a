"""Captioning uncaptioned images (missing_captions = "vlm"): the daemon's side.

A phase of the job, before its training plan: the model runs in a child process
(engines.base.run_captioner; the daemon never imports mlx) and exits before training starts,
so its memory is released. Generated captions are cached by image hash and captioner settings
(a retried or re-dropped dataset is not captioned twice), written into the snapshot as ordinary
sidecars and into captions.jsonl (published as <name>.report/captions.jsonl), and into the
user's folder only with write_captions = true (as .txt sidecars, never overwriting one).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from daemon.caption_model import model_problem
from daemon.fsutil import atomic_write_text
from daemon.intake import contract
from daemon.intake.snapshot import write_captions_list
from daemon.logs import get_logger
from engines.base import StopToken, run_captioner
from lorad_base.workdir import WorkDir

# The instruction the captioner gets; part of the dataset fingerprint (a new prompt, new captions).
CAPTION_PROMPT = (
    "Describe this image in one or two natural-language sentences for training an image model: "
    "the subject, what they wear and do, the setting, the lighting and the style. "
    "No lists, no preamble, no quotes."
)
MAX_NEW_TOKENS = 120  # two sentences; far below the engines' 512-token prompt limit
MAX_CAPTION_CHARS = 600


def cache_key(model: str, prompt: str, image_sha256: str) -> str:
    """The cache entry of one image's caption under one captioner (pure)."""
    ident = json.dumps([model, prompt, MAX_NEW_TOKENS, image_sha256])
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def finish_caption(raw: str, trigger: str) -> str:
    """A model's output as a training caption: one line of printable text, bounded, starting
    with the trigger word (pure). Empty or unusable output leaves the trigger alone."""
    text = "".join(ch if ch.isprintable() else " " for ch in raw)
    text = " ".join(text.split()).strip(" \"'`")
    text = re.sub(r"^(caption|description)\s*:\s*", "", text, flags=re.IGNORECASE)[:MAX_CAPTION_CHARS].strip()
    if not text:
        return trigger
    if text.lower().startswith(trigger.lower()):
        return text
    return f"{trigger}, {text[0].lower() + text[1:] if text[:2].istitle() else text}"


GIB = 1024**3
# Beyond its weights a VLM needs its activations, the image's vision tokens and the KV cache of a
# short caption: about 1.5 GB for an 8B model at 4 bits (mlx-vlm on a 16 GB Mac), plus a margin.
CAPTIONER_OVERHEAD_BYTES = int(1.5 * GIB)


def weights_bytes(folder: Path | None) -> int:
    """The size of a model folder's weights (*.safetensors; HF cache links followed)."""
    if folder is None:
        return 0
    try:
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    except OSError:
        return 0


def memory_problem(model: str, weights: int, available_bytes: float) -> str | None:
    """The captioner's memory plan (pure): its weights plus the overhead must fit in the memory
    available now (it runs alone, before training; its memory is released before the plan)."""
    needed = weights * 1.1 + CAPTIONER_OVERHEAD_BYTES
    if needed <= available_bytes:
        return None
    return (
        f"the captioner {model} needs about {needed / GIB:.1f} GB (weights {weights / GIB:.1f} GB + "
        f"{CAPTIONER_OVERHEAD_BYTES / GIB:.1f} GB) but {available_bytes / GIB:.1f} GB is available: "
        "set caption_model to a smaller model (e.g. mlx-community/Qwen3-VL-4B-Instruct-4bit), or close other programs"
    )


def _read_cache(cache: Path, key: str) -> str | None:
    try:
        return json.loads((cache / f"{key}.json").read_text(encoding="utf-8"))["text"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path, key: str, text: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache / f"{key}.json", json.dumps({"text": text}, ensure_ascii=False))
    except OSError:  # a cache, never a reason to fail the job
        pass


def pending(manifest: dict) -> list[dict]:
    """The snapshot's images without a caption (left by intake for the captioner) (pure)."""
    return [entry for entry in manifest["images"] if entry.get("caption") is None]


REMOTE_UNSUPPORTED = (
    'missing_captions = "vlm" captions on the machine that trains with the embedded queue; with several '
    "machines (queue = redis://...) it is not supported yet. Caption the images once on a single machine "
    '(write_captions = true keeps them as .txt files), or set missing_captions = "trigger"'
)


def uncaptioned_count(workdir: Path) -> int:
    """How many of a snapshot's images still wait for the captioner (0 without a readable manifest)."""
    try:
        return len(pending(json.loads(WorkDir(workdir).manifest.read_text(encoding="utf-8"))))
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def caption_missing(settings, store, job, workdir: Path, stop: StopToken, on_spawn=None) -> str:
    """The captioning phase: "ok" (every image has a caption now, or none needed one), "stopped",
    or the reason the job fails. Progress goes to the job's row (step/total, note)."""
    manifest = json.loads(WorkDir(workdir).manifest.read_text(encoding="utf-8"))
    todo = pending(manifest)
    if not todo:
        return "ok"
    log = get_logger()
    model = str(job.settings.get("caption_model") or settings.caption_model)
    prompt = str(job.settings.get("caption_prompt") or CAPTION_PROMPT)
    problem = model_problem(model)
    if problem is not None:
        return f'{len(todo)} image(s) have no caption and missing_captions = "vlm": {problem}'
    cache = settings.state / "captions-cache"
    keys = {entry["image"]: cache_key(model, prompt, entry["sha256"]) for entry in todo}
    raw = {key: text for key in keys.values() if (text := _read_cache(cache, key)) is not None}
    missing = [entry for entry in todo if keys[entry["image"]] not in raw]
    total, cached = len(todo), len(todo) - len(missing)
    store.update(job.id, step=cached, total_steps=total, note=f"captioning {cached}/{total} images")
    log.info("captions.started", model=model, images=total, cached=cached)
    if missing:
        outcome = _run_child(
            settings, store, job, workdir, stop, model, prompt, missing, keys, cache, on_spawn
        )
        raw.update(outcome.captions)
        if outcome.stopped is not None:
            return "stopped"
        if outcome.error is not None:
            log.warning("captions.failed", model=model, error=outcome.error)
            return f"captioning with {model} failed: {outcome.error} (see {WorkDir(workdir).caption_log})"
        log.info(
            "captions.done",
            model=model,
            images=total,
            cached=cached,
            peak_rss_bytes=outcome.peak_rss_bytes,
            peak_mlx_bytes=outcome.peak_mlx_bytes,
        )
    _apply(
        manifest,
        todo,
        {e["image"]: finish_caption(raw.get(keys[e["image"]], ""), job.trigger_word) for e in todo},
        workdir,
    )
    store.update(job.id, step=0, note=None)
    if job.settings.get("options", {}).get("write_captions", settings.write_captions):
        _write_user_sidecars(Path(job.dataset_path), todo, log)
    return "ok"


def _available_bytes(settings) -> float:
    """The memory the captioner may use: ram_gb when set (as the training plan does), else what is free."""
    if settings.ram_gb is not None:
        return settings.ram_gb * GIB
    import psutil

    return float(psutil.virtual_memory().available)


def _run_child(settings, store, job, workdir, stop, model, prompt, missing, keys, cache, on_spawn):
    done = len(keys) - len(missing)
    by_key = {keys[e["image"]]: e for e in missing}

    def on_event(event: dict) -> None:
        nonlocal done
        if event.get("event") == "caption" and event.get("key") in by_key:
            _write_cache(cache, str(event["key"]), str(event.get("text", "")))
            done += 1
            store.update(
                job.id, step=done, total_steps=len(keys), note=f"captioning {done}/{len(keys)} images"
            )

    request = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_NEW_TOKENS,
        "state_dir": str(settings.state),
        "images": [
            {"key": key, "path": str(WorkDir(workdir).data / e["image"])} for key, e in by_key.items()
        ],
    }
    return run_captioner(
        request, workdir, stop, on_event, stop_timeout_s=settings.stop_timeout_s, on_spawn=on_spawn
    )


def _apply(manifest: dict, todo: list[dict], captions: dict[str, str], workdir: Path) -> None:
    """The generated captions into the snapshot: data/<n>.txt sidecars, the manifest, captions.jsonl."""
    for entry in todo:
        text = captions[entry["image"]]
        stem = entry["image"].rsplit(".", 1)[0]
        atomic_write_text(WorkDir(workdir).data / f"{stem}.txt", text + "\n")
        entry["caption"], entry["caption_source"] = text, "model"
    atomic_write_text(WorkDir(workdir).manifest, json.dumps(manifest, indent=2, ensure_ascii=False))
    write_captions_list(workdir, manifest["images"])


def _write_user_sidecars(folder: Path, todo: list[dict], log) -> None:
    """write_captions = true: <stem>.txt beside each captioned image, created only where none
    exists (O_EXCL: never overwriting one the user wrote meanwhile)."""
    written = 0
    for entry in todo:
        target = folder / f"{contract.split_suffix(entry['source'])[0]}.txt"
        try:
            with target.open("x", encoding="utf-8") as fh:
                fh.write(entry["caption"] + "\n")
            written += 1
        except FileExistsError:
            continue
        except OSError as exc:
            log.warning("captions.write_failed", file=str(target), error=str(exc))
    log.info("captions.written", folder=str(folder), files=written)


def doctor_check(settings):
    """`lorad doctor`'s captioner line: is caption_model here (looked up offline)? A warning only
    where missing_captions = "vlm" is the setting (a dataset's lora.toml may still ask for it)."""
    from engines.base import Check, CheckStatus

    model = settings.caption_model
    problem = model_problem(model)
    if problem is None:
        return Check("captioner", CheckStatus.OK, f'{model} (for missing_captions = "vlm")')
    status = CheckStatus.WARN if settings.missing_captions == "vlm" else CheckStatus.OK
    needed = "" if status is CheckStatus.WARN else 'needed only for missing_captions = "vlm"; '
    return Check("captioner", status, f"{needed}{problem}")
