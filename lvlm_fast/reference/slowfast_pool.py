"""Reference for SlowFast-LLaVA's dual-stream pooling (see shared/methods/slowfast_llamavid.md).

Per video with frame features ``x`` (T, H, W, D):

    slow stream: for each slow frame t (in ``slow_index`` order), pool the H x W grid with
                 non-overlapping (kh, kw) windows (stride = kernel), ``max`` or ``avg``
                 -> (H/kh) * (W/kw) tokens, row-major.
                 The released 1-D pairwise max pool over the row-major flattened grid
                 (MaxPool1d(2, 2) on 576 tokens, 24x24 -> 24x12) is exactly kernel (1, 2).
    fast stream: for each fast frame (all frames, or only the non-slow ones), adaptive
                 average pool to (oh, ow); output row i covers input rows
                 [floor(i*H/oh), ceil((i+1)*H/oh)) (the torch.nn.functional
                 .adaptive_avg_pool2d bins), likewise for columns -> oh * ow tokens.
    order:       ``slow_fast``: every slow token, [separator], every fast token.
                 ``interleaved``: per frame in time order: its slow tokens (if slow), its
                 fast tokens (if fast), [separator] (so the separator ends every frame).

Max pooling picks the FIRST maximum in row-major window order (torch.max(dim) rule) and
its gradient goes there only; NaN propagates. Averages are computed in fp32 (fp64 stays
fp64) and cast back to the input dtype.
"""

from __future__ import annotations

import torch


def released_slow_index(num_frames: int, num_slow: int) -> torch.Tensor:
    """The released code's slow frames: ``linspace(0, T, Ns+1)`` cast to int, last dropped."""
    return torch.linspace(0, num_frames, num_slow + 1).to(torch.int32)[:-1].long()


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each adaptive-average-pool bin (torch's formula)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def slow_pool(frames: torch.Tensor, kernel: tuple[int, int], mode: str) -> torch.Tensor:
    """frames (Ns, H, W, D) -> (Ns, H/kh * W/kw, D) with non-overlapping windows."""
    ns, h, w, d = frames.shape
    kh, kw = kernel
    # (Ns, H/kh, kh, W/kw, kw, D) -> windows last-but-one, row-major inside the window.
    win = frames.reshape(ns, h // kh, kh, w // kw, kw, d).permute(0, 1, 3, 2, 4, 5)
    win = win.reshape(ns, (h // kh) * (w // kw), kh * kw, d)
    if mode == "max":
        return win.max(dim=2).values  # first max wins ties; gradient goes to it only
    acc = torch.float64 if frames.dtype == torch.float64 else torch.float32
    return win.to(acc).mean(dim=2).to(frames.dtype)


def fast_pool(frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """frames (Nf, H, W, D) -> (Nf, oh*ow, D): explicit adaptive-average bins."""
    acc = torch.float64 if frames.dtype == torch.float64 else torch.float32
    f = frames.to(acc)
    rows = adaptive_bins(frames.shape[1], grid[0])
    cols = adaptive_bins(frames.shape[2], grid[1])
    cells = [f[:, r0:r1, c0:c1].mean(dim=(1, 2)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, dim=1).to(frames.dtype)


def slowfast_pool(
    x: torch.Tensor,
    slow_index: torch.Tensor,
    *,
    slow_kernel: tuple[int, int] = (2, 2),
    slow_mode: str = "avg",
    fast_grid: tuple[int, int] = (4, 4),
    fast_frames: str = "all",
    order: str = "slow_fast",
    separator: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (T, H, W, D); slow_index (Ns,) strictly increasing in [0, T). Returns (tokens, D).

    No validation: this is the spec, called with legal inputs (see lvlm_fast.ops)."""
    t, _, _, d = x.shape
    idx = slow_index.long().tolist()
    is_slow = [False] * t
    for i in idx:
        is_slow[i] = True
    fast_ids = [i for i in range(t) if fast_frames == "all" or not is_slow[i]]

    slow = slow_pool(x[idx], slow_kernel, slow_mode) if idx else x.new_empty((0, 0, d))
    fast = fast_pool(x[fast_ids], fast_grid) if fast_ids else x.new_empty((0, 0, d))
    sep = [] if separator is None else [separator.reshape(1, d)]

    if order == "slow_fast":
        return torch.cat([slow.reshape(-1, d), *sep, fast.reshape(-1, d)], dim=0)
    # interleaved: frame by frame in time order; the separator closes every frame.
    slow_of = {f: k for k, f in enumerate(idx)}
    fast_of = {f: k for k, f in enumerate(fast_ids)}
    parts = []
    for f in range(t):
        if f in slow_of:
            parts.append(slow[slow_of[f]])
        if f in fast_of:
            parts.append(fast[fast_of[f]])
        parts.extend(sep)
    return torch.cat(parts, dim=0) if parts else x.new_empty((0, d))

