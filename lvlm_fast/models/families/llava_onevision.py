"""LLaVA-OneVision (and LLaVA-Video / Video-XL in the transformers layout):
``LlavaOnevisionForConditionalGeneration``.

- Vision: one frame per unit. The vision tower runs only up to ``vision_feature_layer``
  (embeddings, CLIP's pre-norm if any, then the encoder layers that layer needs: no
  all-layer hidden-state list, no post-norm), CLS dropped for the ``"default"`` select
  strategy, then the projector: ``(t, g, g, D)`` with ``g = image_size // patch_size``.
  This equals transformers' ``hidden_states[vision_feature_layer]`` path exactly.
- Pooling: transformers' ``apply_pooling`` for video (2x2 bilinear resize to
  ``ceil(g/2)``).
- Layout: ONE ``image_newline`` after the last frame; the newline is also the separator.
- Positions: 1-D RoPE (the decoder's default positions).
- Preprocessing: frames resized to ``image_size`` squared (aspect ratio not kept, as the
  LLaVA-OneVision video processor does); SigLIP mean = std = 0.5 by default (CLIP's for a
  CLIP tower); user turn ``<video>\\n{question}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lvlm_fast.models.families.base import CLIP_MEAN, CLIP_STD, ModelFamily, register_family


@register_family
class LlavaOneVisionFamily(ModelFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    frames_per_unit = 1

    @classmethod
    def model_class(cls) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    # ------------------------------------------------------------------ vision
    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def patch_grid(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def vision_inner(self) -> torch.nn.Module:
        vt = self.model.model.vision_tower
        return getattr(vt, "vision_model", vt)

    def has_cls(self) -> bool:
        return hasattr(self.vision_inner(), "pre_layrnorm") or \
            self.config.vision_config.model_type.startswith("clip")

    def feature_layers(self) -> list[int]:
        """Feature layers as hidden_states indices in [0, num_layers]."""
        n = len(self.vision_inner().encoder.layers)
        layer = self.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        out = []
        for li in layers:
            idx = li if li >= 0 else n + 1 + li
            if not 0 <= idx <= n:
                raise ValueError(f"vision_feature_layer {li} is out of range for a vision tower "
                                 f"with {n} layers")
            out.append(idx)
        return out

    def check_pixels(self, pixel_values: Any) -> None:
        s = self.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or pixel_values.shape[1] != 3 or pixel_values.shape[2] != s \
                or pixel_values.shape[3] != s:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) \
                else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (T, 3, {s}, {s}) (frames resized to the "
                             f"vision tower's image_size), got {got}")
        if pixel_values.shape[0] < 1:
            raise ValueError("pixel_values holds no frames (T = 0)")

    def feature_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return self.patch_grid, self.patch_grid

    def token_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        g = math.ceil(self.patch_grid / 2)
        return g, g

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        inner = self.vision_inner()
        layers = self.feature_layers()
        p = self.model.lm_head.weight
        h = inner.embeddings(frames.to(device=p.device, dtype=p.dtype, non_blocking=True))
        if hasattr(inner, "pre_layrnorm"):  # CLIP: hidden_states[0] is after the pre-norm
            h = inner.pre_layrnorm(h)
        picked: dict[int, torch.Tensor] = {}
        if 0 in layers:
            picked[0] = h
        for i, layer in enumerate(inner.encoder.layers[: max(layers)], start=1):
            h = layer(h, None)
            if isinstance(h, tuple):  # older transformers return (hidden, attn)
                h = h[0]
            if i in layers:
                picked[i] = h
        feats = picked[layers[0]] if len(layers) == 1 else \
            torch.cat([picked[i] for i in layers], dim=-1)
        del picked, h
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.model.model.multi_modal_projector(feats)
        g = self.patch_grid
        return feats.view(feats.shape[0], g, g, feats.shape[-1])

    def encode_all_at_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The released LLaVA tower call: ``output_hidden_states=True`` (every layer's
        (N, P, C) hidden states alive at once), then the projector on all frames."""
        model = self.model.model
        cfg = self.config
        p = self.model.lm_head.weight
        # frames may sit in (pinned) host memory (``lvlm-fast run``): device AND dtype here
        out = model.vision_tower(pixel_values.to(device=p.device, dtype=p.dtype),
                                 output_hidden_states=True, return_dict=True)
        layer = cfg.vision_feature_layer
        hs = out.hidden_states
        feats = hs[layer] if isinstance(layer, int) else \
            torch.cat([hs[i] for i in layer], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        x = model.multi_modal_projector(feats)
        del out, hs, feats
        g = self.patch_grid
        return x.view(x.shape[0], g, g, x.shape[-1])

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """(t, h, w, D) -> (t, ceil(h/2), ceil(w/2), D): transformers' ``apply_pooling``
        (bilinear resize); the result is a channels-last view."""
        h, w = feats.shape[1], feats.shape[2]
        x = feats.permute(0, 3, 1, 2).contiguous()
        x = F.interpolate(x, size=[math.ceil(h / 2), math.ceil(w / 2)], mode="bilinear")
        return x.permute(0, 2, 3, 1)

    def vision_bytes_per_frame(self) -> int:
        vc = self.config.vision_config
        item = self.model.lm_head.weight.dtype.itemsize
        hidden = self.text_config.hidden_size
        n = self.patch_grid ** 2 + (1 if self.has_cls() else 0)
        acts = n * (6 * vc.hidden_size + vc.intermediate_size) * item
        # CUDA with SDPA: a flash / memory-efficient kernel, no score matrix (issue 14.2.5);
        # elsewhere (CPU math fallback, eager) the fp32 P^2 scores as a worst case
        flash = self.model.lm_head.weight.device.type == "cuda" \
            and getattr(vc, "_attn_implementation", None) != "eager"
        scores = 0 if flash else vc.num_attention_heads * n * n * 4
        proj = n * 2 * hidden * item
        pixels = 3 * vc.image_size ** 2 * item
        return int(acts + scores + proj + pixels)

    # ------------------------------------------------------------------ layout
    @property
    def image_newline(self) -> torch.nn.Parameter:
        return self.model.model.image_newline

    def end_tokens(self) -> torch.Tensor:
        return self.image_newline.view(1, -1)

    def num_end_tokens(self) -> int:
        return 1

    def separator(self) -> torch.Tensor | None:
        return self.image_newline

    # ------------------------------------------------------------------ preprocessing
    def frame_size(self, height: int, width: int, preprocessing: dict[str, Any]
                   ) -> tuple[int, int]:
        return self.image_size, self.image_size

    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.config.vision_config.model_type.startswith("clip"):
            return CLIP_MEAN, CLIP_STD
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def video_text(self) -> str:
        return "{video}\n"
