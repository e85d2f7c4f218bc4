"""``full``: every frame, every pooled patch token, one newline at the end (baseline).

Exactly transformers' LLaVA-OneVision video sequence: per frame the projector output on
the patch grid, 2x2 bilinear pooling (``apply_pooling``), frames flattened in time order,
then ONE ``image_newline`` after the last frame (not per frame). Frames go through the
vision tower in chunks, but the visual embeddings of all frames are held by definition
(T * tokens_per_frame + 1 rows, written into one preallocated tensor; no concatenation);
patch features before pooling live one chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    StrategyConfig,
    VideoPrompt,
    register,
)

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class FullConfig(StrategyConfig):
    """No knobs: every frame, every token."""


def pooled_video_embeds(vlm: LongVideoVLM, pixel_values: torch.Tensor,
                        frame_index: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(1, T * tokens_per_frame + 1, hidden) pooled tokens of the (selected) frames + the
    newline, and T. Written chunk by chunk into one preallocated tensor."""
    t_total = pixel_values.shape[0] if frame_index is None else frame_index.shape[0]
    per = vlm.tokens_per_frame
    out = torch.empty((1, t_total * per + 1, vlm.hidden_size), dtype=vlm.dtype,
                      device=vlm.device)
    for start, feats in vlm.iter_patch_features(pixel_values, frame_index):
        pooled = vlm.pool_2x2(feats)
        del feats
        t = pooled.shape[0]
        out[0, start * per : (start + t) * per] = pooled.reshape(t * per, -1)
        del pooled
    out[0, -1] = vlm.image_newline.to(out.dtype)
    return out, t_total


@register
class FullStrategy(EmbeddingStrategy):
    """Every frame, all pooled tokens + one newline (holds all frames' visual tokens)."""

    name = "full"
    config_class = FullConfig
    holds_all_patch_features = False  # pooled tokens of all frames, patches per chunk only

    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        return pooled_video_embeds(vlm, prompt.pixel_values)
