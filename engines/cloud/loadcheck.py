"""Child: does mflux load this LoRA? `python -m engines.cloud.loadcheck --lora F --model M [--tiny-dir D]`.

Imports mlx and mflux, so it runs in its own process (the daemon never imports them). Every key
of the file must match a pattern of mflux's LoRA mapping for the model (mflux's own matcher, so a
key it would skip is found here, not as a LoRA that silently does nothing). For the miniature
model the LoRA is also applied, with mflux's LoRALoader, to the miniature transformer: shapes and
alpha are checked for real. Prints one JSON line: total, matched, unmatched (first ten), applied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mapping(model: str):
    if "flux" in model:
        from mflux.models.flux.weights.flux_lora_mapping import FluxLoRAMapping

        return FluxLoRAMapping.get_mapping()
    from mflux.models.z_image.weights.z_image_lora_mapping import ZImageLoRAMapping

    return ZImageLoRAMapping.get_mapping()


def check(lora: Path, model: str, tiny_dir: Path | None) -> dict:
    import mlx.core as mx
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader

    weights: dict = dict(mx.load(str(lora)).items())  # type: ignore[union-attr]
    patterns = LoRALoader._build_pattern_mappings(_mapping(model))
    matched = {
        key
        for key in weights
        if any(LoRALoader._match_pattern(key, p.source_pattern) is not None for p in patterns)
    }
    unmatched = sorted(set(weights) - matched)
    result = {"total": len(weights), "matched": len(matched), "unmatched": unmatched[:10], "applied": False}
    if tiny_dir is not None and not unmatched:
        from engines.mflux import tiny_model

        spec = (
            json.loads((tiny_dir / tiny_model.SPEC_FILE).read_text())
            if (tiny_dir / tiny_model.SPEC_FILE).is_file()
            else tiny_model.SPEC
        )
        transformer = tiny_model.build_modules(spec)[1]
        LoRALoader.load_and_apply_lora(
            lora_mapping=_mapping(model), transformer=transformer, lora_paths=[str(lora)], lora_scales=[1.0]
        )
        result["applied"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tiny-dir")
    args = parser.parse_args(argv)
    import contextlib

    try:
        with contextlib.redirect_stdout(sys.stderr):  # mflux prints its progress; stdout carries the answer
            result = check(Path(args.lora), args.model, Path(args.tiny_dir) if args.tiny_dir else None)
    except Exception as exc:  # reported to the daemon as the check's answer
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
