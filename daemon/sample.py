"""Generated sample datasets: for `lorad selftest`, the tests and the benchmarks."""

from __future__ import annotations

import random
from pathlib import Path


def make_dataset(
    folder: Path,
    *,
    images: int = 3,
    size: int = 256,
    seed: int = 0,
    trigger: str | None = None,
    fmt: str = "png",
) -> Path:
    """A valid dataset: `images` distinct pictures with captions that hold the trigger word."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trigger = trigger or folder.name.split("_", 1)[0]
    rng = random.Random(seed)
    for i in range(images):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.randrange(size), rng.randrange(size)
            draw.ellipse(
                (x0, y0, x0 + rng.randrange(8, size // 2), y0 + rng.randrange(8, size // 2)),
                fill=tuple(rng.randrange(256) for _ in range(3)),
            )
        ext = "jpg" if fmt == "jpeg" else fmt
        image.save(folder / f"img_{i:03d}.{ext}")
        (folder / f"img_{i:03d}.txt").write_text(
            f"{trigger}, a photo of a person, variant {i}\n", encoding="utf-8"
        )
    return folder
