"""fal's trainer endpoints lorad knows, from fal's published schemas.

Source: fal-ai/fal-js `libs/client/src/types/endpoints.ts` and
`libs/client/src/types/training/zod.gen.ts` (generated from fal's endpoint schemas), and the model
pages fal.ai/models/<endpoint> (inputs, "Pricing"), as summarised with sources in
shared/background/fal-service-facts.md; checked 2026-12-02. Prices change: `[engines.fal]
price_per_step_usd` overrides them.

Not here on purpose: `fal-ai/z-image-base-trainer` (gone from fal-js's endpoint map, 2026-08:
unavailable unless confirmed), so the base `z-image` model has no cloud trainer;
`fal-ai/z-image-turbo-trainer-v2` (its input schema's ranges were not confirmed; price $0.85 per
1000 steps is published): name it with a schema in [engines.fal] to use it.
"""

from __future__ import annotations

from engines.cloud.schema import Field, Schema

SCHEMAS: dict[str, Schema] = {
    "fal-ai/z-image-trainer": Schema(
        "fal-ai/z-image-trainer",
        trains=("z-image-turbo",),  # trains Z-Image *Turbo*; never the base model
        fields={
            "image_data_url": Field("url", required=True, role="archive"),
            "steps": Field("int", minimum=100, maximum=10000, default=1000, role="steps"),
            "learning_rate": Field("float", minimum=0, maximum=1, default=0.0001, role="learning_rate"),
            # used only where a caption file is missing; lorad's snapshot captions every image
            "default_caption": Field("str", role="trigger"),
            "training_type": Field("enum", choices=("content", "style", "balanced")),
        },
        usd_per_step=0.00226,  # $2.26 per 1000 steps, linear
        min_steps=100,  # fal bills at least 100 steps ($0.226)
        source="fal.ai/models/fal-ai/z-image-trainer/api; fal-js zod.gen.ts (2026-12-02)",
    ),
    "fal-ai/flux-lora-fast-training": Schema(
        "fal-ai/flux-lora-fast-training",
        trains=("flux-dev", "flux"),
        fields={  # no learning_rate field in its schema
            "images_data_url": Field("url", required=True, role="archive"),
            "trigger_word": Field("str", role="trigger"),
            "steps": Field("int", minimum=1, maximum=10000, default=1000, role="steps"),
            "is_style": Field("bool", default=False),
            "create_masks": Field("bool", default=True),
            "is_input_format_already_preprocessed": Field("bool", default=False),
            "data_archive_format": Field("str"),
        },
        usd_per_step=0.002,  # "$2 per run, scales linearly with steps" (1000-step base implied)
        source="fal.ai/models/fal-ai/flux-lora-fast-training/api; fal-js zod.gen.ts (2026-12-02)",
    ),
}

# lorad model id -> the trainer that trains exactly that model. `z-image` (base) and the
# miniature `tiny-z-image` have none: refused unless [engines.fal] names an endpoint and schema.
ENDPOINTS: dict[str, str] = {
    "z-image-turbo": "fal-ai/z-image-trainer",
    "flux-dev": "fal-ai/flux-lora-fast-training",
    "flux": "fal-ai/flux-lora-fast-training",
}
