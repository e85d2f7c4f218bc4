"""``slowfast``: SlowFast-LLaVA dual-stream pooling, streamed chunk by chunk.

Each vision chunk's ``(t, h, w, D)`` grid goes through the fused
:func:`lvlm_fast.ops.slowfast_pool` once; its slow and fast rows are copied to their places
in a preallocated output, so only one chunk's features are alive
(``holds_all_patch_features = False``). Held: the output ``(tokens + 1, D)`` and one chunk.

Default: the ``sf_llava`` preset (:meth:`lvlm_fast.ops.SlowFastConfig.sf_llava`, the
released v1 code: 10 slow frames at ``linspace(0, T, 11)[:-1]``, slow = 1-D pairwise max,
kernel (1, 2); every frame in the fast stream, 4x4 adaptive average; slow tokens first,
then fast) applied to LLaVA-OneVision's *pooled* grid (``input_grid="pooled"``: the model's
own 2x2 bilinear pooling, 27x27 -> 14x14, the per-frame tokens the model was trained on for
video). The raw 27x27 grid (``input_grid="patch"``) is odd, so neither released preset's
slow kernel divides it (pass e.g. ``slow_kernel=(3, 3)`` or ``(1, 3)``; a kernel that does
not divide the grid is a ValueError). A ``fast_grid`` larger than the input grid is clamped
to the grid (tiny test models have 2x2 pooled grids).

Tokens on LLaVA-OneVision-7B with the default: each slow frame 14 x 7 = 98, every frame 16
(fast), plus one ``image_newline`` at the end: ``min(10, T) * 98 + T * 16 + 1``.
``num_slow`` (or ``slow_stride``: frames 0, s, 2s, ...) overrides the slow count; the slow
frames are computed from T on the host (no device values involved), as the op's
``SlowFastConfig.slow_index`` does. ``separator=True`` puts the model's ``image_newline``
between the streams (order ``"slow_fast"``) or after every frame (``"interleaved"``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    StrategyConfig,
    VideoPrompt,
    register,
)
from lvlm_fast.models.strategies.vilamp import _check_choice, _check_int
from lvlm_fast.ops import SlowFastConfig, slowfast_pool
from lvlm_fast.ops.slowfast_pool import FAST_FRAMES, ORDERS, SLOW_MODES
from lvlm_fast.ops.slowfast_pool import num_tokens as _num_tokens

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM

PRESETS = {"sf_llava": SlowFastConfig.sf_llava, "sf_llava_1_5": SlowFastConfig.sf_llava_1_5}
INPUT_GRIDS = ("pooled", "patch")


def _check_pair(name: str, value: object) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be a pair of ints, got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name} must be >= (1, 1), got {tuple(value)}")
    return int(value[0]), int(value[1])


@dataclass
class SlowFastStrategyConfig(StrategyConfig):
    """``preset`` (``"sf_llava"`` or ``"sf_llava_1_5"``) plus optional overrides of its
    fields (None = the preset's value); ``input_grid`` ``"pooled"``/``"patch"``;
    ``separator``: the model's newline between streams / after frames; ``newline``: one
    ``image_newline`` after the video."""

    preset: str = "sf_llava"
    input_grid: str = "pooled"
    num_slow: int | None = None
    slow_stride: int | None = None
    slow_kernel: tuple[int, int] | None = None
    slow_mode: str | None = None
    fast_grid: tuple[int, int] | None = None
    fast_frames: str | None = None
    order: str | None = None
    separator: bool = False
    newline: bool = True

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("input_grid", self.input_grid, INPUT_GRIDS)
        if self.num_slow is not None:
            _check_int("num_slow", self.num_slow, 0)
        if self.slow_stride is not None:
            _check_int("slow_stride", self.slow_stride, 1)
            if self.num_slow is not None:
                raise ValueError("give num_slow or slow_stride, not both")
        if self.slow_kernel is not None:
            self.slow_kernel = _check_pair("slow_kernel", self.slow_kernel)
        if self.fast_grid is not None:
            self.fast_grid = _check_pair("fast_grid", self.fast_grid)
        if self.slow_mode is not None:
            _check_choice("slow_mode", self.slow_mode, SLOW_MODES)
        if self.fast_frames is not None:
            _check_choice("fast_frames", self.fast_frames, FAST_FRAMES)
        if self.order is not None:
            _check_choice("order", self.order, ORDERS)

    def resolved(self) -> SlowFastConfig:
        """The preset with the overrides applied."""
        base = PRESETS[self.preset]()
        kw = {f: getattr(self, f) for f in ("num_slow", "slow_kernel", "slow_mode",
                                            "fast_grid", "fast_frames", "order")
              if getattr(self, f) is not None}
        return SlowFastConfig(**{**base.__dict__, **kw})

    def slow_frames(self, t: int) -> list[int]:
        """Slow frame numbers for a T-frame video (host ints computed from T alone)."""
        if self.slow_stride is not None:
            return list(range(0, t, self.slow_stride))
        return self.resolved().slow_index(t).tolist()


@register
class SlowFast(EmbeddingStrategy):
    """SlowFast-LLaVA pooling per vision chunk (``holds_all_patch_features = False``)."""

    name = "slowfast"
    config_class = SlowFastStrategyConfig
    holds_all_patch_features = False

    def grid_and_kernels(self, vlm: LongVideoVLM) -> tuple[int, int, SlowFastConfig]:
        cfg: SlowFastStrategyConfig = self.config
        vc = vlm.config.vision_config
        side = vc.image_size // vc.patch_size
        if cfg.input_grid == "pooled":
            side = (side + 1) // 2
        sf = cfg.resolved()
        fast = (min(sf.fast_grid[0], side), min(sf.fast_grid[1], side))
        if side % sf.slow_kernel[0] or side % sf.slow_kernel[1]:
            raise ValueError(f"slow_kernel {sf.slow_kernel} must divide the {cfg.input_grid} "
                             f"grid {side}x{side} of this model (pick e.g. input_grid="
                             "'pooled' or a kernel that divides the grid)")
        return side, side, SlowFastConfig(**{**sf.__dict__, "fast_grid": fast})

    def num_tokens(self, vlm: LongVideoVLM, t: int) -> int:
        """Visual tokens for a T-frame video, newline included."""
        h, w, sf = self.grid_and_kernels(vlm)
        ns = len(self.config.slow_frames(t))
        return _num_tokens(t, ns, h, w, sf.slow_kernel, sf.fast_grid, sf.fast_frames,
                           sf.order, self.config.separator) + int(self.config.newline)

    @torch.no_grad()
    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        cfg: SlowFastStrategyConfig = self.config
        pv = prompt.pixel_values
        t = pv.shape[0]
        h, w, sf = self.grid_and_kernels(vlm)
        d = vlm.hidden_size
        slow = cfg.slow_frames(t)
        s_tok = (h // sf.slow_kernel[0]) * (w // sf.slow_kernel[1])
        total = self.num_tokens(vlm, t)
        out = torch.empty((total, d), dtype=vlm.dtype, device=vlm.device)
        sep = vlm.image_newline.to(vlm.dtype) if cfg.separator else None
        slow_fast = sf.order == "slow_fast"
        slow_row = 0
        fast_row = len(slow) * s_tok + (1 if slow_fast and sep is not None else 0)
        if slow_fast and sep is not None:
            out[fast_row - 1] = sep
        row = 0  # interleaved: chunks are contiguous
        # Slow frame numbers go to the device ONCE per call; each chunk takes a slice of them
        # (host bounds from the sorted host list) minus its start: a device op, where a
        # torch.tensor(list, device=cuda) per chunk would be a host->device copy every time.
        slow_dev = torch.tensor(slow, dtype=torch.int64, device=vlm.device)
        for s, feats in vlm.iter_patch_features(pv):
            n = feats.shape[0]
            grid = vlm.pool_2x2(feats) if cfg.input_grid == "pooled" else feats
            a, b = bisect.bisect_left(slow, s), bisect.bisect_left(slow, s + n)
            idx = slow_dev[a:b] - s  # strictly increasing (slow is), in [0, n)
            kw = dict(slow_index=idx, slow_kernel=sf.slow_kernel, slow_mode=sf.slow_mode,
                      fast_grid=sf.fast_grid, fast_frames=sf.fast_frames, order=sf.order)
            if slow_fast:
                tok = slowfast_pool(grid, **kw)
                ns = (b - a) * s_tok
                out[slow_row:slow_row + ns] = tok[:ns]
                out[fast_row:fast_row + tok.shape[0] - ns] = tok[ns:]
                slow_row += ns
                fast_row += tok.shape[0] - ns
            else:
                tok = slowfast_pool(grid, separator=sep, **kw)
                out[row:row + tok.shape[0]] = tok
                row += tok.shape[0]
            del feats, grid, tok
        if cfg.newline:
            out[-1] = vlm.image_newline.to(vlm.dtype)
        return out.unsqueeze(0), t
