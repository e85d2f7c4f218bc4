"""``uniform``: a fixed number of uniformly sampled frames, then exactly like ``full``.

Frames ``round(linspace(0, T - 1, num_frames))`` (round half to even, the same rule as
:func:`lvlm_fast.video.sample_indices` ``mode="uniform"``), computed on the frames' device
and applied with ``index_select`` chunk by chunk (no host sync). A video with
``T <= num_frames`` frames is used whole (no repetition). The pooled tokens of the sampled
frames are held (``num_frames * tokens_per_frame + 1`` rows), patch features one chunk
at a time.

On a family with multi-frame temporal units (Qwen2.5-VL: 2 frames per temporal patch) the
sampled frames are grouped into units in order (the last frame repeated if the count is
odd, as the processor does) and positioned as the video of the sampled frames would be:
units 0, 1, ... of the sampled sequence at the time step of the sampled rate (``fps``
scaled by ``num_frames / T``, or unknown if the prompt's ``fps`` is).

Qwen3-VL: ``full`` on the sampled video: its units carry the timestamps of the sampled
video at the sampled rate, and the DeepStack rows of the sampled units only (streamed into
the prefill chunk by chunk, as in ``full``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    PrefillResult,
    StrategyConfig,
    VideoPrompt,
    VisualEmbeds,
    register,
)
from lvlm_fast.models.strategies.full import pooled_video_embeds, stream_prefill, streams

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class UniformConfig(StrategyConfig):
    num_frames: int = 32  # frames kept (LLaVA-OneVision's video evaluation default)

    def __post_init__(self) -> None:
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {self.num_frames!r}")


def uniform_index(num_frames: int, count: int, device: torch.device | str) -> torch.Tensor:
    """int64 (count,) frame numbers ``round(linspace(0, num_frames - 1, count))``."""
    return torch.linspace(0, num_frames - 1, count, dtype=torch.float64,
                          device=device).round().long()


@register
class UniformStrategy(EmbeddingStrategy):
    """``num_frames`` uniformly spaced frames, all their pooled tokens + one newline."""

    name = "uniform"
    config_class = UniformConfig
    holds_all_patch_features = False

    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        return self._embeds(vlm, prompt, stream=False)

    def _embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt, stream: bool) -> VisualEmbeds:
        t = prompt.pixel_values.shape[0]
        if t <= self.config.num_frames:
            return pooled_video_embeds(vlm, prompt.pixel_values, fps=prompt.fps,
                                       stream=stream, times=prompt.frame_times)
        idx = uniform_index(t, self.config.num_frames, prompt.pixel_values.device)
        fps = None if prompt.fps is None else prompt.fps * self.config.num_frames / t
        times = None
        if prompt.frame_times is not None:  # the sampled frames' own times (host indices)
            times = [prompt.frame_times[i]
                     for i in uniform_index(t, self.config.num_frames, "cpu").tolist()]
        return pooled_video_embeds(vlm, prompt.pixel_values, idx, fps=fps, stream=stream,
                                   times=times)

    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        if not streams(vlm):
            return super().prefill(vlm, prompt)
        # DeepStack rows: streamed, as in ``full``
        return stream_prefill(vlm, prompt, self._embeds(vlm, prompt, stream=True))
