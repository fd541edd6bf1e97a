"""Miniature random-weight Qwen3-VL (`tiny-vlm`) so the captioning path runs for real in CI.

Imported only inside the captioning child: it pulls in mlx and mlx-vlm. The default captioner
is a Qwen3-VL; this is the same architecture (mlx-vlm's own `qwen3_vl` model and its numpy image
processor, no torch) at a few hundred kilobytes, written as an ordinary model folder
(config.json, model.safetensors, tokenizer, processor configs) and loaded by mlx-vlm's normal
`load`. Nothing is downloaded. Its captions are noise by design.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VLM_ID = "tiny-vlm"
SEED = 4321
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen-style chat template, images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE, TEMPORAL = 16, 2, 2
# Images are resized to at most this many pixels (and at least MIN): a few dozen vision tokens.
MIN_PIXELS, MAX_PIXELS = 32 * 32 * 4, 64 * 64 * 4


def model_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models" / TINY_VLM_ID


def ensure_model(state_dir: Path) -> Path:
    """Write the miniature captioner once (built in a temp dir, then renamed into place)."""
    target = model_dir(state_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-vlm-", dir=target.parent))
    try:
        _write_model(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race: keep theirs
    return target


def _write_tokenizer(path: Path) -> dict[str, int]:
    """A byte-level tokenizer (every byte one token, no merges) with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    ids: dict[str, int] = {name: int(tok.token_to_id(name) or 0) for name in SPECIALS}
    return ids | {"vocab_size": tok.get_vocab_size()}


def config(ids: dict[str, int]) -> dict:
    """Qwen3-VL's config.json at miniature size (the shapes rules: mrope sections sum to
    head_dim / 2; the vision tower's output matches the text hidden size)."""
    vocab = ids["vocab_size"]
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vocab_size": vocab,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab,
            "rope_theta": 5_000_000.0,
            "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True},
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "out_hidden_size": 64,
            "num_heads": 2,
            "patch_size": PATCH,
            "spatial_patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
            "in_channels": 3,
        },
    }


def _processor_configs(path: Path) -> None:
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL,
        "merge_size": MERGE,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }
    video = {**image, "video_processor_type": "Qwen3VLVideoProcessor"}
    video.pop("image_processor_type")
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3VLProcessor", "chat_template": CHAT_TEMPLATE}, indent=2)
    )


def _write_model(path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models.qwen3_vl import Model, ModelConfig

    ids = _write_tokenizer(path)
    cfg = config(ids)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _processor_configs(path)
    mx.random.seed(SEED)
    model = Model(ModelConfig.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
