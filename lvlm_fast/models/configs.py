"""Shipped model configs: published hyperparameters, no weights.

The profiler builds these on the meta device to simulate models too big for the machine;
the tests build the tiny ones for real. Each entry is a config of a supported family
(:mod:`lvlm_fast.models.families`): a ``LlavaOnevisionConfig`` (LLaVA-Video and Video-XL
share its shape: vision tower -> 2-layer MLP projector -> 2x2 bilinear pooling -> Qwen2
decoder) or a ``Qwen2_5_VLConfig`` (windowed ViT with 3-D patches -> 2x2 merger -> Qwen2
decoder with M-RoPE).

- ``llava-onevision-qwen2-7b``: the ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` layout:
  SigLIP-so400m 384/14 (27x27 patches, 26 layers as exported, hidden 1,152), pooled to
  14x14 = 196 tokens (+1 newline) per frame, Qwen2-7B (28 layers, hidden 3,584, 28 query /
  4 KV heads, MLP 18,944, vocab 152,128, rope theta 1e6).
- ``videoxl-qwen2-7b``: Video-XL's CLIP ViT-L/14-336 (24x24 patches, feature layer -2, CLS
  dropped), pooled 2x2 to 144 tokens per frame, the same Qwen2-7B decoder
  (``../shared/methods/videoxl.md``).
- ``qwen2.5-vl-7b``: ``Qwen/Qwen2.5-VL-7B-Instruct``'s ``config.json``: ViT depth 32, hidden
  1,280, MLP 3,420, 16 heads, patch 14, temporal patch 2, window 112, full-attention blocks
  7/15/23/31, 2x2 merger to 3,584, tokens_per_second 2; Qwen2-7B decoder (28 layers,
  hidden 3,584, 28 query / 4 KV heads, MLP 18,944, vocab 152,064, rope theta 1e6, M-RoPE
  sections 16/24/24).
- ``tiny-llava-onevision`` / ``tiny-videoxl`` / ``tiny-qwen2.5-vl``: the same classes at toy
  size (random init is cheap, a forward takes milliseconds) for tests and the
  measured-vs-simulated check. ``tiny-qwen2.5-vl`` has head dim 64 (the fused attention
  runs) and a 56-pixel window (4 windows in a 112x112 frame, so window attention matters).
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


def _qwen2_5_vl(vision: dict[str, Any], text: dict[str, Any], **kw: Any):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **kw)


def qwen2_5_vl_7b():
    """Qwen2.5-VL-7B-Instruct (windowed ViT-675M + Qwen2-7B with M-RoPE)."""
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  in_channels=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, hidden_act="silu")
    text = dict(_QWEN2_7B, vocab_size=152064, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                                 "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645)
    return _qwen2_5_vl(vision, text, image_token_id=151655, video_token_id=151656,
                       vision_start_token_id=151652, vision_end_token_id=151653)


def tiny_qwen2_5_vl():
    """Toy Qwen2.5-VL: 4-block ViT (full attention in blocks 1 and 3, 56 px windows),
    2-layer decoder with head dim 64 (M-RoPE sections 8/12/12), vocab 256."""
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                  out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                  tokens_per_second=2, hidden_act="silu")
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
                max_position_embeddings=65536, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                 "mrope_section": [8, 12, 12]},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _qwen2_5_vl(vision, text, image_token_id=250, video_token_id=251,
                       vision_start_token_id=252, vision_end_token_id=253)


def _qwen3_vl(vision: dict[str, Any], text: dict[str, Any], **kw: Any):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(vision_config=vision, text_config=text, **kw)


def qwen3_vl_8b():
    """Qwen3-VL-8B-Instruct (ViT 27 blocks, DeepStack from blocks 8/16/24, + Qwen3-8B with
    interleaved M-RoPE 24/20/20)."""
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  in_channels=3, out_hidden_size=4096, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
                  initializer_range=0.02)
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, hidden_act="silu", max_position_embeddings=262144,
                rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                bos_token_id=151643, eos_token_id=151645)
    return _qwen3_vl(vision, text, image_token_id=151655, video_token_id=151656,
                     vision_start_token_id=151652, vision_end_token_id=151653,
                     tie_word_embeddings=False)


def tiny_qwen3_vl():
    """Toy Qwen3-VL: 4-block ViT (patch 16, DeepStack from blocks 1 and 2), 3-layer decoder
    with head dim 64 (interleaved M-RoPE sections 12/10/10), vocab 256."""
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                  out_hidden_size=128, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[1, 2], hidden_act="gelu_pytorch_tanh")
    text = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                max_position_embeddings=65536, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                 "mrope_section": [12, 10, 10], "mrope_interleaved": True},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _qwen3_vl(vision, text, image_token_id=250, video_token_id=251,
                     vision_start_token_id=252, vision_end_token_id=253,
                     tie_word_embeddings=False)


def _qwen3_5(vision: dict[str, Any], text: dict[str, Any], **kw: Any):
    from transformers import Qwen3_5Config

    return Qwen3_5Config(vision_config=vision, text_config=text, **kw)


def qwen3_5_9b():
    """Qwen3.5-9B (Qwen3-VL-style ViT without DeepStack + a hybrid decoder: 32 layers, every
    4th full attention (gated, head dim 256, partial rotary 1/4, interleaved M-RoPE 11/11/10),
    the other 24 Gated DeltaNet linear attention with a kernel-4 conv).

    Values are transformers' ``Qwen3_5TextConfig`` defaults (documented there as the 9B
    layout) and the published Qwen3.5 family settings. Uncertain (no checkpoint was read
    here): the ViT depth/width (the Qwen3-VL SigLIP-2 tower as transformers' default, depth
    27, hidden 1,152), ``rope_theta`` 1e7, ``max_position_embeddings`` 262,144, the EOS id
    and ``tie_word_embeddings`` False; none of them changes the KV/state byte accounting
    except ``max_position_embeddings`` (positions only)."""
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  in_channels=3, out_hidden_size=4096, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=2304,
                  hidden_act="gelu_pytorch_tanh", initializer_range=0.02)
    text = dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                head_dim=256, hidden_act="silu", max_position_embeddings=262144,
                rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=False,
                linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_num_key_heads=16, linear_num_value_heads=32,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                             for i in range(32)],
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                 "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=248046)  # eos: <|im_end|> (uncertain)
    return _qwen3_5(vision, text, image_token_id=248056, video_token_id=248057,
                    vision_start_token_id=248053, vision_end_token_id=248054,
                    tie_word_embeddings=False)


def tiny_qwen3_5():
    """Toy Qwen3.5: 2-block ViT (patch 16, 2x2 merge), 4-layer hybrid decoder (linear, full,
    linear, full; head dim 64 so the fused attention runs, partial rotary 1/4 with
    interleaved M-RoPE sections 3/3/2; 2 key / 4 value Gated DeltaNet heads of 32, conv 4),
    vocab 256."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                  out_hidden_size=128, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=64,
                  hidden_act="gelu_pytorch_tanh")
    text = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                max_position_embeddings=65536, rms_norm_eps=1e-6, tie_word_embeddings=False,
                linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                                 "partial_rotary_factor": 0.25,
                                 "mrope_section": [3, 3, 2], "mrope_interleaved": True},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _qwen3_5(vision, text, image_token_id=250, video_token_id=251,
                    vision_start_token_id=252, vision_end_token_id=253,
                    tie_word_embeddings=False)


def video_llama_7b():
    """Video-LLaMA-7B (EVA ViT-g + BLIP-2 image Q-Former + Video/Audio Q-Formers + Vicuna-7B;
    :func:`lvlm_fast.models.video_llama_model.video_llama_7b`)."""
    from lvlm_fast.models import video_llama_model

    return video_llama_model.video_llama_7b()


def tiny_video_llama():
    """Toy Video-LLaMA (:func:`lvlm_fast.models.video_llama_model.tiny_video_llama`)."""
    from lvlm_fast.models import video_llama_model

    return video_llama_model.tiny_video_llama()


MODEL_CONFIGS: dict[str, Callable[[], Any]] = {
    "llava-onevision-qwen2-7b": llava_onevision_qwen2_7b,
    "videoxl-qwen2-7b": videoxl_qwen2_7b,
    "tiny-llava-onevision": tiny_llava_onevision,
    "tiny-videoxl": tiny_videoxl,
    "qwen2.5-vl-7b": qwen2_5_vl_7b,
    "tiny-qwen2.5-vl": tiny_qwen2_5_vl,
    "qwen3-vl-8b": qwen3_vl_8b,
    "tiny-qwen3-vl": tiny_qwen3_vl,
    "qwen3.5-9b": qwen3_5_9b,
    "tiny-qwen3.5": tiny_qwen3_5,
    "video-llama-7b": video_llama_7b,
    "tiny-video-llama": tiny_video_llama,
}


def get_config(name: str):
    """The shipped config called ``name`` (ValueError lists the names)."""
    try:
        return MODEL_CONFIGS[name]()
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; shipped configs: "
                         f"{', '.join(sorted(MODEL_CONFIGS))}") from None
