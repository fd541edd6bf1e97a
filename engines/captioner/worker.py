"""The captioning child: load a vision-language model (mlx-vlm), caption images, exit.

Run by engines/captioner/runner.py as `python -m engines.captioner.worker --request <json>`;
reports JSON lines on --progress-fd: `loaded`, one `caption` per image, `step`, then `done` with
the process's peak memory. The daemon never imports this module (it pulls in mlx). Nothing is
downloaded: the runner sets HF_HUB_OFFLINE, and the daemon checks the model is present first.
A stop (SIGTERM) before the end exits at once: the captions already reported are kept.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from engines.process.pause_hook import hold_at_step
from engines.process.worker_common import EarlyStop, Reporter, StopFlag, is_memory_error


def resolve_model(model: str, state_dir: Path) -> str:
    """tiny-vlm: built here (random weights); a folder: used as is; else a Hugging Face repo id
    that must already be in the local cache (offline)."""
    from engines.captioner import tiny_vlm

    if model == tiny_vlm.TINY_VLM_ID:
        return str(tiny_vlm.ensure_model(state_dir))
    return model


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def caption(request: dict, reporter: Reporter, stop: StopFlag) -> int:
    import mlx.core as mx
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    loaded: Any = load(resolve_model(request["model"], Path(request["state_dir"])))
    model, processor = loaded
    reporter.emit("loaded", model=request["model"], rss_bytes=peak_rss_bytes())
    prompt: Any = apply_chat_template(processor, model.config, request["prompt"], num_images=1)
    images = request["images"]
    for index, item in enumerate(images, start=1):
        if stop.is_set():
            reporter.emit("stopped", reason=stop.reason)
            return 0
        result = generate(
            model,
            processor,
            prompt,
            image=[item["path"]],
            max_tokens=int(request["max_tokens"]),
            temperature=0.0,
            verbose=False,
        )
        reporter.emit("caption", key=item["key"], text=result.text)
        reporter.step(index, len(images), None)
        hold_at_step(index, stop)  # tests only (LORADTEST_HOLD_AT_STEP): a cancel lands here
    reporter.emit(
        "done",
        captioned=len(images),
        peak_rss_bytes=peak_rss_bytes(),
        peak_mlx_bytes=int(mx.get_peak_memory()),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse
    import traceback

    from engines.process.child import EXIT_MEMORY

    parser = argparse.ArgumentParser(prog="engines.captioner.worker")
    parser.add_argument("--request", required=True)
    parser.add_argument("--progress-fd", type=int)
    args = parser.parse_args(argv)
    reporter = Reporter(args.progress_fd)
    stop = StopFlag(reporter)  # training_started stays False: a stop exits at once
    try:
        request = json.loads(Path(args.request).read_text(encoding="utf-8"))
        return caption(request, reporter, stop)
    except EarlyStop:
        reporter.emit("stopped", reason=stop.reason, early=True)
        return 0
    except BaseException as exc:  # report, then exit with a code the daemon classifies
        memory = is_memory_error(exc)
        reporter.emit("error", kind="memory" if memory else "error", message=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return EXIT_MEMORY if memory else 1


if __name__ == "__main__":
    sys.exit(main())
