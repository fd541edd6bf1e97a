"""Side-by-side comparison image (base | LoRA), labelled. Child-side (imports PIL)."""

from __future__ import annotations

from pathlib import Path


def side_by_side(left: Path, right: Path, out: Path, *, labels: tuple[str, str], title: str = "") -> Path:
    from PIL import Image, ImageDraw, ImageFont

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    height = max(a.height, b.height)
    band = max(18, height // 14)
    canvas = Image.new("RGB", (a.width + b.width, height + band), "white")
    canvas.paste(a, (0, band))
    canvas.paste(b, (a.width, band))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=max(10, band - 6))
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    draw.text((4, 2), labels[0], fill="black", font=font)
    draw.text((a.width + 4, 2), labels[1], fill="black", font=font)
    tmp = out.with_name(f".{out.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(out)
    return out
