"""The adapter lorad publishes carries each module's LoRA alpha as a `<module>.alpha` tensor.

mflux trains a LoRA layer as `W x + (alpha / rank) * B A x` but saves only `lora_A`/`lora_B`:
alpha is lost. Every loader of the file applies alpha/rank when a `<module>.alpha` scalar sits
beside the pair, and scale 1 when none does: mflux's own LoRALoader (`possible_alpha_patterns`),
diffusers' Z-Image converter (`_convert_non_diffusers_z_image_lora_to_diffusers`) and ComfyUI's
`load_lora`. So without it a LoRA trained with alpha != rank loads rank/alpha times too strong
or too weak everywhere, the test render included. Writing the scalar (kohya's convention, the
one all three read) keeps `lora_A`/`lora_B` exactly as trained; baking alpha/rank into `lora_B`
would work too but changes the trained tensors and misleads any tool that also reads alpha.

The file is rewritten at the byte level (no mlx, numpy or torch): the trained tensors, bf16 or
f32, are copied untouched and the scalars are appended as F32.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from daemon.fsutil import temp_beside
from engines.mflux import checkpoints

LORA_A = ".lora_A.weight"
MODEL_PREFIX = "diffusion_model."


def _read_header(path: Path) -> tuple[dict, int]:
    with Path(path).open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size)), 8 + size


def _target_pattern(module_path: str) -> re.Pattern:
    """mflux's `layers.{block}.attention.to_q` as a regex over module paths."""
    return re.compile("^" + re.escape(module_path).replace(re.escape("{block}"), r"\d+") + "$")


def module_alphas(header: dict, targets: list[dict]) -> dict[str, float]:
    """`<module>.alpha` key -> alpha for each LoRA pair in a safetensors header (pure).

    A target without alpha trained at scale 1, i.e. alpha = rank. Pairs that already carry an
    alpha, and pairs no target names, are left alone."""
    patterns = [(_target_pattern(t["module_path"]), t) for t in targets]
    out: dict[str, float] = {}
    for key, info in header.items():
        if key == "__metadata__" or not key.endswith(LORA_A):
            continue
        module = key[: -len(LORA_A)]
        alpha_key = f"{module}.alpha"
        if alpha_key in header:
            continue
        path = module.removeprefix(MODEL_PREFIX)
        target = next((t for pattern, t in patterns if pattern.match(path)), None)
        if target is None:
            continue
        rank = int(info["shape"][0])  # mflux saves lora_A transposed: (rank, in_features)
        alpha = target.get("alpha")
        out[alpha_key] = float(rank if alpha is None else alpha)
    return out


def append_scalars(src: Path, dest: Path, scalars: dict[str, float]) -> None:
    """Copy a safetensors file to dest (atomically) with F32 scalar tensors appended."""
    header, offset = _read_header(src)
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    extra = b""
    for name, value in sorted(scalars.items()):
        header[name] = {"dtype": "F32", "shape": [], "data_offsets": [data_len + len(extra), data_len + len(extra) + 4]}
        extra += struct.pack("<f", value)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # keep the data section 8-byte aligned
    fd, tmp = temp_beside(dest)
    try:
        with Path(src).open("rb") as fin, os.fdopen(fd, "wb") as fout:
            fout.write(struct.pack("<Q", len(blob)))
            fout.write(blob)
            fin.seek(offset)
            remaining = data_len
            while remaining:
                chunk = fin.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ValueError(f"{src}: tensor data shorter than its header says")
                fout.write(chunk)
                remaining -= len(chunk)
            fout.write(extra)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_adapter(checkpoint: Path, dest: Path, config: dict) -> Path:
    """The checkpoint's adapter at dest, with `<module>.alpha` for every trained LoRA pair."""
    checkpoints.extract_adapter(checkpoint, dest)
    header, _ = _read_header(dest)
    alphas = module_alphas(header, config.get("lora_layers", {}).get("targets", []))
    if alphas:
        append_scalars(dest, dest, alphas)
    return dest

