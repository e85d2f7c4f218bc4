"""``full``: every frame, every token the model itself feeds a video with (baseline).

Exactly the model's own video sequence, through the family interface: per temporal unit
the family's LLM-space grid and its own pooling, units flattened in time order, then the
family's end tokens. LLaVA-OneVision: per frame the projector output, 2x2 bilinear pooling
(``apply_pooling``), then ONE ``image_newline`` after the last frame (not per frame).
Qwen2.5-VL: per temporal patch (2 frames) the merger's tokens on the merged grid, no end
token; positions are the video's own M-RoPE grid (``TokenBlocks.grid``: one ``h x w`` block
per unit), which is ``get_rope_index``'s. Frames go through the vision tower in chunks,
but the visual embeddings of all frames are held by definition (units * tokens_per_unit +
end rows, written into one preallocated tensor; no concatenation); features before
pooling live one chunk at a time.

Qwen3-VL: per temporal unit the merger's grid with its DeepStack levels stacked on the
channels (``vlm.feature_size`` = (1 + levels) x hidden), every unit framed
by its own timestamp text (``<t seconds><|vision_start|> ... <|vision_end|>``, inserted by
the family at prefill); the DeepStack rows are split off and added to the first decoder
layers chunk by chunk of the prefill. Equals ``Qwen3VLForConditionalGeneration.generate``.
There its prefill streams the rows (:class:`VisualStream`): each vision chunk is encoded
when the prefill reaches it, so neither every frame's DeepStack rows nor every frame's
tokens are ever held (``visual_embeds`` still returns the whole tensor, for tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    PrefillResult,
    StrategyConfig,
    VideoPrompt,
    VisualEmbeds,
    VisualStream,
    register,
)

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class FullConfig(StrategyConfig):
    """No knobs: every frame, every token."""


def end_blocks(vlm: LongVideoVLM, blocks: TokenBlocks, last_unit: int | torch.Tensor
               ) -> TokenBlocks:
    """``blocks`` followed by the family's end tokens, each a 1 x 1 block at
    ``last_unit`` (none on Qwen2.5-VL)."""
    n_end = vlm.family.num_end_tokens()
    if not n_end:
        return blocks
    unit = torch.as_tensor(last_unit, dtype=torch.int64, device=blocks.t.device).reshape(1)
    tail = TokenBlocks.grid(unit.expand(n_end), 1, 1, frame_hw=blocks.frame_hw, fps=blocks.fps,
                            num_frames=blocks.num_frames, times=blocks.times)
    return TokenBlocks.cat([blocks, tail])


def pooled_video_embeds(vlm: LongVideoVLM, pixel_values: torch.Tensor,
                        frame_index: torch.Tensor | None = None,
                        fps: float | None = None, *, stream: bool = False,
                        times: list[float] | None = None) -> VisualEmbeds:
    """(1, units * tokens_per_unit + end, feature_size) pooled tokens of the (selected)
    frames + the family's end tokens, the frame count, and (families with grid positions)
    one ``h x w`` block per unit. Written chunk by chunk into one preallocated tensor, or
    with ``stream=True`` a :class:`VisualStream` that encodes each vision chunk only when
    the prefill reaches it (no tensor of every frame's rows)."""
    fam = vlm.family
    f_total = pixel_values.shape[0] if frame_index is None else frame_index.shape[0]
    t_total = fam.units(f_total)
    frame_hw = (pixel_values.shape[-2], pixel_values.shape[-1])
    gh, gw = fam.token_grid(frame_hw)
    per = gh * gw
    end = fam.end_tokens()
    rows = t_total * per + end.shape[0]
    if stream:
        def chunks() -> Iterator[torch.Tensor]:
            for _start, feats in vlm.iter_patch_features(pixel_values, frame_index):
                yield vlm.pool_2x2(feats).reshape(1, -1, vlm.feature_size)
            if end.shape[0]:
                yield end.to(vlm.dtype).unsqueeze(0)
        out: torch.Tensor | VisualStream = VisualStream(rows, vlm.feature_size, chunks())
    else:
        out = torch.empty((1, rows, vlm.feature_size), dtype=vlm.dtype, device=vlm.device)
        for start, feats in vlm.iter_patch_features(pixel_values, frame_index):
            pooled = vlm.pool_2x2(feats)
            del feats
            t = pooled.shape[0]
            out[0, start * per : (start + t) * per] = pooled.reshape(t * per, -1)
            del pooled
        if end.shape[0]:
            out[0, t_total * per:] = end.to(out.dtype)
    blocks = None
    if fam.needs_blocks():
        blocks = end_blocks(vlm, TokenBlocks.grid(t_total, gh, gw, device=vlm.device,
                                                  frame_hw=frame_hw, fps=fps,
                                                  num_frames=f_total, times=times),
                            t_total - 1)
    return VisualEmbeds(out, f_total, blocks)


@register
class FullStrategy(EmbeddingStrategy):
    """Every frame, all pooled tokens + one newline (holds all frames' visual tokens)."""

    name = "full"
    config_class = FullConfig
    holds_all_patch_features = False  # pooled tokens of all frames, patches per chunk only

    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        return pooled_video_embeds(vlm, prompt.pixel_values, fps=prompt.fps,
                                   times=prompt.frame_times)

    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        return stream_prefill(vlm, prompt, pooled_video_embeds(
            vlm, prompt.pixel_values, fps=prompt.fps, stream=streams(vlm),
            times=prompt.frame_times))


def streams(vlm: LongVideoVLM) -> bool:
    """Rows wider than the LLM (DeepStack levels) are streamed into the prefill, so no
    tensor holds every frame's DeepStack rows; other families keep the held tensor."""
    return vlm.feature_size != vlm.hidden_size


def stream_prefill(vlm: LongVideoVLM, prompt: VideoPrompt, out: VisualEmbeds
                   ) -> PrefillResult:
    visual, frames = out
    return vlm.prefill_embeds(prompt.prefix_ids, visual, prompt.question_ids,
                              frames_encoded=frames, blocks=out.blocks,
                              text_ids=prompt.text_ids)
