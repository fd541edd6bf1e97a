"""Run the captioning child (engines/captioner/worker.py) and collect what it reports.

Reached from the daemon through engines.base.run_captioner (daemon/ imports only engines.base).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from engines.base import CaptionOutcome, StopToken
from engines.process.child import run_child

ROOT = Path(__file__).resolve().parents[2]
REQUEST_FILE = "caption-request.json"
LOG_FILE = "caption.log"


def run(
    request: Mapping,
    workdir: Path,
    stop: StopToken,
    on_event: Callable[[dict], None],
    *,
    stop_timeout_s: float,
    on_spawn: Callable[[int], None] | None = None,
) -> CaptionOutcome:
    """Caption request["images"] in a child; captions arrive as events (passed on as they come,
    so the caller caches each one even if the child is stopped or dies later)."""
    path = workdir / REQUEST_FILE
    path.write_text(json.dumps(dict(request), indent=2), encoding="utf-8")
    captions: dict[str, str] = {}

    def seen(event: dict) -> None:
        if event.get("event") == "caption":
            captions[str(event["key"])] = str(event.get("text", ""))
        on_event(event)

    outcome = run_child(
        ["-m", "engines.captioner.worker", "--request", str(path)],
        cwd=ROOT,
        log_path=workdir / LOG_FILE,
        on_event=seen,
        stop=stop,
        stop_timeout_s=stop_timeout_s,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        keep_awake=False,
        on_spawn=on_spawn,
    )
    done = outcome.last("done") or {}
    error = None
    if outcome.stop_reason is None and (outcome.returncode != 0 or not done):
        reported = outcome.last("error")
        error = (reported or {}).get("message") or (
            f"the captioning process exited with code {outcome.returncode}: {outcome.stderr_tail[-300:]}"
        )
    return CaptionOutcome(
        captions=captions,
        stopped=outcome.stop_reason,
        error=error,
        peak_rss_bytes=done.get("peak_rss_bytes"),
        peak_mlx_bytes=done.get("peak_mlx_bytes"),
    )
