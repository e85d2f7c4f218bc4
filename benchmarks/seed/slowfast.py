"""Seed-style SlowFast-LLaVA pooling: written the way the released code does it.

One video per call; pooling modules (``nn.MaxPool1d`` / ``nn.AvgPool2d`` /
``nn.AdaptiveAvgPool2d``) are built on every call; the features are permuted to
channels-first and copied (a (D, T, H, W) / (T, D, P) copy) only to be pooled; slow
frames are gathered with a Python list of indices; the two streams are concatenated at
the end. This is the baseline the fused op is measured against (speedup_vs_seed).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _slow_indices(num_frames: int, num_slow: int) -> list[int]:
    # released rule: linspace(0, T, Ns + 1) cast to int32, last entry dropped
    idx = torch.linspace(0, num_frames, num_slow + 1).to(torch.int32).tolist()
    idx.pop()
    return idx


def _slow_pool(feats: torch.Tensor, how: str) -> torch.Tensor:
    t, n, d = feats.shape
    if how in ("spatial_1d_max_pool", "spatial_1d_avg_pool"):
        pool = nn.MaxPool1d(2, 2) if how.endswith("max_pool") else nn.AvgPool1d(2, 2)
        y = pool(feats.permute(0, 2, 1).contiguous())  # (T, D, N) copy, pool along N
        return y.permute(0, 2, 1).reshape(-1, d)
    side = int(math.sqrt(n))
    pool = nn.MaxPool2d(2, 2) if how == "spatial_2d_max_pool" else nn.AvgPool2d(2, 2)
    y = feats.reshape(t, side, side, d).permute(3, 0, 1, 2).contiguous()  # (D, T, H, W)
    y = pool(y)
    return y.permute(1, 2, 3, 0).reshape(-1, d)


def seed_slowfast(
    image_features: torch.Tensor,
    num_slow: int = 10,
    slow_pool: str = "spatial_1d_max_pool",
    fast_size: tuple[int, int] = (4, 4),
) -> torch.Tensor:
    """image_features (T, N, D) of one video -> (1, tokens, D) like the released code."""
    t, n, d = image_features.shape
    idx = _slow_indices(t, num_slow)
    slow = _slow_pool(image_features[idx], slow_pool)
    side = int(math.sqrt(n))
    pool = nn.AdaptiveAvgPool2d(fast_size)
    fast = image_features.reshape(t, side, side, d).permute(3, 0, 1, 2).contiguous()  # (D,T,H,W)
    fast = pool(fast).permute(1, 2, 3, 0).reshape(-1, d)
    return torch.cat((slow, fast), dim=0).unsqueeze(0)
