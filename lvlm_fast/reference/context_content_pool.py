"""Reference for LLaMA-VID's two tokens per frame (context token + content token).

Per frame n with patch features X[n] (P, C), text queries Q[n] (Lq, Ck) (shared by every
frame or one set per frame) and keys K[n] (P, Ck) (default: X[n]; LLaMA-VID uses
X[n] W_k, see :class:`lvlm_fast.nn.ContextContentPooling`), shared/methods note
"LLaMA-VID":

    A[n]       = softmax_p( Q[n] K[n]^T * scale )       (Lq, P), one row per query
    context[n] = mean_q ( A[n] X[n] )                   (C,)   = (mean_q A[n]) X[n]
    content[n] = mean_p X[n]                            (C,)   content_grid g = 1
               = adaptive_avg_pool2d over the sqrt(P) x sqrt(P) grid to g x g tokens, g > 1
    out[n]     = [context[n], content[n] ...]           (1 + g*g, C)

``scale`` defaults to 1/sqrt(Ck) (the released code divides by sqrt of the feature width,
Ck = C there). Grid bins follow ``torch.nn.functional.adaptive_avg_pool2d``: bin i of g
covers rows [floor(i*s/g), ceil((i+1)*s/g)) of the s x s grid (the released code uses
``avg_pool2d`` with stride s // g, identical when g divides s). Computed in float32
(float64 stays float64), returned in x's dtype. This is deliberately the slow, literal
form: it materialises the (N, Lq, P) attention and the (N, Lq, C) product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_bins(side: int, g: int) -> list[tuple[int, int]]:
    """[start, end) of each of the g adaptive-pooling bins along a side of length ``side``."""
    return [((i * side) // g, -((-(i + 1) * side) // g)) for i in range(g)]


def content_tokens(x: torch.Tensor, content_grid: int = 1) -> torch.Tensor:
    """(N, P, C) -> (N, g*g, C): mean over patches (g = 1) or g x g adaptive grid average."""
    if content_grid == 1:
        return x.mean(dim=1, keepdim=True)
    n, p, c = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"content_grid > 1 needs a square patch grid, got P = {p}")
    grid = x.reshape(n, side, side, c).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, content_grid)  # (N, C, g, g)
    return pooled.flatten(2).transpose(1, 2)


def context_content_pool(
    x: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    content_grid: int = 1,
) -> torch.Tensor:
    """x (N, P, C); queries (Lq, Ck) or (N, Lq, Ck); keys (N, P, Ck) or None (= x).
    Returns (N, 1 + g*g, C): the context token, then the content token(s), per frame."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    keys = x if keys is None else keys
    n = x.shape[0]
    q = queries if queries.dim() == 3 else queries.unsqueeze(0).expand(n, -1, -1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    xa = x.to(acc)
    scores = (q.to(acc) @ keys.to(acc).transpose(1, 2)) * scale  # (N, Lq, P)
    attn = scores.softmax(dim=-1)
    context = (attn @ xa).mean(dim=1, keepdim=True)  # (N, 1, C)
    content = content_tokens(xa, content_grid)  # (N, g*g, C)
    return torch.cat([context, content], dim=1).to(x.dtype)
