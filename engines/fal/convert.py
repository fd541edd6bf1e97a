"""Moved to engines/cloud/convert.py (every cloud's LoRA goes through it); kept for old imports."""

from engines.cloud.convert import (
    PEFT_METADATA_KEY,
    BadLoRA,
    Converted,
    convert,
    layout_of,
    peft_alpha,
    peft_configs,
    plan_conversion,
    read_header,
)

__all__ = [
    "PEFT_METADATA_KEY",
    "BadLoRA",
    "Converted",
    "convert",
    "layout_of",
    "peft_alpha",
    "peft_configs",
    "plan_conversion",
    "read_header",
]
