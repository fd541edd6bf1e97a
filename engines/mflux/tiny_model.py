"""Miniature random-weight Z-Image (`tiny-z-image`) so mflux's real training loop runs in CI.

Imported only inside the training/render child: it pulls in mlx and mflux.

The checkpoint is written with mflux's own `ModelSaver`, so loading goes through mflux's
normal weight loader. mflux's constructors are not sized from the checkpoint, so the one
patch point is `ZImageInitializer._init_models`, which `install_patch()` replaces with a
version that reads `tiny.json` beside the weights.

Constraints that shape the dimensions below:
- VAE GroupNorm uses 32 groups: every VAE channel count is a multiple of 32;
- the transformer's rope needs `sum(axes_dims) == dim / n_heads`, each part even;
- q8/q4 quantization needs Linear input dims that are multiples of 64, so the memory plan's
  quantized paths run on this model too (dim 192 -> feed-forward 512, adaLN input 192).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TINY_MODEL_ID = "tiny-z-image"
MFLUX_MODEL_FOR_TINY = "z-image"  # z-image-turbo would download an assistant adapter
SPEC_FILE = "tiny.json"
SEED = 1234

SPEC: dict = {
    "transformer": {
        "dim": 192,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 3,
        "cap_feat_dim": 128,
        "axes_dims": [16, 24, 24],
        "axes_lens": [1024, 512, 512],
    },
    "text_encoder": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 256,
        "head_dim": 64,
    },
    "vae": {"channels": [32, 32, 64, 64]},
    "vocab_size": 512,
}

# Qwen3-style template: mflux renders prompts with enable_thinking=True.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def model_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models" / TINY_MODEL_ID


def ensure_model(state_dir: Path) -> Path:
    """Write the miniature model once (atomically: built in a temp dir, then renamed)."""
    target = model_dir(state_dir)
    if (target / SPEC_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    _write_model(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _train_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "a portrait photo of a person with short hair, studio light",
        "a woman standing in a field, golden hour, detailed face",
        "a man in a red jacket, city street at night, cinematic",
        "close-up photo, soft light, smiling, looking at the camera",
        "user assistant system think",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=SPEC["vocab_size"],
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    fast.save_pretrained(str(path))


class _TinyModel:
    """Holder with the attributes ModelSaver looks for."""

    vae: Any
    transformer: Any
    text_encoder: Any
    tokenizers: Any


def build_modules(spec: dict):
    """Construct mflux's own Z-Image modules at miniature size (used by the patch and the writer)."""
    from mflux.models.common.vae.block_decoder import VAEBlockDecoder
    from mflux.models.z_image.model.z_image_text_encoder.text_encoder import TextEncoder
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer
    from mflux.models.z_image.model.z_image_vae.common.unet_mid_block import UNetMidBlock
    from mflux.models.z_image.model.z_image_vae.decoder import conv_in as dec_conv_in
    from mflux.models.z_image.model.z_image_vae.decoder import conv_norm_out as dec_norm
    from mflux.models.z_image.model.z_image_vae.decoder import conv_out as dec_conv_out
    from mflux.models.z_image.model.z_image_vae.decoder.decoder import Decoder
    from mflux.models.z_image.model.z_image_vae.decoder.up_decoder_block import UpDecoderBlock
    from mflux.models.z_image.model.z_image_vae.encoder.conv_in import ConvIn
    from mflux.models.z_image.model.z_image_vae.encoder.conv_norm_out import ConvNormOut
    from mflux.models.z_image.model.z_image_vae.encoder.conv_out import ConvOut
    from mflux.models.z_image.model.z_image_vae.encoder.down_encoder_block import DownEncoderBlock
    from mflux.models.z_image.model.z_image_vae.encoder.encoder import Encoder
    from mflux.models.z_image.model.z_image_vae.vae import VAE
    from mlx import nn

    c = spec["vae"]["channels"]
    top = c[-1]

    encoder = Encoder.__new__(Encoder)
    nn.Module.__init__(encoder)
    encoder.conv_in = ConvIn(in_channels=3, out_channels=c[0])
    ins = [c[0]] + c[:-1]
    encoder.down_blocks = [
        DownEncoderBlock(in_channels=i, out_channels=o, num_layers=1, add_downsample=n < len(c) - 1)
        for n, (i, o) in enumerate(zip(ins, c))
    ]
    encoder.mid_block = UNetMidBlock(channels=top)
    encoder.conv_norm_out = ConvNormOut(num_channels=top, num_groups=32)
    encoder.conv_out = ConvOut(in_channels=top, out_channels=32)

    decoder = Decoder.__new__(Decoder)
    nn.Module.__init__(decoder)
    decoder.conv_in = dec_conv_in.ConvIn(in_channels=16, out_channels=top)
    decoder.mid_block = UNetMidBlock(channels=top)
    rev = list(reversed(c))
    outs = rev[1:] + [rev[-1]]
    decoder.up_blocks = [
        UpDecoderBlock(in_channels=i, out_channels=o, num_layers=1, add_upsample=n < len(c) - 1)
        for n, (i, o) in enumerate(zip(rev, outs))
    ]
    decoder.conv_norm_out = dec_norm.ConvNormOut(channels=rev[-1])
    decoder.conv_out = dec_conv_out.ConvOut(in_channels=rev[-1], out_channels=3)

    vae = VAE.__new__(VAE)
    nn.Module.__init__(vae)
    vae.encoder = encoder
    vae.decoder = decoder
    vae.decode_mode = VAEBlockDecoder.LOW_MEMORY

    te = spec["text_encoder"]
    text_encoder = TextEncoder(vocab_size=spec["vocab_size"], **te)
    transformer = ZImageTransformer(**spec["transformer"])
    return vae, transformer, text_encoder


def _write_model(path: Path) -> None:
    import mlx.core as mx
    from mflux.models.common.tokenizer import TokenizerLoader
    from mflux.models.common.weights.saving.model_saver import ModelSaver
    from mflux.models.z_image.weights.z_image_weight_definition import ZImageWeightDefinition
    from mlx.utils import tree_map

    mx.random.seed(SEED)
    _train_tokenizer(path / "tokenizer")
    model = _TinyModel()
    model.vae, model.transformer, model.text_encoder = build_modules(SPEC)
    for module in (model.vae, model.transformer, model.text_encoder):
        # Random init is float32; mflux runs bfloat16 and small weights keep activations tame.
        module.update(tree_map(lambda a: a.astype(mx.bfloat16), module.parameters()))
    model.tokenizers = TokenizerLoader.load_all(
        definitions=ZImageWeightDefinition.get_tokenizers(), model_path=str(path)
    )
    ModelSaver.save_model(
        model=model, bits=None, base_path=str(path), weight_definition=ZImageWeightDefinition
    )
    (path / SPEC_FILE).write_text(json.dumps(SPEC, indent=2))


def install_patch(path: Path) -> None:
    """Size Z-Image's modules from `path/tiny.json` (child process only; the one patch point)."""
    from mflux.models.z_image.z_image_initializer import ZImageInitializer

    spec = json.loads((Path(path) / SPEC_FILE).read_text())

    def _init_models(model) -> None:
        from mflux.models.common.vae.block_decoder import VAEBlockDecoder

        model.vae, model.transformer, model.text_encoder = build_modules(spec)
        model.vae.decode_mode = VAEBlockDecoder.LOW_MEMORY

    ZImageInitializer._init_models = staticmethod(_init_models)


if (
    __name__ == "__main__"
):  # `python -m engines.mflux.tiny_model STATE_DIR`: the build, in a child (it imports mlx)
    import sys

    ensure_model(Path(sys.argv[1]))
