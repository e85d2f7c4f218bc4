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

Other families (through :mod:`lvlm_fast.models.families`): "frame" is the family's temporal
unit (Qwen2.5-VL: a temporal patch of 2 frames; ``T`` = units), ``input_grid="pooled"``
is the family's token grid and ``"patch"`` its feature grid (both the merged grid on
Qwen2.5-VL), the end token is the family's (none on Qwen2.5-VL), and ``separator=True``
needs a family with a separator vector (ValueError otherwise). Positions on a family with
grid positions (M-RoPE), *pooled grid positions*: a slow unit's tokens are an
``(h/k0) x (w/k1)`` grid at that unit's time, each token at its own row/column of the
pooled grid (0 .. h/k0-1, 0 .. w/k1-1); a unit's fast tokens are an ``fh x fw`` grid at its
time (rows 0 .. fh-1, columns 0 .. fw-1); separators and the end token are 1 x 1 at the
unit they follow (the slow stream's separator at unit 0).

Qwen3-VL: every run of a unit's tokens is framed as a frame with the unit's timestamp
(``order="slow_fast"``: a slow unit's grid in the slow stream and its fast grid later in
the fast stream each carry that unit's timestamp; ``"interleaved"``: one frame per unit
holding its slow then fast grid); units in neither stream lose their timestamp. Each grid
is positioned at the running position like an image. DeepStack: the pooling (average,
and the slow stream's max, per channel over the same windows) acts on every level alike.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    StrategyConfig,
    VideoPrompt,
    VisualEmbeds,
    register,
)
from lvlm_fast.models.strategies.full import end_blocks
from lvlm_fast.models.strategies.stream import check_kv_budget
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
    # hard KV cap (issue 12): rows per layer; None = off. Set: the visual tokens are
    # streamed through the budgeted cache (strategies/stream.py, composed_prefill)
    kv_budget: int | None = None

    def __post_init__(self) -> None:
        check_kv_budget(self.kv_budget)
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

    def grid_and_kernels(self, vlm: LongVideoVLM, frame_hw: tuple[int, int] | None = None
                         ) -> tuple[int, int, SlowFastConfig]:
        """(h, w) of the pooled input grid and the resolved config with the fast grid
        clamped to it. ``frame_hw``: the frames' size (needed by families without a
        fixed frame size, e.g. Qwen2.5-VL)."""
        cfg: SlowFastStrategyConfig = self.config
        fam = vlm.family
        h, w = fam.token_grid(frame_hw) if cfg.input_grid == "pooled" else \
            fam.feature_grid(frame_hw)
        sf = cfg.resolved()
        fast = (min(sf.fast_grid[0], h), min(sf.fast_grid[1], w))
        if h % sf.slow_kernel[0] or w % sf.slow_kernel[1]:
            raise ValueError(f"slow_kernel {sf.slow_kernel} must divide the {cfg.input_grid} "
                             f"grid {h}x{w} of this model (pick e.g. input_grid="
                             "'pooled' or a kernel that divides the grid)")
        return h, w, SlowFastConfig(**{**sf.__dict__, "fast_grid": fast})

    def _end(self, vlm: LongVideoVLM) -> int:
        return vlm.family.num_end_tokens() if self.config.newline else 0

    def num_tokens(self, vlm: LongVideoVLM, t: int,
                   frame_hw: tuple[int, int] | None = None) -> int:
        """Visual tokens for a video of T units (frames on LLaVA-OneVision), end token
        included."""
        h, w, sf = self.grid_and_kernels(vlm, frame_hw)
        ns = len(self.config.slow_frames(t))
        return _num_tokens(t, ns, h, w, sf.slow_kernel, sf.fast_grid, sf.fast_frames,
                           sf.order, self.config.separator) + self._end(vlm)

    def blocks(self, vlm: LongVideoVLM, t: int, frame_hw: tuple[int, int],
               fps: float | None, num_frames: int | None = None,
               times: list[float] | None = None) -> TokenBlocks:
        """Where each token sits (module doc), in the op's output order."""
        cfg: SlowFastStrategyConfig = self.config
        h, w, sf = self.grid_and_kernels(vlm, frame_hw)
        slow = cfg.slow_frames(t)
        is_slow = set(slow)
        fast = [u for u in range(t) if sf.fast_frames == "all" or u not in is_slow]
        sh, sw = h // sf.slow_kernel[0], w // sf.slow_kernel[1]
        fh, fw = sf.fast_grid
        rows: list[tuple[int, int, int]] = []
        if sf.order == "slow_fast":
            rows += [(u, sh, sw) for u in slow]
            rows += [(0, 1, 1)] if cfg.separator else []
            rows += [(u, fh, fw) for u in fast]
        else:
            fast_set = set(fast)
            for u in range(t):
                rows += [(u, sh, sw)] if u in is_slow else []
                rows += [(u, fh, fw)] if u in fast_set else []
                rows += [(u, 1, 1)] if cfg.separator else []
        t_, h_, w_ = ([r[i] for r in rows] for i in range(3))
        out = TokenBlocks.from_host(t_, h_, w_, device=vlm.device, frame_hw=frame_hw, fps=fps,
                                    num_frames=num_frames, times=times)
        return end_blocks(vlm, out, t - 1) if cfg.newline else out

    @torch.no_grad()
    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        cfg: SlowFastStrategyConfig = self.config
        pv = prompt.pixel_values
        frame_hw = (pv.shape[-2], pv.shape[-1])
        t = vlm.family.units(pv.shape[0])
        h, w, sf = self.grid_and_kernels(vlm, frame_hw)
        d = vlm.feature_size  # DeepStack levels (if any) pooled with the main channels
        slow = cfg.slow_frames(t)
        s_tok = (h // sf.slow_kernel[0]) * (w // sf.slow_kernel[1])
        total = self.num_tokens(vlm, t, frame_hw)
        out = torch.empty((total, d), dtype=vlm.dtype, device=vlm.device)
        sep = None
        if cfg.separator:
            sep = vlm.family.separator()
            if sep is None:
                raise ValueError(f"separator=True needs a separator token, the "
                                 f"{vlm.family.name} family has none")
            sep = sep.to(vlm.dtype)
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
        if self._end(vlm):
            out[total - self._end(vlm):] = vlm.family.end_tokens().to(vlm.dtype)
        blocks = self.blocks(vlm, t, frame_hw, prompt.fps, pv.shape[0], prompt.frame_times) \
            if vlm.family.needs_blocks() else None
        return VisualEmbeds(out.unsqueeze(0), pv.shape[0], blocks)
