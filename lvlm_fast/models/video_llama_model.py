"""Video-LLaMA (v1, DAMO-NLP-SG/Video-LLaMA) assembled from transformers parts.

:class:`VideoLlamaModel` holds, in transformers' VLM layout (``model.model.*`` +
``lm_head``, so :class:`lvlm_fast.models.LongVideoVLM` drives it like any family):

- ``model.vision_model``: ``Blip2VisionModel`` (EVA ViT-g/14; its ``post_layernorm`` is the
  released ``ln_vision``), frozen;
- ``model.qformer`` + ``model.query_tokens``: the image Q-Former (``Blip2QFormerModel``,
  12 layers, cross-attention every other layer, 32 queries): 32 x 768 tokens per frame;
- ``model.video_qformer``: :class:`lvlm_fast.nn.VideoQFormer` (2-layer Video Q-Former on
  the streaming fused cross-attention op, with the 32-row frame-position table and
  ``llama_proj``);
- ``model.audio_qformer`` (optional): :class:`lvlm_fast.nn.AudioQFormer` over per-clip
  ImageBind embeddings given by the caller (the ImageBind encoder is not a dependency);
- ``model.language_model`` (``LlamaModel``) + ``lm_head``: the LLaMA / Vicuna LLM.

Facts: ``shared/methods/videollama.md``. :func:`from_released_checkpoint` builds it from
the released files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
)

from lvlm_fast.nn.qformer import AudioQFormer, VideoQFormer

# the released Video Q-Former (init_video_Qformer): VideoQFormer keyword arguments
RELEASED_VIDEO_QFORMER = dict(num_queries=32, hidden_size=768, num_layers=2, num_heads=12,
                              intermediate_size=3072, max_positions=32)
RELEASED_AUDIO_QFORMER = dict(num_queries=8, encoder_width=1024, hidden_size=768,
                              num_layers=2, num_heads=12, intermediate_size=3072,
                              max_positions=8)


def _sub(cfg: Any, cls: type) -> Any:
    if cfg is None:
        return cls()
    return cls(**cfg) if isinstance(cfg, dict) else cfg


class VideoLlamaConfig(PretrainedConfig):
    """Video-LLaMA's sizes: ``vision_config`` (``Blip2VisionConfig``), ``qformer_config``
    (image Q-Former, ``Blip2QFormerConfig``), ``num_query_tokens`` (image Q-Former queries),
    ``video_qformer`` (:class:`VideoQFormer` keyword arguments; ``encoder_width`` is the
    image Q-Former's hidden size, ``llm_hidden_size`` the LLM's), ``audio_qformer``
    (:class:`AudioQFormer` keyword arguments, None = no audio branch), ``text_config``
    (``LlamaConfig``), ``num_frames`` (the released frame count, 8)."""

    model_type = "video_llama"

    def __init__(self, vision_config: Any = None, qformer_config: Any = None,
                 text_config: Any = None, num_query_tokens: int = 32,
                 video_qformer: dict | None = None, audio_qformer: dict | None = None,
                 num_frames: int = 8, **kwargs: Any) -> None:
        self.vision_config = _sub(vision_config, Blip2VisionConfig)
        self.qformer_config = _sub(qformer_config, Blip2QFormerConfig)
        self.text_config = _sub(text_config, LlamaConfig)
        self.num_query_tokens = num_query_tokens
        self.video_qformer = dict(RELEASED_VIDEO_QFORMER if video_qformer is None
                                  else video_qformer)
        self.audio_qformer = None if audio_qformer is None else dict(audio_qformer)
        self.num_frames = num_frames
        super().__init__(**kwargs)


class _Inner(nn.Module):
    def __init__(self, config: VideoLlamaConfig) -> None:
        super().__init__()
        qc = config.qformer_config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.qformer = Blip2QFormerModel(qc)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qc.hidden_size))
        hidden = config.text_config.hidden_size
        self.video_qformer = VideoQFormer(**{"encoder_width": qc.hidden_size,
                                             "llm_hidden_size": hidden,
                                             **config.video_qformer})
        self.audio_qformer = None if config.audio_qformer is None else \
            AudioQFormer(**{"llm_hidden_size": hidden, **config.audio_qformer})
        self.language_model = LlamaModel(config.text_config)


class VideoLlamaModel(nn.Module):
    """Video-LLaMA from transformers parts (see module doc). Not a transformers class:
    the wrapper's families find it by class."""

    def __init__(self, config: VideoLlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, VideoLlamaConfig):
            raise TypeError(f"config must be a VideoLlamaConfig, got {type(config).__name__}")
        self.config = config
        self.model = _Inner(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        with torch.no_grad():  # BLIP-2 / BERT init of the random parts
            self.model.query_tokens.normal_(0.0, 0.02)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    # ------------------------------------------------------------------ the released math
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(f, 3, S, S) frames -> (f, 32, 768) image-Q-Former tokens (EVA ViT-g with
        ``ln_vision``, then the image Q-Former over its 32 query tokens)."""
        m = self.model
        emb = m.vision_model(pixel_values=pixel_values).last_hidden_state
        q = m.query_tokens.expand(emb.shape[0], -1, -1)
        return m.qformer(query_embeds=q, encoder_hidden_states=emb).last_hidden_state

    def video_tokens(self, frame_tokens: torch.Tensor | list[torch.Tensor], *,
                     position: str | None = None) -> torch.Tensor:
        """(1, T, 32, 768) image-Q-Former tokens (or a list of such chunks along T) -> the
        video's (1, 32, llm_hidden) LLM tokens: Video Q-Former (streaming, two passes) then
        ``llama_proj``."""
        vq = self.model.video_qformer
        return vq.project(vq(frame_tokens, position=position))

    def audio_tokens(self, clip_embeds: torch.Tensor, *,
                     position: str | None = None) -> torch.Tensor:
        """(1, n_clips, 1024) ImageBind clip embeddings -> (1, 8, llm_hidden) audio tokens."""
        aq = self.model.audio_qformer
        if aq is None:
            raise ValueError("audio_embeds given but this Video-LLaMA was built without the "
                             "audio branch (config.audio_qformer is None)")
        return aq.project(aq(clip_embeds, position=position))


# --------------------------------------------------------------------------- loading
def lavis_image_encoder_key_map(config: VideoLlamaConfig) -> dict[str, str]:
    """{our parameter name: LAVIS BLIP-2 key} for the frozen image encoder and image
    Q-Former (``blip2_pretrained_flant5xxl.pth`` + ``eva_vit_g.pth`` layout; the renames of
    transformers' BLIP-2 conversion script). ``attn.qkv.weight`` maps to ``qkv.weight``; the
    qkv bias is ``cat(q_bias, 0, v_bias)`` (handled by :func:`load_lavis_image_encoder`)."""
    m: dict[str, str] = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
        "vision_model.post_layernorm.weight": "ln_vision.weight",
        "vision_model.post_layernorm.bias": "ln_vision.bias",
        "query_tokens": "query_tokens",
    }
    for i in range(config.vision_config.num_hidden_layers):
        a, b = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for wb in ("weight", "bias"):
            m[a + f"layer_norm1.{wb}"] = b + f"norm1.{wb}"
            m[a + f"layer_norm2.{wb}"] = b + f"norm2.{wb}"
            m[a + f"self_attn.projection.{wb}"] = b + f"attn.proj.{wb}"
            m[a + f"mlp.fc1.{wb}"] = b + f"mlp.fc1.{wb}"
            m[a + f"mlp.fc2.{wb}"] = b + f"mlp.fc2.{wb}"
        m[a + "self_attn.qkv.weight"] = b + "attn.qkv.weight"
    return m


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], what: str
          ) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{what} lacks key {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} key {key!r} has shape {got}, expected {tuple(shape)}")
    return t


def load_lavis_image_encoder(model: VideoLlamaModel, sd: Mapping[str, torch.Tensor]) -> None:
    """Load the EVA ViT-g + ``ln_vision`` + image Q-Former (``Qformer.bert.*``,
    ``query_tokens``) from a LAVIS-layout state dict into ``model`` (ValueError naming a
    missing or mis-shaped key)."""
    inner = model.model
    ours = dict(inner.named_parameters())
    what = "image-encoder state dict"
    new: dict[str, torch.Tensor] = {}
    for name, key in lavis_image_encoder_key_map(model.config).items():
        new[name] = _take(sd, key, ours[name].shape, what)
    for i in range(model.config.vision_config.num_hidden_layers):
        b = f"visual_encoder.blocks.{i}.attn."
        name = f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"
        hid = ours[name].shape[0] // 3
        q = _take(sd, b + "q_bias", (hid,), what)
        v = _take(sd, b + "v_bias", (hid,), what)
        new[name] = torch.cat([q, torch.zeros_like(v), v])
    qf = {}
    for key, t in sd.items():
        if key.startswith("Qformer.bert.") and not key.endswith("position_ids"):
            k = key[len("Qformer.bert."):].replace("embeddings.LayerNorm", "layernorm")
            k = k.replace(".attention.self.", ".attention.attention.")
            qf["qformer." + k.replace(".crossattention.self.", ".crossattention.attention.")] = t
    for name, p in ours.items():
        if name.startswith("qformer."):
            if name not in qf:
                raise ValueError(f"{what} lacks the image Q-Former weight for {name!r} "
                                 "(keys Qformer.bert.*)")
            if tuple(qf[name].shape) != tuple(p.shape):
                raise ValueError(f"{what} image Q-Former weight for {name!r} has shape "
                                 f"{tuple(qf[name].shape)}, expected {tuple(p.shape)}")
            new[name] = qf[name]
    with torch.no_grad():
        for name, t in new.items():
            ours[name].copy_(t)


def _load_sd(path: str | os.PathLike, what: str) -> Mapping[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["model"] if isinstance(ckpt, Mapping) and "model" in ckpt else ckpt


def from_released_checkpoint(video_ckpt: str | os.PathLike, llm_path: str | os.PathLike, *,
                             image_encoder_ckpt: str | os.PathLike,
                             audio_ckpt: str | os.PathLike | None = None,
                             vision_config: Any = None, qformer_config: Any = None,
                             video_qformer: dict | None = None,
                             audio_qformer: dict | None = None,
                             position: str = "error",
                             dtype: torch.dtype | None = None) -> VideoLlamaModel:
    """Build Video-LLaMA from its released files.

    ``video_ckpt``: the VL branch ``.pth`` (``torch.load(p)["model"]``: ``video_Qformer.*``,
    ``video_query_tokens``, ``video_frame_position_embedding.weight``, ``llama_proj.*``).
    ``llm_path``: a local LLaMA / Vicuna transformers folder (``LlamaForCausalLM``).
    ``image_encoder_ckpt``: a LAVIS-layout ``.pth`` with the frozen EVA ViT-g
    (``visual_encoder.*``), ``ln_vision.*``, the image Q-Former (``Qformer.bert.*``) and its
    ``query_tokens`` (the released checkpoints hold frozen modules only as buffers, so these
    come from BLIP-2: ``eva_vit_g.pth`` + ``blip2_pretrained_flant5xxl.pth`` merged).
    ``audio_ckpt``: the AL branch ``.pth`` (``audio_Qformer.*``, ...), None = no audio.
    Sizes: the released ones by default (EVA ViT-g, BERT-base Q-Formers: the
    ``*_config`` / ``*_qformer`` arguments override them, e.g. for toy tests); the LLM's
    from its folder. ``position``: both branches' rule beyond their position tables.
    A missing or mis-shaped key is a ValueError naming it."""
    from transformers import LlamaForCausalLM

    llm_path = os.fspath(llm_path)
    if not os.path.isdir(llm_path):
        raise FileNotFoundError(f"llm_path {llm_path!r} is not a LLaMA/Vicuna folder")
    llm = LlamaForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    vsd = _load_sd(video_ckpt, "video_ckpt")
    asd = None if audio_ckpt is None else _load_sd(audio_ckpt, "audio_ckpt")
    isd = _load_sd(image_encoder_ckpt, "image_encoder_ckpt")
    qc = _sub(qformer_config, Blip2QFormerConfig)
    vq = dict(RELEASED_VIDEO_QFORMER if video_qformer is None else video_qformer,
              position=position)
    vq.setdefault("encoder_width", qc.hidden_size)
    video = VideoQFormer.from_released_state_dict(vsd, **vq)
    aq = None
    if asd is not None:
        aq = dict(RELEASED_AUDIO_QFORMER if audio_qformer is None else audio_qformer,
                  position=position)
    if "query_tokens" in isd:
        n_query = int(isd["query_tokens"].shape[1])
    else:
        raise ValueError("image_encoder_ckpt lacks key 'query_tokens'")
    config = VideoLlamaConfig(vision_config=vision_config, qformer_config=qc,
                              text_config=llm.config, num_query_tokens=n_query,
                              video_qformer=vq, audio_qformer=aq)
    with torch.device("meta"):
        model = VideoLlamaModel(config)
    model = model.to_empty(device="cpu")
    inner = model.model
    inner.video_qformer = video
    if asd is not None:
        inner.audio_qformer = AudioQFormer.from_released_state_dict(asd, **aq)
    inner.language_model = llm.model
    model.lm_head = llm.lm_head
    load_lavis_image_encoder(model, isd)
    # (Blip2VisionModel / Blip2QFormerModel hold no buffers: every tensor was loaded)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------- shipped configs
def video_llama_7b() -> VideoLlamaConfig:
    """Video-LLaMA-7B sizes (no weights): EVA ViT-g/14 at 224 px (Blip2VisionConfig
    defaults: 1,408 wide, 39 layers, 16 heads, MLP 6,144; 257 tokens per frame), the BLIP-2
    image Q-Former (12 layers, cross-attention every other layer, 32 queries), the 2-layer
    Video Q-Former (32 queries, 32-row frame table), the Audio Q-Former (8 queries over
    1,024-d clips), Vicuna-7B (32 layers, hidden 4,096, 32 heads, MLP 11,008, vocab 32,000)."""
    text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return VideoLlamaConfig(vision_config=Blip2VisionConfig(), qformer_config=Blip2QFormerConfig(),
                            text_config=LlamaConfig(**text), num_query_tokens=32,
                            video_qformer=dict(RELEASED_VIDEO_QFORMER),
                            audio_qformer=dict(RELEASED_AUDIO_QFORMER))


def tiny_video_llama() -> VideoLlamaConfig:
    """Toy Video-LLaMA: 2-layer ViT (28 px, patch 14: 5 tokens per frame), 2-layer image
    Q-Former (4 queries of 32), 2-layer Video Q-Former (4 queries, the released 32-row frame
    table), Audio Q-Former (2 queries over 16-d clips, 8 rows), 2-layer LLaMA (hidden 64,
    head dim 16), vocab 256."""
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=28, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, cross_attention_frequency=2,
                                 encoder_hidden_size=32)
    small = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=4096, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return VideoLlamaConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                            num_query_tokens=4,
                            video_qformer=dict(num_queries=4, max_positions=32, **small),
                            audio_qformer=dict(num_queries=2, encoder_width=16,
                                               max_positions=8, **small))
