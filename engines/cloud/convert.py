"""fal's LoRA file (diffusers / PEFT key layout) -> the layout lorad publishes (daemon side, no ML).

fal's trainers return `diffusers_lora_file`: keys like `transformer.layers.0.attention.to_q.lora_A.weight`
(a pipeline save), `base_model.model.<module>...` or bare `<module>...` (a PEFT model save), sometimes
with `.default` before `.weight`, and the LoRA alpha in the safetensors metadata
(`lora_adapter_metadata`: PEFT's config as JSON) instead of per-module tensors. lorad publishes
Z-Image LoRAs as `diffusion_model.<module>.lora_A/lora_B.weight` with a scalar `<module>.alpha`
(engines/mflux/lora_export.py): the layout its local LoRAs have, which mflux, diffusers and ComfyUI
all read and scale by alpha/rank. So here: rename the keys, turn the metadata's alpha (rsLoRA and
`alpha_pattern` included) into `.alpha` scalars, refuse anything that is not a well-formed LoRA.
The tensors are copied byte for byte (no numpy, torch or mlx in the daemon).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from lorad_base import safetensors_file

PEFT_METADATA_KEY = "lora_adapter_metadata"
TENSOR_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)\.alpha$")
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")


# Layouts mflux loads as they are (its own LoRA mappings): ComfyUI's fused attention (`qkv` with
# lora_down/lora_up), kohya's `lora_unet_*` names, and full-weight differences (`.diff`, `.diff_b`).
# Those are passed through unchanged (after mflux's load check), never renamed by guesswork.
_PASSTHROUGH = (
    re.compile(r"(^|\.)qkv\.(lora_down|lora_up)\.weight$"),
    re.compile(r"^lora_unet_"),
    re.compile(r"\.diff(_b)?$"),
)


def layout_of(keys: list[str]) -> str:
    """ "passthrough" when any key is in a layout mflux loads as is, else "diffusers" (the
    diffusers/PEFT unfused layout `convert` understands; anything else it refuses) (pure)."""
    tensors = [k for k in keys if k != "__metadata__"]
    if any(p.search(k) for k in tensors for p in _PASSTHROUGH):
        return "passthrough"
    return "diffusers"


class BadLoRA(ValueError):
    """The file is not a LoRA lorad can publish; the message says what is wrong with it."""


@dataclass(frozen=True)
class Converted:
    modules: int
    rank: int
    alpha: float  # of the first module (all modules of a fal training share it)
    keys: int


def read_header(path: Path, file_size: int | None = None) -> tuple[dict, int]:
    """The safetensors header and where the data starts; BadLoRA when it is not a safetensors file."""
    try:
        return safetensors_file.read_header(path, file_size)
    except safetensors_file.NotSafetensors as exc:
        raise BadLoRA(str(exc).removeprefix(f"{path} is ")) from None  # "not a safetensors file (...)"


def _module_name(module: str) -> tuple[str, str]:
    """(component, module path inside it): `transformer.layers.0.x` -> ("transformer", "layers.0.x")."""
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            return prefix.rstrip("."), module[len(prefix) :]
    return "", module


def peft_configs(metadata: dict) -> dict[str, dict]:
    """PEFT's LoRA configs in the metadata by component ("" for a model save); {} when none."""
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise BadLoRA(f"its metadata '{PEFT_METADATA_KEY}' is not JSON") from None
    if not isinstance(flat, dict):
        return {}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.rpartition(".")
        configs.setdefault(component, {})[name] = value
    return {c: cfg for c, cfg in configs.items() if "lora_alpha" in cfg}


def peft_alpha(component: str, module: str, configs: dict[str, dict], rank: int) -> float | None:
    """The `.alpha` value (loaders scale by alpha/rank) that gives the module PEFT's scale:
    lora_alpha/rank, or lora_alpha/sqrt(rank) with rsLoRA; alpha_pattern sets it per module."""
    config = configs.get(component) or configs.get("")
    if config is None and len(configs) == 1:
        config = next(iter(configs.values()))
    if config is None:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        return alpha * rank / math.sqrt(rank)
    return alpha


def _scalar(raw: bytes, dtype: str) -> float:
    if dtype == "F32":
        return float(struct.unpack("<f", raw)[0])
    if dtype == "F16":
        return float(struct.unpack("<e", raw)[0])
    return float(struct.unpack("<f", b"\x00\x00" + raw)[0])  # BF16: the high half of an F32


def plan_conversion(
    header: dict, data_len: int, out_prefix: str
) -> tuple[dict[str, str], dict[str, float], list[str]]:
    """(old key -> new key, new `.alpha` key -> alpha to append, modules) for a header (pure).

    BadLoRA for: no LoRA pairs, a key that is neither lora_A/B (down/up) nor alpha, a pair with
    a half missing or ranks that disagree, a dtype other than F32/F16/BF16, data offsets that do
    not match the shape or run past the file."""
    metadata = header.get("__metadata__") or {}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise BadLoRA("it holds no tensors")
    pairs: dict[str, dict[str, tuple[str, dict]]] = {}
    alphas: dict[str, str] = {}
    for key, info in tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in TENSOR_DTYPES:
            raise BadLoRA(
                f"tensor {key!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; a LoRA holds F32, F16 or BF16"
            )
        shape, (start, end) = info.get("shape", []), info.get("data_offsets", [0, -1])
        if end > data_len or start < 0 or end - start != math.prod(shape) * TENSOR_DTYPES[info["dtype"]]:
            raise BadLoRA(
                f"tensor {key!r}: its data offsets {start}..{end} do not match its shape {shape} or the file size"
            )
        match = _KEY.match(key)
        if match:
            kind = "A" if match["kind"] in ("lora_A", "lora_down") else "B"
            if len(shape) != 2:
                raise BadLoRA(f"tensor {key!r} has shape {shape}; a LoRA matrix is 2-D")
            pairs.setdefault(match["module"], {})[kind] = (key, info)
            continue
        alpha_match = _ALPHA.match(key)
        if alpha_match and shape in ([], [1]):
            alphas[alpha_match["module"]] = key
            continue
        raise BadLoRA(
            f"unexpected tensor {key!r}: a LoRA file holds lora_A/lora_B (or lora_down/lora_up) pairs and alphas"
        )
    if not pairs:
        raise BadLoRA("it holds no lora_A/lora_B pairs")
    configs = peft_configs(metadata)
    renames: dict[str, str] = {}
    new_alphas: dict[str, float] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise BadLoRA(f"module {module!r} has no {missing}")
        (a_key, a), (b_key, b) = pair["A"], pair["B"]
        rank = a["shape"][0]
        if b["shape"][1] != rank:
            raise BadLoRA(
                f"module {module!r}: lora_A is {a['shape']} but lora_B is {b['shape']} (ranks differ)"
            )
        component, path = _module_name(module)
        target = f"{out_prefix}{path}"
        renames[a_key] = f"{target}.lora_A.weight"
        renames[b_key] = f"{target}.lora_B.weight"
        if module in alphas:
            renames[alphas.pop(module)] = f"{target}.alpha"
        else:
            alpha = peft_alpha(component, path, configs, rank)
            new_alphas[f"{target}.alpha"] = float(rank if alpha is None else alpha)
    if alphas:
        raise BadLoRA(f"alpha {next(iter(alphas.values()))!r} belongs to no lora_A/lora_B pair")
    if len(set(renames.values())) != len(renames):
        raise BadLoRA("two tensors map to the same key (the file mixes layouts)")
    return renames, new_alphas, sorted(pairs)


def convert(src: Path, dest: Path, out_prefix: str = "diffusion_model.") -> Converted:
    """Write `src` in lorad's layout at `dest` (atomically); BadLoRA when it is not a LoRA."""
    size = Path(src).stat().st_size
    header, offset = read_header(src, size)
    data_len = size - offset
    renames, new_alphas, modules = plan_conversion(header, data_len, out_prefix)
    metadata = {k: str(v) for k, v in (header.get("__metadata__") or {}).items() if k != PEFT_METADATA_KEY}
    out: dict = {"__metadata__": metadata} if metadata else {}
    used_end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        out[renames[key]] = {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "data_offsets": info["data_offsets"],
        }
        used_end = max(used_end, info["data_offsets"][1])
    entries, extra = safetensors_file.scalar_tensors(used_end, new_alphas)
    out.update(entries)
    try:
        safetensors_file.write(src, dest, out, offset=offset, data_len=used_end, extra=extra)
    except safetensors_file.NotSafetensors:
        raise BadLoRA("its tensor data is shorter than its header says") from None
    alpha_key = sorted(k for k in out if k.endswith(".alpha"))[0]
    alpha = new_alphas.get(alpha_key)
    if alpha is None:  # kept from the file
        info = out[alpha_key]
        with Path(dest).open("rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + hlen + info["data_offsets"][0])
            alpha = _scalar(fh.read(info["data_offsets"][1] - info["data_offsets"][0])[:4], info["dtype"])
    rank_key = alpha_key[: -len(".alpha")] + ".lora_A.weight"
    return Converted(
        modules=len(modules),
        rank=int(out[rank_key]["shape"][0]),
        alpha=float(alpha),
        keys=len(out) - (1 if metadata else 0),
    )
