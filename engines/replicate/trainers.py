"""Replicate's trainers lorad knows, and what a training costs there (pure).

Sources (checked 2026-12-02): the trainer's model page and API schema,
replicate.com/ostris/flux-dev-lora-trainer (and /train, /api: inputs `input_images` (a zip URL),
`trigger_word`, `steps`, `lora_rank`, `learning_rate`, `autocaption`...; output `weights`, a
.tar holding `lora.safetensors`, and `version` in the destination model); Replicate's pricing
page, replicate.com/pricing ("Nvidia H100 GPU, gpu-h100, $0.001525/sec"; "Flux fine-tunes run on
H100s"). Replicate bills hardware *time*, so the cost is an estimate: price per second x seconds
per step (`[engines.replicate] seconds_per_step`, default below, a published-order figure, not
one lorad measured) x steps.

Only FLUX.1 [dev] has a trainer here: Replicate publishes no Z-Image or FLUX.2 trainer lorad could
confirm, so those models (and the miniature `tiny-z-image`) are refused unless
`[engines.replicate] trainers` names one and `schemas` describes it.
"""

from __future__ import annotations

from engines.cloud.schema import Field, Schema

H100_USD_PER_SECOND = 0.001525  # replicate.com/pricing, gpu-h100
SECONDS_PER_STEP = 1.2  # estimate (about 20 minutes for 1000 steps on one H100); override it

FLUX_DEV_TRAINER = "ostris/flux-dev-lora-trainer"

SCHEMAS: dict[str, Schema] = {
    FLUX_DEV_TRAINER: Schema(
        FLUX_DEV_TRAINER,
        trains=("flux-dev",),
        fields={
            "input_images": Field("url", required=True, role="archive"),
            "trigger_word": Field("str", default="TOK", role="trigger"),
            "steps": Field("int", minimum=3, maximum=6000, default=1000, role="steps"),
            "learning_rate": Field("float", minimum=0, default=0.0004, role="learning_rate"),
            "lora_rank": Field("int", minimum=1, maximum=128, default=16),
            "batch_size": Field("int", minimum=1, default=1),
            "autocaption": Field("bool", default=True),
            "resolution": Field("str", default="512,768,1024"),
        },
        usd_per_step=round(H100_USD_PER_SECOND * SECONDS_PER_STEP, 6),
        source="replicate.com/ostris/flux-dev-lora-trainer/api; replicate.com/pricing (2026-12-02)",
    ),
}

# lorad model id -> the trainer that trains exactly that model.
TRAINERS: dict[str, str] = {"flux-dev": FLUX_DEV_TRAINER}


def usd_per_step(seconds_per_step: float, usd_per_second: float = H100_USD_PER_SECOND) -> float:
    return round(seconds_per_step * usd_per_second, 6)


def parse_trainers(text: str) -> dict[str, str]:
    """`model=owner/name[:version], ...` -> dict; ValueError says what is wrong."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        model, sep, trainer = (s.strip() for s in part.partition("="))
        if not sep or not model or trainer.split(":")[0].count("/") != 1:
            raise ValueError(f"{part!r}: write model=owner/name, e.g. flux-dev={FLUX_DEV_TRAINER}")
        out[model] = trainer
    return out


def destination_problem(destination: str) -> str | None:
    """Why `destination` cannot name a Replicate model (pure); None: it can."""
    import re

    if not destination or destination == "-":
        return (
            'a Replicate training writes into a model on your account: set [engines.replicate] destination = "owner/model" '
            "in lorad.toml (create the model first at https://replicate.com/create)"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}/[a-z0-9][a-z0-9_.-]{0,99}", destination):
        return f'[engines.replicate] destination = {destination!r}: write "owner/model" (lower case, as Replicate names models)'
    return None
