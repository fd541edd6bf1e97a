"""Pure helpers of the dashboard: what a row shows, the queue order, the loss series, which file
a URL may name. No Starlette here, so they are table-tested without a server."""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

from daemon.jobs import ACTIVE, FINISHED, Job
from daemon.status import duration, eta_now

# The columns the queue page and its live updates need (never the big JSON columns but settings).
ROW_COLUMNS = (
    "id, seq, dataset, name, state, step, total_steps, loss, eta_s, updated_at, created_at, finished_at, "
    "ready_at, priority, error, settings, cancel_requested"
)
MAX_SERIES_POINTS = 400


def queue_order(jobs: list[Job]) -> list[Job]:
    """Running first, then waiting (priority, READY time), then finished newest first."""

    def key(job: Job) -> tuple:
        if job.state in ACTIVE:
            return (0, 0, 0.0, job.seq)
        if job.state not in FINISHED:
            return (1, -(job.priority or 0), job.ready_at, job.seq)
        return (2, 0, -(job.finished_at or job.updated_at), -job.seq)

    return sorted(jobs, key=key)


def row_of(job: Job, now: float) -> dict:
    """One queue row as plain data (the page renders it; the live stream sends it as JSON)."""
    total = job.total_steps or 0
    step = job.step or 0
    left = eta_now(job, now)
    settings = _settings_of(job)
    return {
        "id": job.id,
        "dataset": job.dataset,
        "name": job.name,
        "state": job.state + (" (cancelling)" if job.cancel_requested and job.state in ACTIVE else ""),
        "step": step,
        "total": total,
        "pct": round(100 * min(step, total) / total) if total else 0,
        "loss": None if job.loss is None else round(job.loss, 4),
        "eta": duration(left) if left is not None else "",
        "engine": str(settings.get("engine") or ""),
        # Scale-out columns (migration 3 on the scale-out branch): shown where the table has them.
        "worker": str(getattr(job, "worker", None) or ""),
        "waiting": str(getattr(job, "waiting", None) or ""),
        "error": (job.error or "").strip().splitlines()[0] if job.error and job.error.strip() else "",
        "updated_at": job.updated_at,
    }


def _settings_of(job: Job) -> dict:
    try:
        value = job.settings
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_series(path: Path, limit: int = MAX_SERIES_POINTS) -> list[list[float]]:
    """[[step, loss], ...] from a job's progress.jsonl, thinned to at most `limit` points (the
    last one kept). A torn last line (the writer was killed mid-append) is skipped."""
    points: list[list[float]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return points
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step, loss = record["step"], record["loss"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(step, (int, float)) and isinstance(loss, (int, float)):
            points.append([step, loss])
    if len(points) > limit:
        stride = len(points) / limit
        points = [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]
    return points


CAPTION_SOURCES = {
    "file": ".txt file",
    "metadata.jsonl": "metadata.jsonl",
    "model": "captioner",
    "trigger": "trigger word",
}


def read_captions(manifest_path: Path) -> list[dict]:
    """Each image of a job's snapshot with the caption it trains on and where the caption came
    from (an image still waiting for the captioner has none yet). Empty if there is no snapshot."""
    try:
        images = json.loads(manifest_path.read_text(encoding="utf-8"))["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    rows = []
    for entry in images if isinstance(images, list) else []:
        if not isinstance(entry, dict):
            continue
        caption, source = entry.get("caption"), entry.get("caption_source")
        rows.append(
            {
                "file": str(entry.get("source", "")),
                "caption": caption if isinstance(caption, str) else "",
                "source": CAPTION_SOURCES.get(str(source), str(source or ""))
                if caption is not None
                else "waiting for the captioner",
            }
        )
    return rows


_SAFE_PART = re.compile(r"[^\x00/\\]+")


def inside(root: Path, relative: str) -> Path | None:
    """The regular file `relative` names under `root`, or None: no `..`, `.`, empty or absolute
    parts, no backslash or NUL, and its real path (symlinks resolved) must stay inside the real
    root. The caller has already percent-decoded the URL once; what is left is taken literally."""
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") or not _SAFE_PART.fullmatch(p) for p in parts):
        return None
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(real_root.joinpath(*parts)))
    if not target.is_relative_to(real_root) or target == real_root:
        return None
    return target if target.is_file() else None


def lora_groups(loras: Path) -> list[dict]:
    """Every published LoRA in the folder: {name, current (stem or None), versions [stems, newest
    first]}; `<name>.v<N>` files are the older versions of `<name>`."""
    groups: dict[str, dict] = {}
    try:
        names = sorted(os.listdir(loras))
    except OSError:
        return []
    for file_name in names:
        if not file_name.endswith(".safetensors"):
            continue
        stem = file_name[: -len(".safetensors")]
        match = re.fullmatch(r"(.+)\.v([0-9]+)", stem)
        base = match.group(1) if match else stem
        group = groups.setdefault(base, {"name": base, "current": None, "versions": []})
        if match:
            group["versions"].append((int(match.group(2)), stem))
        else:
            group["current"] = stem
    out = []
    for base in sorted(groups):
        group = groups[base]
        group["versions"] = [stem for _n, stem in sorted(group["versions"], reverse=True)]
        out.append(group)
    return out


def plan_lines(plan: dict) -> list[tuple[str, str]]:
    """The plan as (label, value) lines, as `lorad plan` prints them."""
    if not plan:
        return []
    lines = [
        (k, str(plan[k]))
        for k in ("engine", "model", "backend", "tier", "total_steps", "reason")
        if plan.get(k)
    ]
    lines += [("", str(line)) for line in plan.get("summary") or []]
    lines += [("warning", str(w)) for w in plan.get("warnings") or []]
    return lines


def local_location(path: str, query: str = "") -> str:
    """A redirect target on this dashboard for a request path (pure): percent-encoded, and one
    leading slash only, so `//evil.example/x` (or a backslash, which browsers read as a slash)
    cannot become a link to another site."""
    quoted = urllib.parse.quote(path, safe="/")
    return "/" + quoted.lstrip("/") + ("?" + query if query else "")


def file_url(kind: str, relative: str) -> str:
    """The /files URL of a file under the loras folder or a job's render/ (pure): each part
    percent-encoded, so a LoRA name holding `?`, `#` or `%` still names its file."""
    return f"/files/{kind}/" + urllib.parse.quote(relative, safe="/")


def same_origin(origin: str | None, referer: str | None, host: str | None, scheme: str) -> bool:
    """Does a POST come from this dashboard's own pages? Origin (every modern browser sends it on
    a POST) or, failing that, Referer must name this host; neither present is refused."""
    if not host:
        return False
    own = f"{scheme}://{host}"
    if origin:
        return origin == own
    if referer:
        return referer == own or referer.startswith(own + "/")
    return False


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, port: int) -> bool:
    """Without a token the dashboard answers only to its loopback names (a web page cannot
    reach it through DNS rebinding: the browser would send the attacker's name as Host)."""
    if not host_header:
        return False
    name, _, port_text = (
        host_header.rpartition(":") if not host_header.endswith("]") else (host_header, "", "")
    )
    if not name:  # no port in the header
        name, port_text = host_header, ""
    if port_text and port_text != str(port):
        return False
    return name.lower() in LOOPBACK_NAMES or is_loopback(name)


_SAMPLE_NAME = re.compile(r"([0-9]{7})_([0-9]{1,2})\.png")


def sample_grid(folder: Path, url_prefix: str) -> dict:
    """The samples made during training (engines write `<step:07d>_<prompt number>.png` and
    prompts.json into samples/) as a grid: {prompts: [...], rows: [{step, images: [url or
    None per prompt]}]}, oldest step first. An empty grid when there are none yet."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {"prompts": [], "rows": []}
    try:
        prompts = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
        prompts = [str(p) for p in prompts] if isinstance(prompts, list) else []
    except (OSError, ValueError):
        prompts = []
    cells: dict[int, dict[int, str]] = {}
    for name in names:
        match = _SAMPLE_NAME.fullmatch(name)
        if match:
            cells.setdefault(int(match.group(1)), {})[int(match.group(2))] = f"{url_prefix}/{name}"
    columns = max([len(prompts), *(max(c) for c in cells.values())]) if cells else len(prompts)
    prompts += [f"prompt {i}" for i in range(len(prompts) + 1, columns + 1)]
    rows = [
        {"step": step, "images": [cells[step].get(i) for i in range(1, columns + 1)]}
        for step in sorted(cells)
    ]
    return {"prompts": prompts, "rows": rows}


def metrics_line(metrics: dict | None) -> str:
    """ "steps 120 · loss 1.21 → 0.903 · LoRA effect 0.043" for the job and library pages."""
    if not isinstance(metrics, dict):
        return ""
    from daemon.metrics import summary_line

    steps = metrics.get("steps")
    parts = [f"{steps} steps"] if steps else []
    summary = summary_line(metrics)
    return " · ".join(parts + ([summary] if summary else []))
