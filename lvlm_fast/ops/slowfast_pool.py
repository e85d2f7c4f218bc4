"""``slowfast_pool``: SlowFast-LLaVA's dual-stream token pooling as one fused op.

Spec: :mod:`lvlm_fast.reference.slowfast_pool`. Every frame's features are read once; a
slow frame's slow tokens and fast tokens come from the same read. Layers: C++
``csrc/slowfast_pool.cpp`` (CPU) and Triton ``kernels/slowfast_pool.py`` (CUDA) implement
``torch.ops.lvlm_fast.slowfast_pool`` and ``slowfast_pool_backward``; this module owns the
schema, validation, fake kernels, autograd and the :class:`SlowFastConfig` presets.

Definitions (the issue left these open):

* Slow frames: ``slow_index`` (1-D int tensor, strictly increasing, values in [0, T);
  anything else is a ValueError) or ``slow_stride=s`` = frames 0, s, 2s, ... < T
  (Ns = ceil(T / s); equal to the released ``linspace(0, T, Ns+1)[:-1]`` cast to int
  whenever s divides T). Neither given: ``slow_stride=4`` (the SF-LLaVA-1.5 reading,
  128 -> 32). Both given: ValueError. An empty ``slow_index`` is legal (fast stream only).
* Slow pooling: non-overlapping windows, stride = ``slow_kernel``; no padding, so the
  kernel must divide the grid (ValueError naming slow_kernel and the grid). Kernel
  (1, 2) + ``max`` is the released 1-D pairwise pool over the row-major flattened grid
  (identical whenever W is even, which the divisibility rule requires).
* Max ties: the first maximum in row-major window order wins, in the value and in the
  gradient (every implementation); NaN propagates (the first NaN wins). Average pooling
  spreads the gradient evenly over its window.
* Fast stream: ``fast_frames="all"`` (released) or ``"non_slow"``; adaptive average
  bins exactly as ``F.adaptive_avg_pool2d`` (bin i = [floor(i*H/oh), ceil((i+1)*H/oh))),
  so bins overlap when the grid does not divide. ``fast_grid`` larger than the input grid
  is a ValueError (adaptive pooling would repeat patches).
* Order: ``"slow_fast"`` (released v1): slow tokens of every slow frame (time order,
  row-major), then the separator (once, if given), then every fast token.
  ``"interleaved"``: frame by frame in time order: that frame's slow tokens (if slow),
  its fast tokens (if fast), then the separator (if given) - i.e. in interleaved order the
  separator is a frame delimiter and appears T times.
* ``separator``: (D,) tensor of x's dtype/device; it receives a gradient (the sum of the
  gradients of its slots).
* Inputs: (T, H, W, D), or (T, P, D) with ``grid=(H, W)`` (a square grid is inferred when
  P is a perfect square and grid is None). Any strides; a last dim that is not
  unit-stride is copied once. fp32/fp16/bf16/fp64, averages accumulate in fp32 (fp64 for
  fp64), output in x's dtype.
* Backward needs no copy of x: max mode saves int32 arg-max indices (window-local,
  row-major) sized by the slow tokens only, (Ns*S, D), and only when x requires grad.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::slowfast_pool"
BWD = "lvlm_fast::slowfast_pool_backward"

SLOW_MODES = ("avg", "max")
FAST_FRAMES = ("all", "non_slow")
ORDERS = ("slow_fast", "interleaved")

torch.library.define(
    OP,
    "(Tensor x, Tensor slow_index, Tensor? separator, int[2] slow_kernel, str slow_mode, "
    "int[2] fast_grid, str fast_frames, str order, bool need_argmax) -> "
    "(Tensor out, Tensor argmax)",
)
torch.library.define(
    BWD,
    "(Tensor grad_out, Tensor argmax, Tensor slow_index, SymInt[] x_shape, bool has_separator, "
    "int[2] slow_kernel, str slow_mode, int[2] fast_grid, str fast_frames, str order) -> "
    "(Tensor grad_x, Tensor grad_separator)",
)


# --------------------------------------------------------------------------- shapes
def num_tokens(t, ns, h, w, slow_kernel, fast_grid, fast_frames, order, has_separator):
    """Output rows for T frames, Ns slow frames and an H x W grid (works on SymInts)."""
    s = (h // slow_kernel[0]) * (w // slow_kernel[1])
    nf = t if fast_frames == "all" else t - ns
    seps = (1 if order == "slow_fast" else t) if has_separator else 0
    return ns * s + nf * fast_grid[0] * fast_grid[1] + seps


def frame_slots(slow_index, t, s, f, has_separator, fast_frames, order):
    """Per-frame first output row of its slow tokens, fast tokens and separator, and its
    rank among the slow frames (-1 = none), int64 (T,) each, computed with device ops (no
    host sync). Used by the Triton launcher and the CPU fallback; the C++ kernel computes
    the same on the host."""
    dev = slow_index.device
    is_slow = torch.zeros(t, dtype=torch.int64, device=dev)
    is_slow.index_fill_(0, slow_index.long(), 1)
    is_fast = torch.ones_like(is_slow) if fast_frames == "all" else 1 - is_slow
    ns_before = torch.cumsum(is_slow, 0) - is_slow
    nf_before = torch.cumsum(is_fast, 0) - is_fast
    sep = int(has_separator)
    ns = slow_index.shape[0]
    frames = torch.arange(t, dtype=torch.int64, device=dev)
    none = torch.full_like(is_slow, -1)
    if order == "slow_fast":
        slow_row = torch.where(is_slow.bool(), ns_before * s, none)
        fast_row = torch.where(is_fast.bool(), ns * s + sep + nf_before * f, none)
        sep_row = torch.where(frames == 0, ns * s, none) if has_separator else none
    else:
        base = ns_before * s + nf_before * f + frames * sep
        slow_row = torch.where(is_slow.bool(), base, none)
        fast_row = torch.where(is_fast.bool(), base + is_slow * s, none)
        sep_row = base + is_slow * s + is_fast * f if has_separator else none
    slow_rank = torch.where(is_slow.bool(), ns_before, none)
    return slow_row, fast_row, sep_row, slow_rank


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(OP)
def _fake_fwd(x, slow_index, separator, slow_kernel, slow_mode, fast_grid, fast_frames, order,
              need_argmax):
    t, h, w, d = x.shape
    ns = slow_index.shape[0]
    rows = num_tokens(t, ns, h, w, slow_kernel, fast_grid, fast_frames, order,
                      separator is not None)
    out = x.new_empty((rows, d))
    if slow_mode == "max" and need_argmax:
        s = (h // slow_kernel[0]) * (w // slow_kernel[1])
        argmax = x.new_empty((ns * s, d), dtype=torch.int32)
    else:
        argmax = x.new_empty((0,), dtype=torch.int32)
    return out, argmax


@torch.library.register_fake(BWD)
def _fake_bwd(grad_out, argmax, slow_index, x_shape, has_separator, slow_kernel, slow_mode,
              fast_grid, fast_frames, order):
    d = x_shape[3]
    grad_x = grad_out.new_empty(tuple(x_shape))
    grad_sep = grad_out.new_empty((d,) if has_separator else (0,))
    return grad_x, grad_sep


# --------------------------------------------------------------------------- CUDA (Triton)
@torch.library.impl(OP, "CUDA")
def _cuda_fwd(x, slow_index, separator, slow_kernel, slow_mode, fast_grid, fast_frames, order,
              need_argmax):
    from lvlm_fast.kernels.slowfast_pool import slowfast_pool_fwd

    return slowfast_pool_fwd(x, slow_index, separator, slow_kernel, slow_mode, fast_grid,
                             fast_frames, order, need_argmax)


@torch.library.impl(BWD, "CUDA")
def _cuda_bwd(grad_out, argmax, slow_index, x_shape, has_separator, slow_kernel, slow_mode,
              fast_grid, fast_frames, order):
    from lvlm_fast.kernels.slowfast_pool import slowfast_pool_bwd

    return slowfast_pool_bwd(grad_out, argmax, slow_index, x_shape, has_separator, slow_kernel,
                             slow_mode, fast_grid, fast_frames, order)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, slow_index, separator, slow_kernel, slow_mode, fast_grid, fast_frames, order, _ = inputs
    _, argmax = output
    ctx.save_for_backward(argmax, slow_index)
    ctx.x_shape = x.shape
    ctx.statics = (separator is not None, slow_kernel, slow_mode, fast_grid, fast_frames, order)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_argmax):
    argmax, slow_index = ctx.saved_tensors
    has_sep = ctx.statics[0]
    if grad_out is None:
        return (None,) * 9
    if ctx.statics[2] == "max" and argmax.numel() == 0 and slow_index.numel() > 0:
        raise RuntimeError(
            "slowfast_pool: max-mode backward needs the arg-max indices, but the forward ran "
            "with need_argmax=False (call lvlm_fast.ops.slowfast_pool with grad enabled)"
        )
    grad_x, grad_sep = torch.ops.lvlm_fast.slowfast_pool_backward(
        grad_out.contiguous(), argmax, slow_index, list(ctx.x_shape), *ctx.statics
    )
    return grad_x, None, grad_sep if has_sep else None, None, None, None, None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- CPU fallback
def reference_fwd(x, slow_index, separator, slow_kernel, slow_mode, fast_grid, fast_frames,
                  order, need_argmax):
    """Schema-shaped reference, used as the CPU kernel only if the C++ build is missing."""
    from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_pool

    out = ref_pool(x, slow_index, slow_kernel=tuple(slow_kernel), slow_mode=slow_mode,
                   fast_grid=tuple(fast_grid), fast_frames=fast_frames, order=order,
                   separator=separator)
    if slow_mode != "max" or not need_argmax:
        return out, x.new_empty((0,), dtype=torch.int32)
    _, h, w, d = x.shape
    kh, kw = slow_kernel
    frames = x[slow_index.long()]
    win = frames.reshape(-1, h // kh, kh, w // kw, kw, d).permute(0, 1, 3, 2, 4, 5)
    argmax = win.reshape(-1, kh * kw, d).max(dim=1).indices.to(torch.int32)
    return out, argmax


def reference_bwd(grad_out, argmax, slow_index, x_shape, has_separator, slow_kernel, slow_mode,
                  fast_grid, fast_frames, order):
    """Backward written directly from the definitions (scatter by window / bin)."""
    from lvlm_fast.reference.slowfast_pool import adaptive_bins

    t, h, w, d = (int(n) for n in x_shape)
    kh, kw = slow_kernel
    fh, fw = fast_grid
    sh, sw = h // kh, w // kw
    s, f = sh * sw, fh * fw
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    g = grad_out.to(acc)
    slow_row, fast_row, sep_row, _ = frame_slots(slow_index, t, s, f, has_separator,
                                                 fast_frames, order)
    gx = torch.zeros((t, h, w, d), dtype=acc, device=grad_out.device)
    idx = slow_index.long()
    if idx.numel():
        rows = slow_row[idx].unsqueeze(1) + torch.arange(s, device=g.device)
        gs = g[rows].reshape(-1, sh, sw, 1, d)  # (Ns, SH, SW, 1, D)
        if slow_mode == "max":
            local = torch.arange(kh * kw, device=g.device).view(1, 1, 1, -1, 1)
            gw = torch.where(argmax.reshape(-1, sh, sw, 1, d) == local, gs, 0)
        else:
            gw = (gs / (kh * kw)).expand(-1, -1, -1, kh * kw, -1)
        gw = gw.reshape(-1, sh, sw, kh, kw, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, d)
        gx.index_add_(0, idx, gw)
    fast = (fast_row >= 0).nonzero().squeeze(1)
    if fast.numel():
        gf = g[fast_row[fast].unsqueeze(1) + torch.arange(f, device=g.device)]  # (Nf, F, D)
        k = 0
        for r0, r1 in adaptive_bins(h, fh):
            for c0, c1 in adaptive_bins(w, fw):
                cell = gf[:, k] / ((r1 - r0) * (c1 - c0))
                gx[fast, r0:r1, c0:c1] += cell[:, None, None, :]
                k += 1
    if has_separator:  # slot rows are static: one (slow_fast) or one per frame (interleaved)
        rows = sep_row[:1] if order == "slow_fast" else sep_row
        grad_sep = g.index_select(0, rows).sum(0).to(grad_out.dtype)
    else:
        grad_sep = grad_out.new_empty((0,))
    return gx.to(grad_out.dtype), grad_sep


CPU_FALLBACKS = {"slowfast_pool": reference_fwd, "slowfast_pool_backward": reference_bwd}


# --------------------------------------------------------------------------- public API
def _pair(name: str, value: object) -> tuple[int, int]:
    if (not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in value)):
        raise TypeError(f"{name} must be a pair of ints (rows, cols), got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name} must be >= (1, 1), got {tuple(value)}")
    return int(value[0]), int(value[1])


def _as_grid(x: torch.Tensor, grid) -> torch.Tensor:
    """(T, H, W, D) view of x (splitting P into H x W is always a view, never a copy)."""
    if x.dim() == 4:
        if grid is not None and tuple(grid) != tuple(x.shape[1:3]):
            raise ValueError(f"grid {tuple(grid)} does not match x.shape[1:3] = "
                             f"{tuple(x.shape[1:3])} for a (T, H, W, D) input")
        return x
    t, p, d = x.shape
    if grid is None:
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"x is (T, P, D) with P = {p}, not a square: pass grid=(H, W)")
        grid = (side, side)
    h, w = _pair("grid", grid)
    if h * w != p:
        raise ValueError(f"grid {(h, w)} has {h * w} cells but x.shape[1] (P patches) is {p}")
    return x.view(t, h, w, d)


def _validate_index(slow_index: torch.Tensor, t: int) -> None:
    v.check_int_tensor("slow_index", slow_index, 1)
    if slow_index.shape[0] > t:
        raise ValueError(f"slow_index must hold at most T = {t} strictly increasing frame "
                         f"indices, got shape {tuple(slow_index.shape)}")
    if slow_index.numel() and v.value_checks_allowed(slow_index):
        vals = slow_index.tolist()  # eager CPU only; Ns <= T values, cheaper than tensor ops
        lo, hi = min(vals), max(vals)
        if lo < 0 or hi >= t:
            raise ValueError(f"slow_index values must be in [0, {t}) (T = x.shape[0]), "
                             f"got min {lo}, max {hi}")
        if any(b <= a for a, b in itertools.pairwise(vals)):
            raise ValueError("slow_index must be strictly increasing (sorted, no repeats), "
                             f"got {vals[:16]}")


def slowfast_pool(
    x: torch.Tensor,
    *,
    grid: tuple[int, int] | None = None,
    slow_stride: int | None = None,
    slow_index: torch.Tensor | None = None,
    slow_kernel: tuple[int, int] = (2, 2),
    slow_mode: str = "avg",
    fast_grid: tuple[int, int] = (4, 4),
    fast_frames: str = "all",
    order: str = "slow_fast",
    separator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slow (fine grid, few frames) + fast (coarse grid, many frames) tokens of one video.

    Args:
        x: frame features (T, H, W, D), or (T, P, D) with ``grid=(H, W)``.
        grid: the patch grid of a (T, P, D) input (square inferred when None).
        slow_stride: slow frames 0, s, 2s, ... (< T). Default (with no slow_index): 4.
        slow_index: (Ns,) int32/int64, strictly increasing, in [0, T).
        slow_kernel: (kh, kw) non-overlapping window; must divide (H, W).
        slow_mode: ``"avg"`` or ``"max"``.
        fast_grid: adaptive average pool output (oh, ow) <= (H, W).
        fast_frames: ``"all"`` or ``"non_slow"``.
        order: ``"slow_fast"`` or ``"interleaved"`` (see the module docstring).
        separator: optional (D,) token placed between the streams (slow_fast) or after
            every frame (interleaved).

    Returns:
        (tokens, D) in x's dtype; :func:`num_tokens` gives the count.
    """
    v.check_tensor("x", x, (3, 4))
    x4 = _as_grid(x, grid)
    t, h, w, d = x4.shape
    if min(t, h, w, d) < 1:
        raise ValueError(f"x must have T, H, W, D >= 1, got shape {tuple(x4.shape)}")
    if slow_mode not in SLOW_MODES:
        raise ValueError(f"slow_mode must be one of {SLOW_MODES}, got {slow_mode!r}")
    if fast_frames not in FAST_FRAMES:
        raise ValueError(f"fast_frames must be one of {FAST_FRAMES}, got {fast_frames!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    kh, kw = _pair("slow_kernel", slow_kernel)
    if h % kh or w % kw:
        raise ValueError(f"slow_kernel {(kh, kw)} must divide the grid (H, W) = {(h, w)}: "
                         "slow pooling uses non-overlapping windows and no padding")
    fh, fw = _pair("fast_grid", fast_grid)
    if fh > h or fw > w:
        raise ValueError(f"fast_grid {(fh, fw)} must not exceed the grid (H, W) = {(h, w)}")
    if slow_index is not None and slow_stride is not None:
        raise ValueError("give slow_stride or slow_index, not both")
    if slow_index is None:
        stride = 4 if slow_stride is None else slow_stride
        if not isinstance(stride, int) or isinstance(stride, bool):
            raise TypeError(f"slow_stride must be an int, got {type(stride).__name__}")
        if stride < 1:
            raise ValueError(f"slow_stride must be >= 1, got {stride}")
        slow_index = torch.arange(0, t, stride, dtype=torch.int64, device=x.device)
    else:
        _validate_index(slow_index, t)
    if separator is not None:
        v.check_tensor("separator", separator, 1)
        v.check_size("separator", separator, 0, d, "x's channel dim D")
    v.check_same("device", "x", x, slow_index=slow_index, separator=separator)
    v.check_same("dtype", "x", x, separator=separator)
    if slow_index.device.type == "cuda" and slow_index.numel():
        ok = (slow_index.min() >= 0) & (slow_index.max() < t)
        if slow_index.numel() > 1:
            ok = ok & (slow_index[1:] > slow_index[:-1]).all()
        torch._assert_async(ok, "slow_index must be strictly increasing and in [0, T)")
    need_argmax = slow_mode == "max" and torch.is_grad_enabled() and x.requires_grad
    out, _ = torch.ops.lvlm_fast.slowfast_pool(
        x4, slow_index, separator, [kh, kw], slow_mode, [fh, fw], fast_frames, order, need_argmax
    )
    return out


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SlowFastConfig:
    """A SlowFast setting. ``num_slow`` slow frames at the released indices
    ``linspace(0, T, num_slow + 1)[:-1]`` cast to int (see :meth:`slow_index`)."""

    num_frames: int
    num_slow: int
    slow_kernel: tuple[int, int] = (2, 2)
    slow_mode: str = "avg"
    fast_grid: tuple[int, int] = (4, 4)
    fast_frames: str = "all"
    order: str = "slow_fast"

    @classmethod
    def sf_llava(cls) -> SlowFastConfig:
        """Released SlowFast-LLaVA (v1) code: 50 frames, 10 slow with the 1-D pairwise max
        pool (24x24 -> 24x12 = 288 tokens), all 50 frames to 4x4; slow then fast, no
        separator: 3,680 tokens for a 24x24 grid."""
        return cls(num_frames=50, num_slow=10, slow_kernel=(1, 2), slow_mode="max",
                   fast_grid=(4, 4), fast_frames="all", order="slow_fast")

    @classmethod
    def sf_llava_1_5(cls) -> SlowFastConfig:
        """SlowFast-LLaVA-1.5: an UNVERIFIED reading of the paper (no code was released):
        128 frames, 32 slow (stride 4) with 2x2 average pooling (24x24 -> 144 tokens), all
        128 frames in the fast stream pooled 4x4 (24x24 -> 6x6 = 36 tokens, i.e.
        ``fast_grid=(6, 6)``): 32*144 + 128*36 = 9,216, the ~9K tokens the paper reports.
        A reviewer mentions a separator between the streams: pass ``separator=`` to
        :meth:`pool` to add one. Treat as a configurable preset, not as fact."""
        return cls(num_frames=128, num_slow=32, slow_kernel=(2, 2), slow_mode="avg",
                   fast_grid=(6, 6), fast_frames="all", order="slow_fast")

    def slow_index(self, num_frames: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        t = self.num_frames if num_frames is None else num_frames
        ns = min(self.num_slow, t)
        idx = torch.linspace(0, t, ns + 1).to(torch.int32)[:-1].long()
        return idx.to(device) if device is not None else idx

    def num_tokens(self, grid: tuple[int, int] = (24, 24), num_frames: int | None = None,
                   separator: bool = False) -> int:
        t = self.num_frames if num_frames is None else num_frames
        return num_tokens(t, min(self.num_slow, t), grid[0], grid[1], self.slow_kernel,
                          self.fast_grid, self.fast_frames, self.order, separator)

    def kwargs(self, num_frames: int, device: torch.device | str | None = None) -> dict:
        """Keyword arguments for :func:`slowfast_pool` on a video of ``num_frames``."""
        return dict(slow_index=self.slow_index(num_frames, device), slow_kernel=self.slow_kernel,
                    slow_mode=self.slow_mode, fast_grid=self.fast_grid,
                    fast_frames=self.fast_frames, order=self.order)

    def pool(self, x: torch.Tensor, *, grid: tuple[int, int] | None = None,
             separator: torch.Tensor | None = None) -> torch.Tensor:
        """Pool one video (its own frame count; slow frames by the released linspace)."""
        return slowfast_pool(x, grid=grid, separator=separator,
                             **self.kwargs(x.shape[0], x.device))
