"""Reference of ``summary_attention``: Video-XL's attention inside a window.

The KV buffer holds ``[sink ; retained summaries ; current window]`` (S rows); the window's
Lq queries are its last Lq rows. Plain causal attention aligned bottom-right: query ``i``
sees key ``j`` iff ``j <= S - Lq + i`` (every retained key, and the window keys at or before
itself). Grouped-query attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``.

``key_mass[b, j] = sum over heads h and queries i of softmax_j(scale * q[b,h,i] . k[b,h',j])``
(the attention each key received in this window, for eviction policies).
"""

from __future__ import annotations

import math

import torch


def bottom_right_mask(lq: int, s: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Lq, S) bool, True where query i may see key j (j <= S - Lq + i)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= (s - lq) + i


def summary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Lq, D), k/v (B, Hkv, S, D) -> out (B, Hq, Lq, D) [, key_mass (B, S) fp32]."""
    _, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kr = k.to(acc).repeat_interleave(g, dim=1)
    vr = v.to(acc).repeat_interleave(g, dim=1)
    scores = (q.to(acc) @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~bottom_right_mask(lq, s, q.device), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p @ vr).to(q.dtype)
    if not return_key_mass:
        return out
    return out, p.sum(dim=(1, 2)).float()
