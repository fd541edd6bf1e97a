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

import re
from pathlib import Path

from engines.mflux import checkpoints
from lorad_base.safetensors_file import data_length, read_header, scalar_tensors, write

LORA_A = ".lora_A.weight"
MODEL_PREFIX = "diffusion_model."


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
    header, offset = read_header(src)
    data_len = data_length(header)
    entries, extra = scalar_tensors(data_len, scalars)
    header.update(entries)
    write(src, dest, header, offset=offset, data_len=data_len, extra=extra)


def export_adapter(checkpoint: Path, dest: Path, config: dict) -> Path:
    """The checkpoint's adapter at dest, with `<module>.alpha` for every trained LoRA pair."""
    checkpoints.extract_adapter(checkpoint, dest)
    header, _ = read_header(dest)
    alphas = module_alphas(header, config.get("lora_layers", {}).get("targets", []))
    if alphas:
        append_scalars(dest, dest, alphas)
    return dest
