"""Qwen3-VL: ``Qwen3VLForConditionalGeneration`` (interleaved M-RoPE, DeepStack, timestamps).

The class is split into three layers so that a successor with the same vision tower
(Qwen3.5) subclasses it and overrides only the LLM-side hooks:

* **Vision** (:meth:`Qwen3VLFamily.encode`): frames are patchified exactly like Qwen2.5-VL
  (``temporal_patch_size`` = 2 frames per temporal unit, last frame repeated for an odd
  count; :meth:`Qwen25VLFamily.patchify`), with ``patch_size`` 16, so frame sides are
  multiples of 32. The tower has no windows: every block attends within one temporal patch
  (``cu_seqlens`` has one segment per temporal patch) and its learned position embedding is
  interpolated per grid, so running it one chunk of temporal patches at a time is exact.
  **DeepStack**: the tower also returns ``len(deepstack_visual_indexes)`` (L) merged
  features from intermediate blocks, which transformers adds to the hidden states of the
  first L decoder layers at the visual positions. :meth:`encode` returns them stacked along
  the channel dim: ``(units, h, w, (1 + L) * D)`` = ``[main | level 0 | ... | level L-1]``.
  Every strategy reduces that tensor as a whole (the same selection, the same pooling
  weights for all levels; scores and similarities read only the first ``D`` channels,
  :attr:`ModelFamily.hidden_size`), and the wrapper splits the rows before the decoder
  (:meth:`decoder_kwargs`), chunk by chunk with the prefill.
* **Timestamps** (:meth:`visual_layout`): the prompt's video is one frame per temporal unit,
  each ``<{t:.1f} seconds><|vision_start|> [tokens] <|vision_end|>`` (the processor's
  ``replace_video_token``), ``t`` the mean time of the unit's first and last frame
  (``Qwen3VLProcessor._calculate_timestamps``: a frame's time is its source index over the
  source fps, :attr:`VideoPrompt.frame_times` carried as ``blocks.times`` and selected with
  the frames; without it frame ``i`` at ``i / fps``, ``fps`` None = 24, the processor's
  default). The strategy's :class:`TokenBlocks` say which unit each
  visual token belongs to; every maximal run of consecutive blocks of one unit is framed as
  one frame of the prompt with that unit's timestamp (or, where the strategy groups blocks
  into frames with ``blocks.frames``, each group with the timestamp of its first unit). So
  a kept unit keeps its own timestamp, a token that stands for a unit (a LLaMA-VID context
  token) is framed with that unit's timestamp, a run of tokens that stand for consecutive
  units (ViLAMP's DFM tokens between two keyframes) is framed once with its first unit's,
  and a dropped unit loses its timestamp with its tokens. Units are numbered in the
  strategy's frame sequence (``blocks.num_frames`` frames at ``blocks.fps``). The chat
  template's own ``<|vision_start|>`` / ``<|vision_end|>`` around the video stay in
  ``prefix_ids`` / ``question_ids``. The text is tokenized with the caller's ``text_ids``
  (:attr:`VideoPrompt.text_ids`). The kept units come from ``blocks.host`` when the strategy
  built its blocks on the host (``full``, ``uniform``, ``slowfast``, ``llamavid``,
  ``videoxl``: no device sync), else they are read to the host once per prefill (ViLAMP's
  device-side keyframes: the text, and so the sequence length, depends on which units are
  kept). On meta tensors (the profiler's simulation) a missing tokenizer is
  :func:`nominal_text_ids` and device-valued blocks are split nominally
  (:func:`nominal_blocks`): token counts exact, the assignment of rows to units nominal.
* **Positions** (:class:`SequentialPlan`): transformers' ``get_rope_index`` splits the video
  into one grid per frame with temporal index 0 and places everything in sequence: a text
  token at ``cur`` (all three axes) then ``cur += 1``; a visual block of ``h x w`` tokens at
  ``(cur, cur + y, cur + x)`` then ``cur += max(h, w)``. Every block a strategy emits is
  placed by that rule (a 1 x 1 DFM token takes one position on all axes), so reduced
  prompts are positioned exactly as transformers would position the reduced prompt.
  Generated tokens continue at ``cur`` after the question (= max + 1, ``rope_deltas``). The
  decoder interleaves the three axes across frequencies (``mrope_section`` [24, 20, 20],
  ``mrope_interleaved``), inside transformers' rotary embedding: the ids are the same
  ``(3, 1, L)`` layout as Qwen2.5-VL's. These ids grow with the video (``cur`` every unit);
  the budgeted ``stream`` rule (:meth:`SequentialPlan.stream_chunk`, defined in
  :mod:`lvlm_fast.models.strategies.stream`) bounds them instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import torch

from lvlm_fast.models.families.base import (
    HOLD_KWARG,
    PositionPlan,
    TextRunPlan,
    TokenBlocks,
    VisualLayout,
    register_family,
)
from lvlm_fast.models.families.qwen2_5_vl import Qwen25VLFamily

# Qwen3-VL video processor defaults (transformers Qwen3VLVideoProcessor).
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)
_MIN_PIXELS = 128 * 32 * 32
_MAX_PIXELS = 768 * 32 * 32
DEFAULT_FPS = 24.0  # the processor's fps when the video metadata has none
NOMINAL_FRAME = 448


def unit_seconds(unit: int, num_frames: int, fps: float | None, tps: int = 2,
                 times: list[float] | None = None) -> float:
    """Timestamp of temporal unit ``unit`` of a ``num_frames``-frame video sampled at
    ``fps`` (the processor's ``_calculate_timestamps``: the mean of the unit's first and
    last frame time; the last unit padded with the last frame). ``times``: each frame's
    seconds (else frame ``i`` at ``i / fps``)."""
    rate = DEFAULT_FPS if fps is None else float(fps)
    first = unit * tps
    last = min(first + tps - 1, max(num_frames - 1, 0))
    if times is not None:
        return (times[first] + times[last]) / 2
    return (first / rate + last / rate) / 2


def nominal_text_ids(text: str) -> list[int]:
    """A stand-in tokenizer for the meta-device simulation (no tokenizer there): the token
    count of Qwen's tokenizer on a timestamp (``<``, one token per digit or ``.``,
    `` seconds``, ``>``), ids 0. Real runs use the caller's tokenizer."""
    digits = sum(c.isdigit() or c == "." for c in text)
    return [0] * (digits + 3)


def nominal_blocks(num_blocks: int, num_visual: int
                   ) -> tuple[list[int], list[int], list[int]]:
    """Blocks whose values are device data on meta tensors (ViLAMP's keyframes): block i
    = unit i, the visual rows split as evenly as possible (1 x n blocks). Token counts (what
    the simulation measures) are exact; which unit holds which rows is nominal."""
    base, extra = divmod(num_visual, max(num_blocks, 1))
    sizes = [base + (i < extra) for i in range(num_blocks)]
    keep = [i for i in range(num_blocks) if sizes[i]]
    return keep, [1] * len(keep), [sizes[i] for i in keep]


class SequentialPlan(PositionPlan):
    """Qwen3-VL positions of ``[prefix ; layout ; question]`` (module doc): items in order,
    each a text run (``h = 0``: one position per token) or an ``h x w`` visual block at
    ``(cur, cur + y, cur + x)``. Item offsets and start positions are host ints."""

    def __init__(self, items: list[tuple[int, int, int]], device: torch.device,
                 prefix: int = 0, question: int = 0) -> None:
        # items: (tokens, h, w); h = 0 marks a text run of `tokens` tokens. prefix /
        # question: the leading / trailing text runs' lengths (the stream rule's base)
        self.items = items
        self.device = device
        self.prefix, self.question = prefix, question
        extent = max((max(h, w) for _, h, w in items if h), default=0)
        self.stream_text_start = prefix + extent  # the stream rule's question start floor
        self.offsets: list[int] = []
        self.starts: list[int] = []
        off = cur = 0
        for n, h, w in items:
            self.offsets.append(off)
            self.starts.append(cur)
            off += n
            cur += n if h == 0 else max(h, w)
        self.total = off
        self.next_pos = cur

    def chunk(self, lo: int, hi: int) -> torch.Tensor:
        parts = []
        i = max(bisect.bisect_right(self.offsets, lo) - 1, 0)
        while i < len(self.items) and self.offsets[i] < hi:
            n, h, w = self.items[i]
            a, b = max(lo - self.offsets[i], 0), min(hi - self.offsets[i], n)
            if a < b:
                cur = self.starts[i]
                idx = torch.arange(a, b, device=self.device)
                if h == 0:
                    parts.append((idx + cur).view(1, -1).expand(3, -1))
                else:
                    parts.append(torch.stack([torch.full_like(idx, cur), idx // w + cur,
                                              idx % w + cur]))
            i += 1
        pos = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return pos.view(3, 1, -1)

    def decode(self, step: int) -> torch.Tensor:
        return torch.full((3, 1, 1), self.next_pos + step, dtype=torch.int64,
                          device=self.device)

    def stream_chunk(self, lo: int, hi: int, slot: int) -> torch.Tensor:
        """The ``stream`` rule for this layout (bounded; one place:
        :mod:`lvlm_fast.models.strategies.stream`), for prompt tokens ``lo .. hi-1`` of
        ``[prefix ; layout]`` appended at cache slots ``slot ..``: a text row (prefix,
        timestamp, ``<|vision_start|>`` / ``<|vision_end|>``) gets its slot on all three
        axes; a visual row at ``(y, x)`` of its ``h x w`` block gets ``(slot, P + y,
        P + x)``. The temporal id is re-rotated to the row's slot by every compaction,
        the other two never move, so all ids stay below ``max(capacity, P + max(h, w))``."""
        if not 0 <= lo <= hi <= self.total - self.question:
            raise ValueError(f"stream_chunk covers the prefix and visual layout "
                             f"[0, {self.total - self.question}), got [{lo}, {hi})")
        parts = []
        s = slot
        i = max(bisect.bisect_right(self.offsets, lo) - 1, 0)
        while i < len(self.items) and self.offsets[i] < hi:
            n, h, w = self.items[i]
            a, b = max(lo - self.offsets[i], 0), min(hi - self.offsets[i], n)
            if a < b:
                t = torch.arange(s, s + b - a, device=self.device)
                if h == 0:
                    parts.append(t.view(1, -1).expand(3, -1))
                else:
                    idx = torch.arange(a, b, device=self.device)
                    parts.append(torch.stack([t, idx // w + self.prefix,
                                              idx % w + self.prefix]))
                s += b - a
            i += 1
        if not parts:
            return torch.zeros(3, 1, 0, dtype=torch.int64, device=self.device)
        pos = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return pos.reshape(3, 1, -1)

    def stream_tail(self, length: int) -> PositionPlan:
        """Question at ``max(length, P + max(h, w))`` on all axes (after every cached
        temporal id and every spatial id), the answer after it."""
        return TextRunPlan(max(length, self.stream_text_start), self.question, self.device)


@register_family
class Qwen3VLFamily(Qwen25VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    class_names = ("Qwen3VLForConditionalGeneration",)
    mean_std = (_MEAN, _STD)
    min_max_pixels = (_MIN_PIXELS, _MAX_PIXELS)

    @classmethod
    def model_class(cls) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    # ------------------------------------------------------------------ vision (+ DeepStack)
    def deepstack_levels(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def _stack(self, main: torch.Tensor, levels: list[torch.Tensor] | None) -> torch.Tensor:
        """(n, D) main + L x (n, D) DeepStack -> (n, (1 + L) * D), the strategies' rows."""
        if not self.deepstack_levels():
            return main
        return torch.cat([main, *levels], dim=-1)

    def _meta_vision_kwargs(self, thw: torch.Tensor) -> dict[str, Any]:
        """On the meta device (the profiler's simulation): the tower's host-side metadata
        (position-embedding interpolation taps, rotary positions, cu_seqlens) precomputed
        from the CPU ``grid_thw`` with transformers' own helpers (they read values, which
        meta tensors do not have); index tensors go to meta, segment lengths stay on the
        host."""
        from transformers.vision_utils import (
            get_vision_attention_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        visual = self.model.model.visual
        idx, wts = get_vision_interpolation_indices_and_weights(
            thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.merge)
        cu, mx = get_vision_attention_seqlens(thw, self.config.vision_config)
        return dict(interp_indices=idx.to("meta"), interp_weights=wts.to("meta"),
                    position_ids=get_vision_position_ids(thw, self.merge).to("meta"),
                    cu_seqlens=cu, max_seqlen=mx)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        w = self.model.lm_head.weight
        visual = self.model.model.visual
        flat, thw = self.patchify(frames.to(device=w.device, non_blocking=True))
        kw = self._meta_vision_kwargs(thw) if w.device.type == "meta" else {}
        out = visual(flat.to(visual.dtype), grid_thw=thw if kw else thw.to(w.device),
                     return_dict=True, **kw)
        feats = self._stack(out.pooler_output, getattr(out, "deepstack_features", None))
        return self._merged_grid(feats.to(w.dtype), thw)

    def encode_all_at_once(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """transformers' path: the processor's patches of every frame, then
        ``get_video_features`` in one call (main + DeepStack levels, stacked)."""
        w = self.model.lm_head.weight
        flat, thw = self.patchify(pixel_values.to(device=w.device))
        kw = self._meta_vision_kwargs(thw) if w.device.type == "meta" else {}
        out = self.model.model.get_video_features(flat, thw if kw else thw.to(w.device),
                                                  return_dict=True, **kw)
        ds = [lv[0] for lv in out.deepstack_features] if self.deepstack_levels() else None
        feats = self._stack(out.pooler_output[0], ds)
        return self._merged_grid(feats.to(w.dtype), thw)

    def vision_bytes_per_frame(self) -> int:
        """At the nominal 448x448 frame: one block's activations (MLP included), the fp32
        scores of one temporal patch as a worst case (none on CUDA with a flash /
        memory-efficient SDPA kernel, as Qwen2.5-VL's), mergers (main + DeepStack) and
        pixels, per frame."""
        vc = self.config.vision_config
        item = self.model.lm_head.weight.dtype.itemsize
        n = (NOMINAL_FRAME // self.patch) ** 2
        acts = n * (6 * vc.hidden_size + 3 * vc.intermediate_size) * item
        # CUDA with SDPA: a flash / memory-efficient kernel, no score matrix (issue 14.2.5)
        flash = self.model.lm_head.weight.device.type == "cuda" \
            and getattr(vc, "_attn_implementation", None) != "eager"
        scores = 0 if flash else vc.num_heads * n * n * 4
        merged = n // self.merge ** 2 * vc.out_hidden_size * item * (1 + self.deepstack_levels())
        merger = n * 2 * vc.hidden_size * item + merged
        pixels = 3 * NOMINAL_FRAME ** 2 * item * self.tps
        return int((acts + scores + merger + pixels) // self.tps) + 1

    def end_tokens(self) -> torch.Tensor:
        w = self.model.lm_head.weight
        return w.new_empty((0, self.feature_size()))

    # ------------------------------------------------------------------ LLM hooks
    def decoder_kwargs(self, visual_mask: torch.Tensor, extra: torch.Tensor
                       ) -> dict[str, Any]:
        """DeepStack rows of one prefill chunk -> the decoder's ``visual_pos_masks`` (1, L)
        and ``deepstack_visual_embeds`` (L levels of (n_visual_in_chunk, D))."""
        if not self.deepstack_levels() or extra.shape[0] == 0:
            return {}
        if extra.device.type == "meta":
            # transformers adds the rows with boolean indexing (nonzero), which has no
            # meta implementation: the simulation holds the rows for the decoder call (as
            # the real kwargs do, HOLD_KWARG) but skips the in-place add (a transient copy
            # of the chunk's hidden states per DeepStack layer, below the MLP's peak)
            return {HOLD_KWARG: extra}
        d = self.hidden_size
        rows = extra.reshape(extra.shape[0], self.deepstack_levels(), d)
        return {"visual_pos_masks": visual_mask,
                "deepstack_visual_embeds": list(rows.unbind(1))}

    # ------------------------------------------------------------------ timestamps / layout
    def unit_text(self, seconds: float, text_ids: Callable[[str], list[int]]
                  ) -> tuple[list[int], list[int]]:
        """Text ids before and after one frame's tokens (the processor's placeholder)."""
        before = list(text_ids(f"<{seconds:.1f} seconds>"))
        return [*before, self.config.vision_start_token_id], [self.config.vision_end_token_id]

    def visual_layout(self, blocks: TokenBlocks | None, num_visual: int, *,
                      text_ids: Callable[[str], list[int]] | None) -> VisualLayout | None:
        if not num_visual:
            return VisualLayout([], [], 0)
        if blocks is None or blocks.frame_hw is None:
            raise ValueError(f"the {self.name} family needs the visual tokens' TokenBlocks "
                             "with the frame size (the strategy must return them)")
        meta = blocks.t.device.type == "meta"
        if text_ids is None:
            if not meta:
                raise ValueError(f"the {self.name} family frames each temporal unit with "
                                 "timestamp text: pass the tokenizer as prompt.text_ids "
                                 "(text -> ids, no special tokens)")
            text_ids = nominal_text_ids
        grp = None
        if blocks.host is not None:  # built from host values: no device read
            t, h, w = blocks.host
            if blocks.frames is not None and blocks.frames.device.type != "meta":
                grp = blocks.frames.tolist()
        elif meta:  # device selections on meta (the profiler): nominal split, exact count
            t, h, w = nominal_blocks(blocks.num_blocks, num_visual)
        else:
            rows = [blocks.t, blocks.h, blocks.w]
            if blocks.frames is not None:
                rows.append(blocks.frames.to(blocks.t.device))
            vals = torch.stack(rows).tolist()  # one host read
            t, h, w = vals[:3]
            grp = vals[3] if len(vals) > 3 else None
        if grp is None:  # one frame per maximal run of blocks of one unit
            grp = t
        # frames of the sequence the units number (unknown: every unit full)
        nf = blocks.num_frames if blocks.num_frames is not None else (max(t) + 1) * self.tps
        if blocks.times is not None:
            nf = len(blocks.times)
        pieces: list[Any] = []
        items: list[tuple[int, int, int]] = []
        row = i = 0
        while i < len(t):
            j = i
            while j < len(t) and grp[j] == grp[i]:
                j += 1
            before, after = self.unit_text(
                unit_seconds(t[i], nf, blocks.fps, self.tps, blocks.times), text_ids)
            pieces.append(torch.tensor(before, dtype=torch.int64))
            items.append((len(before), 0, 0))
            size = sum(h[k] * w[k] for k in range(i, j))
            pieces.append((row, row + size))
            items.extend((h[k] * w[k], h[k], w[k]) for k in range(i, j))
            row += size
            pieces.append(torch.tensor(after, dtype=torch.int64))
            items.append((len(after), 0, 0))
            i = j
        if row != num_visual:
            raise ValueError(f"the TokenBlocks cover {row} visual tokens, the visual segment "
                             f"has {num_visual}")
        return VisualLayout(pieces, items, sum(n for n, _, _ in items))

    def position_plan(self, prefix: int, blocks: TokenBlocks | None, num_visual: int,
                      question: int, layout: VisualLayout | None = None) -> PositionPlan:
        if num_visual and layout is None:
            raise ValueError(f"the {self.name} family positions need the prompt's "
                             "VisualLayout (visual_layout)")
        items = [(prefix, 0, 0)] + (list(layout.items) if layout is not None else []) \
            + [(question, 0, 0)]
        return SequentialPlan([it for it in items if it[0]], self.model.lm_head.weight.device,
                              prefix, question)

    # ------------------------------------------------------------------ preprocessing
    # frame_size / default_normalization: inherited, with this processor's defaults

    @classmethod
    def sample_indices(cls, total_frames: int, video_fps: float | None,
                       frames: int | None = None, fps: float | None = None,
                       pre: dict[str, Any] | None = None) -> tuple[list[int], float | None]:
        """transformers' ``Qwen3VLVideoProcessor.sample_frames`` (also Qwen3.5's), which
        differs from Qwen2.5-VL's: no rounding to the temporal patch (an odd count pads its
        last temporal patch, as :meth:`units` says), ``min_frames`` (4) / ``max_frames``
        (768) from the preprocessing config ``pre`` where it has them:

        * ``frames=N``: N frames, also more than the video has (frames repeat);
        * ``fps=F``: ``n = int(total / video_fps * F)`` (video_fps unknown: 24, the
          processor's default) clamped to ``[min_frames, max_frames]`` and to ``total``;
        * indices ``round(linspace(0, total - 1, n))``, rate ``len(indices) / duration``
          (the frames' timestamps are ``index / video_fps``: :attr:`VideoPrompt.frame_times`);
        * neither: the package default (:data:`DEFAULT_FRAMES` uniform frames, or every
          frame of a shorter video), through the same index rule."""
        import numpy as np

        from lvlm_fast.models.families import base

        total = base._check_sampling_args(total_frames, video_fps, frames, fps)
        pre = pre or {}
        rate = float(video_fps) if video_fps and video_fps > 0 else DEFAULT_FPS
        if frames is not None:
            n = frames
        elif fps is not None:
            n = int(total / rate * fps)
            n = min(max(n, pre.get("min_frames", 4)), pre.get("max_frames", 768), total)
        else:
            n = min(base.DEFAULT_FRAMES, total)
        indices = np.linspace(0, total - 1, n).round().astype(int).tolist()
        return indices, base.sampled_fps(indices, total, rate)


__all__ = ["DEFAULT_FPS", "Qwen3VLFamily", "SequentialPlan", "unit_seconds"]
