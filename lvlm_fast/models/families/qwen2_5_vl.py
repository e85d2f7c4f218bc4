"""Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration`` (M-RoPE decoder, windowed ViT).

Vision. Frames are ``(T, 3, H, W)`` with H and W multiples of ``patch_size *
spatial_merge_size`` (28), normalised. One temporal unit = one temporal patch =
``temporal_patch_size`` (2) consecutive frames, merged by the 3-D patch embedding; a video
with an odd frame count has its last frame repeated (the video processor's rule). A chunk of
frames is flattened exactly like the processor's ``patchify`` and sent through the vision
tower with ``grid_thw = (units, H/14, W/14)``. Running the tower one chunk of temporal
patches at a time is exact: its full-attention blocks (``fullatt_block_indexes``) attend
within one temporal patch (``cu_seqlens`` has one segment per temporal patch) and its other
blocks within a ``window_size`` window of one temporal patch, so no attention crosses
temporal patches (tested against ``get_video_features`` on every frame at once). Output:
the merger's tokens on the merged grid ``(units, H/28, W/28, D)``; :meth:`pool` is the
identity (the merger already merged 2x2).

Layout. No newline or separator tokens. The prompt's text is split around the video
placeholder: the prefix ends with ``<|vision_start|>``, the question starts with
``<|vision_end|>`` (what the chat template renders around ``<|video_pad|>``).

Positions (M-RoPE, ``(3, 1, L)``: temporal, height, width), transformers'
``get_rope_index`` for one video:

* text before the video: ``0 .. P-1`` on all three axes;
* a visual token of temporal unit ``u`` at row ``y``, column ``x`` of its block:
  ``(P + floor(u * interval), P + y, P + x)`` with ``interval = tokens_per_second *
  second_per_grid`` (float32, as transformers computes it), ``second_per_grid =
  temporal_patch_size / fps`` (``VideoPrompt.fps``; None gives 1.0, transformers' default
  when the processor passes no ``second_per_grid_ts``);
* text after the video starts at ``P + max(h, w)`` of the video's merged grid (transformers'
  rule, also for reduced strategies: the question sits where it would after the full
  video) and counts up by one;
* generated tokens continue at ``max(all prompt positions) + 1`` (transformers'
  ``rope_deltas``).

Reduced strategies describe their tokens as :class:`TokenBlocks`; each block is positioned
like a small grid at its unit (see :mod:`lvlm_fast.models.strategies` docstrings).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lvlm_fast.models.families.base import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_FRAMES,
    ModelFamily,
    PositionPlan,
    TextRunPlan,
    TokenBlocks,
    _check_sampling_args,
    register_family,
    sampled_fps,
)

# Qwen2.5-VL video processor defaults (transformers Qwen2VLVideoProcessor).
_MIN_PIXELS = 128 * 28 * 28
_MAX_PIXELS = 768 * 28 * 28
# Nominal frame size used to size vision chunks before any video is seen (the profile's
# 448x448 input).
NOMINAL_FRAME = 448


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = _MIN_PIXELS,
                 max_pixels: int = _MAX_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's resize rule: multiples of ``factor``, area within [min, max] pixels,
    aspect ratio kept as closely as possible (transformers ``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class MRopePlan(PositionPlan):
    """Qwen2.5-VL positions of ``[prefix (P) ; visual (N) ; question (Q)]`` (module doc)."""

    def __init__(self, prefix: int, blocks: TokenBlocks | None, num_visual: int,
                 question: int, extent: int, interval: torch.Tensor,
                 device: torch.device) -> None:
        self.p, self.n, self.q = prefix, num_visual, question
        self.total = prefix + num_visual + question
        self.blocks = blocks.to(device) if blocks is not None else None
        self.interval = interval
        self.device = device
        self.text_start = prefix + (extent if num_visual else 0)
        last = torch.tensor(self.text_start + question - 1, dtype=torch.int64, device=device)
        if num_visual:  # the temporal axis may run past the text (transformers' rule)
            t_max = self._t(self.blocks.t.max().view(1))[0]
            last = torch.maximum(last, t_max)
        self.next_pos = last + 1  # device scalar: no host read of selected units

    def _t(self, units: torch.Tensor) -> torch.Tensor:
        return (units.to(torch.float32) * self.interval).long() + self.p

    def chunk(self, lo: int, hi: int) -> torch.Tensor:
        parts = []
        a, b = max(lo, 0), min(hi, self.p)
        if a < b:
            parts.append(torch.arange(a, b, device=self.device).view(1, -1).expand(3, -1))
        a, b = max(lo - self.p, 0), min(hi - self.p, self.n)
        if a < b:
            u, y, x = self.blocks.coords(a, b)
            parts.append(torch.stack([self._t(u), y + self.p, x + self.p]))
        a, b = max(lo - self.p - self.n, 0), min(hi - self.p - self.n, self.q)
        if a < b:
            parts.append((torch.arange(a, b, device=self.device) + self.text_start)
                         .view(1, -1).expand(3, -1))
        pos = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return pos.view(3, 1, -1)

    def decode(self, step: int) -> torch.Tensor:
        return (self.next_pos + step).view(1, 1, 1).expand(3, 1, 1)

    def stream_chunk(self, lo: int, hi: int, slot: int) -> torch.Tensor:
        """The ``stream`` rule (bounded): temporal id = cache slot, height/width =
        :meth:`chunk`'s (``P + y``, ``P + x`` of the token's block; text: its index)."""
        if not 0 <= lo <= hi <= self.p + self.n:
            raise ValueError(f"stream_chunk covers the prefix and visual tokens "
                             f"[0, {self.p + self.n}), got [{lo}, {hi})")
        pos = self.chunk(lo, hi).clone()
        pos[0, 0] = torch.arange(slot, slot + hi - lo, device=self.device)
        return pos

    def stream_tail(self, length: int) -> PositionPlan:
        """Question at ``max(length, P + max(h, w))`` on all axes: after every cached row's
        temporal id (< ``length``) and every spatial id (< ``P + max(h, w)``), as
        :meth:`chunk` puts text after the video."""
        return TextRunPlan(max(length, self.text_start), self.q, self.device)


@register_family
class Qwen25VLFamily(ModelFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    class_names = ("Qwen2_5_VLForConditionalGeneration",)
    # the video processor's defaults (a subclass family sets its processor's)
    mean_std = (CLIP_MEAN, CLIP_STD)
    min_max_pixels = (_MIN_PIXELS, _MAX_PIXELS)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        vc = self.config.vision_config
        self.patch = vc.patch_size
        self.merge = vc.spatial_merge_size
        self.tps = vc.temporal_patch_size
        rope = getattr(self.text_config, "rope_parameters", None) or \
            getattr(self.text_config, "rope_scaling", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ValueError(f"Qwen2.5-VL with rope_type {kind!r} is not supported (only the "
                             "default M-RoPE: positions would be silently wrong)")

    @property
    def frames_per_unit(self) -> int:  # type: ignore[override]
        return self.tps

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    # ------------------------------------------------------------------ vision
    @property
    def factor(self) -> int:
        return self.patch * self.merge

    def check_pixels(self, pixel_values: Any) -> None:
        f = self.factor
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or pixel_values.shape[1] != 3 or pixel_values.shape[2] % f \
                or pixel_values.shape[3] % f or pixel_values.shape[2] < f \
                or pixel_values.shape[3] < f:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) \
                else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be (T, 3, H, W) with H and W positive "
                             f"multiples of {f} (patch_size x spatial_merge_size; resize "
                             f"with the family's frame_size), got {got}")
        if pixel_values.shape[0] < 1:
            raise ValueError("pixel_values holds no frames (T = 0)")

    def feature_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return frame_hw[0] // self.factor, frame_hw[1] // self.factor

    def token_grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        return self.feature_grid(frame_hw)

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, 3, H, W) -> the processor's flat patches (t*gh*gw, 3*tps*p*p) and
        ``grid_thw`` (1, 3); the last frame repeated to fill the last temporal patch."""
        if pad := -frames.shape[0] % self.tps:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        f, c, hh, ww = frames.shape
        t, gh, gw, m, p = f // self.tps, hh // self.patch, ww // self.patch, self.merge, \
            self.patch
        x = frames.reshape(t, self.tps, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, c * self.tps * p * p)
        return x, torch.tensor([[t, gh, gw]], dtype=torch.int64)

    def _meta_vision_kwargs(self, thw: torch.Tensor) -> dict[str, Any]:
        """On the meta device (the profiler's simulation): the vision tower's host-side
        metadata (window order, cu_seqlens, rotary positions) precomputed from the CPU
        ``grid_thw`` with transformers' own helpers (they read values with ``.tolist()``,
        impossible on meta); the index tensors then go to meta, the segment lengths stay
        on the host where the SDPA path splits by them."""
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        vc = self.config.vision_config
        cu, mx = get_vision_attention_seqlens(thw, vc)
        wi, cuw = get_vision_window_index(thw, spatial_merge_size=self.merge,
                                          window_size=vc.window_size, patch_size=self.patch)
        return dict(position_ids=get_vision_position_ids(thw, self.merge).to("meta"),
                    window_index=wi.to("meta"), cu_window_seqlens=cuw, cu_seqlens=cu,
                    max_seqlen=mx,
                    max_window_seqlen=get_max_seqlen(cuw, vc, kwarg_name="max_window_seqlen"))

    def _merged_grid(self, feats: torch.Tensor, thw: torch.Tensor) -> torch.Tensor:
        """(t * gh/m * gw/m, C) merged-token features -> (t, gh/m, gw/m, C) by the grid
        ``thw`` (1, 3) of the patchified video."""
        t, gh, gw = (int(v) for v in thw[0])
        return feats.view(t, gh // self.merge, gw // self.merge, feats.shape[-1])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        w = self.model.lm_head.weight
        visual = self.model.model.visual
        flat, thw = self.patchify(frames.to(device=w.device, non_blocking=True))
        flat = flat.to(visual.dtype)
        if w.device.type == "meta":
            out = visual(flat, grid_thw=thw, **self._meta_vision_kwargs(thw))
        else:
            out = visual(flat, grid_thw=thw.to(w.device))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return self._merged_grid(feats.to(w.dtype), thw)

    def encode_all_at_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' path: the processor's patches of every frame, then
        ``get_video_features`` in one call."""
        w = self.model.lm_head.weight
        flat, thw = self.patchify(pixel_values.to(device=w.device))
        kw = self._meta_vision_kwargs(thw) if w.device.type == "meta" else {}
        feats = self.model.model.get_video_features(
            flat, thw if kw else thw.to(w.device), **kw).pooler_output[0]
        return self._merged_grid(feats.to(w.dtype), thw)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def vision_bytes_per_frame(self) -> int:
        """At the nominal 448x448 frame: one block's activations (MLP included), a full
        block's fp32 scores over one temporal patch as a worst case, merger and pixels,
        per frame (a temporal patch holds ``temporal_patch_size`` frames)."""
        vc = self.config.vision_config
        item = self.model.lm_head.weight.dtype.itemsize
        n = (NOMINAL_FRAME // self.patch) ** 2  # patches per temporal patch
        acts = n * (6 * vc.hidden_size + 3 * vc.intermediate_size) * item
        # CUDA with SDPA: a flash / memory-efficient kernel, no score matrix (issue 14.2.5)
        flash = self.model.lm_head.weight.device.type == "cuda" \
            and getattr(vc, "_attn_implementation", None) != "eager"
        scores = 0 if flash else vc.num_heads * n * n * 4
        merger = n * 2 * vc.hidden_size * item + n // self.merge ** 2 * vc.out_hidden_size * item
        pixels = 3 * NOMINAL_FRAME ** 2 * item * self.tps
        return int((acts + scores + merger + pixels) // self.tps) + 1

    # ------------------------------------------------------------------ layout
    def end_tokens(self) -> torch.Tensor:
        w = self.model.lm_head.weight
        return w.new_empty((0, self.text_config.hidden_size))

    def num_end_tokens(self) -> int:
        return 0

    # ------------------------------------------------------------------ positions
    def needs_blocks(self) -> bool:
        return True

    def interval(self, fps: float | None) -> torch.Tensor:
        """float32 temporal position step per unit (module doc)."""
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                                or not math.isfinite(fps) or fps <= 0):
            raise ValueError(f"fps must be a positive finite float or None, got {fps!r}")
        spg = torch.tensor(1.0 if fps is None else self.tps / fps, dtype=torch.float32)
        return self.config.vision_config.tokens_per_second * spg

    def position_plan(self, prefix: int, blocks: TokenBlocks | None, num_visual: int,
                      question: int) -> PositionPlan:
        if num_visual and (blocks is None or blocks.frame_hw is None):
            raise ValueError("the qwen2_5_vl family needs the visual tokens' TokenBlocks with "
                             "the frame size for its M-RoPE positions (the strategy must "
                             "return them)")
        extent = max(self.token_grid(blocks.frame_hw)) if num_visual else 0
        fps = blocks.fps if blocks is not None else None
        dev = self.model.lm_head.weight.device
        return MRopePlan(prefix, blocks, num_visual, question, extent,
                         self.interval(fps).to(dev), dev)

    # ------------------------------------------------------------------ preprocessing
    def frame_size(self, height: int, width: int, preprocessing: dict[str, Any]
                   ) -> tuple[int, int]:
        size = preprocessing.get("size") or {}
        lo0, hi0 = self.min_max_pixels
        lo = preprocessing.get("min_pixels") or size.get("shortest_edge") or lo0
        hi = preprocessing.get("max_pixels") or size.get("longest_edge") or hi0
        return smart_resize(height, width, self.factor, lo, hi)

    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean_std

    def video_text(self) -> str:
        return "<|vision_start|>{video}<|vision_end|>"

    @classmethod
    def sample_indices(cls, total_frames: int, video_fps: float | None,
                       frames: int | None = None, fps: float | None = None,
                       pre: dict[str, Any] | None = None) -> tuple[list[int], float | None]:
        """transformers' ``Qwen2VLVideoProcessor.sample_frames`` (Qwen2.5-VL's processor),
        with ``temporal_patch_size`` (2), ``min_frames`` (4) and ``max_frames`` (768) from
        the checkpoint's preprocessing config ``pre`` where it has them:

        * ``frames=N``: ``n = round(N / tps) * tps`` (Python's round: 5 -> 4, 7 -> 8);
        * ``fps=F``: ``n = total / video_fps * F`` clamped to ``[min_frames, min(max_frames,
          total) floored to a multiple of tps]`` and to ``total``, then floored to a
          multiple of tps (a video shorter than min_frames gives all its frames, floored);
        * indices ``torch.arange(0, total, total / n).int()`` (floor of evenly spaced
          positions from frame 0), rate ``len(indices) / duration`` (the processor's
          ``VideoMetadata.sampled_fps``, whose ``tps / rate`` is ``second_per_grid_ts``);
        * neither: every frame of a video of at most :data:`DEFAULT_FRAMES` frames (the
          processor without sampling), else ``n = DEFAULT_FRAMES`` as above.

        ValueError (naming the argument) where the processor fails: n = 0 (``frames=1``,
        or a video shorter than one temporal patch with ``fps``), n > total frames, or
        ``fps`` without the video's rate."""
        total = _check_sampling_args(total_frames, video_fps, frames, fps)
        pre = pre or {}
        tps = int(pre.get("temporal_patch_size") or 2)
        min_frames = pre.get("min_frames", 4)
        max_frames = pre.get("max_frames", 768)
        if frames is not None:
            n = round(frames / tps) * tps
            if n < 1:
                raise ValueError(f"frames={frames} rounds to 0 frames (the processor rounds "
                                 f"frames to a multiple of temporal_patch_size={tps})")
        elif fps is not None:
            if not video_fps or video_fps <= 0:
                raise ValueError(f"fps={fps} needs the video's frame rate, which is unknown")
            cap = math.floor(min(max_frames, total) / tps) * tps
            n = min(max(total / video_fps * fps, min_frames), cap, total)
            n = math.floor(n / tps) * tps
            if n < 1:
                raise ValueError(f"fps={fps}: the video has {total} frames, fewer than one "
                                 f"temporal patch ({tps} frames)")
        elif total <= DEFAULT_FRAMES:
            indices = list(range(total))
            return indices, sampled_fps(indices, total, video_fps)
        else:
            n = DEFAULT_FRAMES
        if n > total:
            raise ValueError(f"frames={frames}: the processor samples {n} frames (a multiple "
                             f"of temporal_patch_size={tps}) but the video has {total}")
        indices = torch.arange(0, total, total / n).int().tolist()
        return indices, sampled_fps(indices, total, video_fps)
