"""One P12 measurement point, in its own process: mflux's real LoRA training loop on Z-Image at full width.

    python bench/_p12_probe.py '{"tier": "q4", "quantize": 4, "gc": true, "low_ram": true,
                                 "cache_limit_gb": 2, "blocks": 2, "res": 256, "batch": 1, "steps": 2}' WORKDIR

Prints one line `P12POINT {json}`. What is real and what is a stand-in (and why):
- the transformer is mflux's `ZImageTransformer` at its real width (dim 3840, 30 heads, 2+2 refiner
  blocks, real embedders and final layer) with `blocks` main blocks instead of 30, random weights
  initialised block by block in bfloat16 (float32 for the whole model does not fit a 24 GB machine),
  then quantized by mflux's own loader path (`WeightApplier`) exactly as a real load does;
- LoRA is injected on the modules lorad trains (engines.mflux.config.TARGET_MODULES, rank 16) and the
  step is mflux's `TrainingRunner.train` with the tier's quantize / checkpointing / low_ram / cache limit;
- the VAE is mflux's real full-size VAE (resident as in training); the image latents and caption features
  are random arrays of the real shapes (16 x res/8 x res/8; CAPTION_TOKENS x 2560), because running the
  full encoders on this CPU costs minutes per point and they run once per image, before training;
- the 4B text encoder is NOT materialised (8 GB in bf16 on a shared 24 GB machine): the miniature one
  stands in, and the full one's resident bytes at this tier are counted exactly (mflux's quantizer applied
  to the lazily built module; shapes and dtypes give the bytes without evaluating anything) and added.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CAPTION_TOKENS = 64  # default; a lorad caption in Qwen3's chat template is ~30-60 tokens


def _bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def _materialise_bf16(module) -> None:
    """Cast the lazily initialised float32 parameters one array at a time (no float32 copy of the model)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    for path, array in tree_flatten(module.parameters()):
        cast = (array.astype(mx.bfloat16) * 0.1) if mx.issubdtype(array.dtype, mx.floating) else array
        mx.eval(cast)
        module.update(tree_unflatten([(path, cast)]), strict=False)


def full_text_encoder_bytes(bits: int | None) -> int:
    """Resident bytes of Z-Image's full Qwen3 text encoder at `bits` (never evaluated)."""
    import mlx.core as mx
    from mflux.models.common.weights.loading.weight_applier import WeightApplier
    from mflux.models.z_image.model.z_image_text_encoder.text_encoder import TextEncoder
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition
    from mlx.utils import tree_map

    encoder = TextEncoder()
    encoder.update(tree_map(lambda a: a.astype(mx.bfloat16), encoder.parameters()))
    if bits is not None:
        components = {c.name: c for c in ZImageWeightDefinition.get_components()}
        WeightApplier._quantize({"text_encoder": encoder}, bits, components, ZImageWeightDefinition)
    return _bytes(encoder)


def resident_bytes(bits: int | None, blocks: int) -> int:
    """Bytes of the full-size model's weights as mflux's loader leaves them at `bits` (the transformer with
    `blocks` main blocks, the VAE, the 4B text encoder), built lazily: nothing is allocated."""
    import mlx.core as mx
    from mflux.models.common.weights.loading.weight_applier import WeightApplier
    from mflux.models.z_image.model.z_image_text_encoder.text_encoder import TextEncoder
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer
    from mflux.models.z_image.model.z_image_vae.vae import VAE
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition
    from mlx.utils import tree_map

    models = {"vae": VAE(), "transformer": ZImageTransformer(n_layers=blocks), "text_encoder": TextEncoder()}
    for module in models.values():
        module.update(tree_map(lambda a: a.astype(mx.bfloat16), module.parameters()))
    if bits is not None:
        components = {c.name: c for c in ZImageWeightDefinition.get_components()}
        WeightApplier._quantize(models, bits, components, ZImageWeightDefinition)
    return sum(_bytes(m) for m in models.values())


def _install_patches(cfg: dict, sizes: dict) -> None:
    import mlx.core as mx
    from mflux.models.common.vae.block_decoder import VAEBlockDecoder
    from mflux.models.z_image.latent_creator.z_image_latent_creator import ZImageLatentCreator
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer
    from mflux.models.z_image.model.z_image_vae.vae import VAE
    from mflux.models.z_image.training_adapter.z_image_training_adapter import ZImageTrainingAdapter
    from mflux.models.z_image.z_image_initializer import ZImageInitializer

    from engines.mflux import tiny_model

    original_load = ZImageInitializer._load_weights

    def load_weights(path):
        weights = original_load(path)
        weights.components.clear()  # keep the random init: nothing to apply
        weights.meta_data.quantization_level = None
        return weights

    def init_models(model) -> None:
        model.vae = VAE()
        model.vae.decode_mode = VAEBlockDecoder.LOW_MEMORY
        model.transformer = ZImageTransformer(n_layers=int(cfg["blocks"]))
        model.text_encoder = tiny_model.build_modules(tiny_model.SPEC)[2]
        for module in (model.vae, model.transformer, model.text_encoder):
            _materialise_bf16(module)
        sizes["tiny_text_encoder_bytes"] = _bytes(model.text_encoder)

    def encode_data(self, *, data_id, image_path, prompt, width, height, input_image_path=None):
        key = mx.random.key(data_id)
        encoded = mx.random.normal((1, 16, height // 8, width // 8), key=key).astype(mx.bfloat16)
        latents = ZImageLatentCreator.pack_latents(encoded, height=height, width=width)
        cap_feats = mx.random.normal((int(cfg.get("caption_tokens", CAPTION_TOKENS)), 2560), key=key).astype(
            mx.bfloat16
        )
        mx.eval(latents, cap_feats)
        return latents, cap_feats

    ZImageInitializer._load_weights = staticmethod(load_weights)
    ZImageInitializer._init_models = staticmethod(init_models)
    ZImageTrainingAdapter.encode_data = encode_data


def _dataset(work: Path, res: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    data = work / f"data{res}x{count}"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if not (data / f"{i:04d}.png").exists():
            pixels = (np.random.default_rng(i).random((res, res, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(data / f"{i:04d}.png")
            (data / f"{i:04d}.txt").write_text("ohwx, a portrait photo of a person, studio light")
    return data


def _train_config(cfg: dict, model_path: Path, data: Path, out: Path) -> dict:
    from engines.mflux.config import TARGET_MODULES

    blocks = int(cfg["blocks"])
    targets = [
        {
            "module_path": f"layers.{{block}}.{m}",
            "blocks": {"start": 0, "end": blocks},
            "rank": 16,
            "alpha": 16.0,
        }
        for m in TARGET_MODULES
    ]
    batch = int(cfg.get("batch", 1))
    return {
        "model": "z-image",
        "model_path": str(model_path),
        "data": str(data),
        "seed": 42,
        "steps": 9,
        "guidance": 0.0,
        "quantize": cfg.get("quantize"),
        "max_resolution": int(cfg["res"]),
        "low_ram": bool(cfg.get("low_ram")),
        "gradient_checkpointing": bool(cfg.get("gc")),
        "cache_limit_gb": cfg.get("cache_limit_gb"),
        "training_loop": {"num_epochs": 1, "batch_size": batch, "timestep_low": 4, "timestep_high": 9},
        "optimizer": {"name": "AdamW", "learning_rate": 1e-4},
        "checkpoint": {"save_frequency": 100000, "output_path": str(out)},
        "lora_layers": {"targets": targets},
    }


def run(cfg: dict, work: Path) -> dict:
    import mlx.core as mx
    from mflux.models.common.training.runner import TrainingRunner
    from mflux.models.common.training.state.training_state import TrainingState
    from mflux.models.z_image.training_adapter.z_image_training_adapter import ZImageTrainingAdapter

    from engines.mflux import tiny_model

    started = time.time()
    sizes: dict = {}
    te_full = full_text_encoder_bytes(cfg.get("quantize"))
    gc.collect()
    _install_patches(cfg, sizes)
    tokenizer_model = tiny_model.ensure_model(work / "state")
    steps = int(cfg.get("steps", 2))
    batch = int(cfg.get("batch", 1))
    data = _dataset(work, int(cfg["res"]), steps * batch)
    out = work / f"out-{time.time_ns()}"
    config_path = work / f"train-{time.time_ns()}.json"
    config_path.write_text(json.dumps(_train_config(cfg, tokenizer_model, data, out)))

    step_times: list[float] = []
    step_peaks: list[int] = []
    optimizer_bytes: list[int] = []
    original_should_save = TrainingState.should_save

    def should_save(self, spec):
        from mlx.utils import tree_flatten

        step_times.append(time.time())
        step_peaks.append(mx.get_peak_memory())  # cumulative: the peak up to the end of this step
        optimizer_bytes.append(sum(a.nbytes for _, a in tree_flatten(self.optimizer.optimizer.state)))
        return original_should_save(self, spec)

    TrainingState.should_save = should_save
    from mflux.models.common.training import runner as runner_module

    original_inject = runner_module.inject_lora_targets

    def inject(transformer, targets):
        # The model is loaded. mflux quantizes lazily: until the quantized weights are evaluated, the
        # random bf16 ones they come from stay alive (a real load reads them lazily from the file, one
        # at a time). Evaluate them now so that the training peak sees the tier's weights only.
        model = adapter_holder[0].model() if adapter_holder else None
        for module in (model.vae, model.transformer, model.text_encoder) if model else (transformer,):
            mx.eval(module.parameters())
        gc.collect()
        mx.clear_cache()
        sizes["load_peak_bytes"] = mx.get_peak_memory()
        sizes["weights_bytes"] = mx.get_active_memory()
        mx.reset_peak_memory()
        return original_inject(transformer, targets)

    runner_module.inject_lora_targets = inject
    adapter_holder: list = []
    original_adapter_init = ZImageTrainingAdapter.__init__

    def adapter_init(self, **kwargs):
        original_adapter_init(self, **kwargs)
        adapter_holder.append(self)

    ZImageTrainingAdapter.__init__ = adapter_init
    mx.reset_peak_memory()
    loop_start = time.time()
    TrainingRunner.train(config_path=str(config_path), resume_path=None)
    peak = mx.get_peak_memory()
    tiny_te = sizes.get("tiny_text_encoder_bytes", 0)
    times = [loop_start, *step_times]
    return {
        "cfg": cfg,
        "device": str(mx.default_device()),
        "mlx_peak_bytes": peak,
        "text_encoder_full_bytes": te_full,
        "tiny_text_encoder_bytes": tiny_te,
        "peak_bytes": peak - tiny_te + te_full,
        "load_peak_bytes": sizes.get("load_peak_bytes"),
        "weights_bytes": sizes.get("weights_bytes"),
        "steps_done": len(step_times),
        "step_peak_bytes": [p - tiny_te + te_full for p in step_peaks],
        "optimizer_state_bytes": optimizer_bytes[-1] if optimizer_bytes else None,
        "step_seconds": [round(b - a, 2) for a, b in zip(times, times[1:])],
        "wall_s": round(time.time() - started, 1),
    }


def attention(toks: int) -> dict:
    """Peak of Z-Image's attention core (mflux's call: fast SDPA, additive mask, 30 heads x 128, bf16)
    forward + backward at `toks` tokens, above its inputs and outputs: the T^2 term a linear fit at
    small sizes cannot see (the CPU backend computes it unfused)."""
    import mlx.core as mx

    q, k, v = (mx.random.normal((1, 30, toks, 128)).astype(mx.bfloat16) for _ in range(3))
    mask = mx.where(
        mx.ones((1, 1, 1, toks), dtype=mx.bool_), mx.array(0.0, mx.bfloat16), mx.array(-mx.inf, mx.bfloat16)
    )
    cotangent = mx.random.normal((1, 30, toks, 128)).astype(mx.bfloat16)
    mx.eval(q, k, v, mask, cotangent)

    def core(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5, mask=mask)

    base = mx.get_active_memory()
    mx.reset_peak_memory()
    started = time.time()
    out, grads = mx.vjp(core, [q, k, v], [cotangent])
    mx.eval(out, grads)
    io = sum(a.nbytes for a in (*out, *grads))
    return {
        "tokens": toks,
        "extra_bytes": mx.get_peak_memory() - base - io,
        "seconds": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    if sys.argv[1] == "attention":
        print("P12ATTN " + json.dumps([attention(int(t)) for t in sys.argv[2:]]), flush=True)
        sys.exit(0)
    point = json.loads(sys.argv[1])
    workdir = Path(sys.argv[2]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print("P12POINT " + json.dumps(run(point, workdir)), flush=True)
