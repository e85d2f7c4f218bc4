"""Shipped model configs: published hyperparameters, no weights.

The profiler builds these on the meta device to simulate models too big for the machine;
the tests build the tiny ones for real. Every entry is a ``LlavaOnevisionConfig``
(LLaVA-Video and Video-XL share its shape: vision tower -> 2-layer MLP projector ->
2x2 bilinear pooling -> Qwen2 decoder).

- ``llava-onevision-qwen2-7b``: the ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` layout:
  SigLIP-so400m 384/14 (27x27 patches, 26 layers as exported, hidden 1,152), pooled to
  14x14 = 196 tokens (+1 newline) per frame, Qwen2-7B (28 layers, hidden 3,584, 28 query /
  4 KV heads, MLP 18,944, vocab 152,128, rope theta 1e6).
- ``videoxl-qwen2-7b``: Video-XL's CLIP ViT-L/14-336 (24x24 patches, feature layer -2, CLS
  dropped), pooled 2x2 to 144 tokens per frame, the same Qwen2-7B decoder
  (``../shared/methods/videoxl.md``).
- ``tiny-llava-onevision`` / ``tiny-videoxl``: the same classes at toy size (random init is
  cheap, a forward takes milliseconds) for tests and the measured-vs-simulated check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152128,
                 max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                 tie_word_embeddings=False)
_TINY_QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                   max_position_embeddings=65536, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                   tie_word_embeddings=False)
# Token ids of <image>/<video> inside the vocabulary (the 7B ones are the published ids).
_TINY_IDS = dict(image_token_index=254, video_token_index=255)


def _onevision(vision: dict[str, Any], text: dict[str, Any], **kw: Any):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(vision_config=vision, text_config={"model_type": "qwen2", **text},
                                **kw)


def llava_onevision_qwen2_7b():
    """LLaVA-OneVision-Qwen2-7B (SigLIP-so400m 384/14 + Qwen2-7B)."""
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                  patch_size=14, image_size=384, num_hidden_layers=26, num_attention_heads=16,
                  vision_use_head=False)
    return _onevision(vision, _QWEN2_7B, vision_feature_layer=-1,
                      vision_feature_select_strategy="full")


def videoxl_qwen2_7b():
    """Video-XL-7B (CLIP ViT-L/14-336, 144 tokens per frame + Qwen2-7B)."""
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                  patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16,
                  projection_dim=768)
    return _onevision(vision, _QWEN2_7B, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")


def tiny_llava_onevision():
    """Toy SigLIP (56/14: 4x4 patches -> 2x2 pooled) + 2-layer Qwen2, vocab 256."""
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  patch_size=14, image_size=56, num_hidden_layers=2, num_attention_heads=4,
                  vision_use_head=False)
    return _onevision(vision, _TINY_QWEN2, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", **_TINY_IDS)


def tiny_videoxl():
    """Toy CLIP (56/14, CLS dropped) + 2-layer Qwen2, vocab 256."""
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  patch_size=14, image_size=56, num_hidden_layers=3, num_attention_heads=4,
                  projection_dim=32)
    return _onevision(vision, _TINY_QWEN2, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", **_TINY_IDS)


MODEL_CONFIGS: dict[str, Callable[[], Any]] = {
    "llava-onevision-qwen2-7b": llava_onevision_qwen2_7b,
    "videoxl-qwen2-7b": videoxl_qwen2_7b,
    "tiny-llava-onevision": tiny_llava_onevision,
    "tiny-videoxl": tiny_videoxl,
}


def get_config(name: str):
    """The shipped ``LlavaOnevisionConfig`` called ``name`` (ValueError lists the names)."""
    try:
        return MODEL_CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; shipped configs: "
                         f"{', '.join(sorted(MODEL_CONFIGS))}") from None
