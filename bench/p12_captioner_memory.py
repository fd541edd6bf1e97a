"""P12 captioner memory: the captioning child's peak memory on the miniature captioner.

Runs the real captioning child (engines.base.run_captioner -> engines/captioner/worker.py, the
path a `missing_captions = "vlm"` job takes) with `caption_model = "tiny-vlm"` over N images, and
reports the child's peak RSS (ru_maxrss) and MLX's peak allocation, as the child itself measures
them. Baseline: the peak RSS of a child that only imports mlx.core and mlx_vlm (the fixed cost of
the stack). The miniature model is built once before the measured run (a one-time set-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import result

from daemon.captions import CAPTION_PROMPT, MAX_NEW_TOKENS
from daemon.sample import make_dataset
from engines.base import StopToken, run_captioner

BASELINE = (
    "import resource, sys, mlx.core, mlx_vlm\n"
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(peak if sys.platform == 'darwin' else peak * 1024)\n"
)


def caption_once(state: Path, work: Path, images: list[Path]) -> tuple[dict, float]:
    request = {
        "model": "tiny-vlm",
        "prompt": CAPTION_PROMPT,
        "max_tokens": MAX_NEW_TOKENS,
        "state_dir": str(state),
        "images": [{"key": str(i), "path": str(p)} for i, p in enumerate(images)],
    }
    started = time.monotonic()
    outcome = run_captioner(request, work, StopToken(), lambda _e: None, stop_timeout_s=30)
    elapsed = time.monotonic() - started
    if outcome.error or len(outcome.captions) != len(images):
        sys.exit(f"captioning failed: {outcome.error}")
    return {"rss": outcome.peak_rss_bytes, "mlx": outcome.peak_mlx_bytes}, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "ohwx_bench", images=args.images, size=512)
        images = sorted(data.glob("*.png"))
        caption_once(root / "state", root, images[:1])  # builds tiny-vlm (not measured)
        peaks, elapsed = caption_once(root / "state", root, images)
    base = int(
        subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout
    )
    mib = 1024 * 1024
    print(json.dumps({"images": args.images, "seconds": round(elapsed, 2), **peaks, "baseline_rss": base}))
    result("P12", peaks["rss"] / mib, "MiB", base / mib, "<= 1024 MiB", peaks["rss"] <= 1024 * mib)
    print(f"MLX peak allocation: {peaks['mlx'] / mib:.1f} MiB; {args.images} images in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
