"""Reference of ``qformer_cross_attention``: Video-LLaMA's Q-Former cross-attention.

A small fixed set of Lq already-projected queries (8 audio / 32 video) attends over every
token of every frame. Keys and values are the frame tokens plus a per-frame position row,
projected (released ``BertSelfAttention`` with ``is_cross_attention``; the position row is
added before the projection in ``encode_videoQformer_visual``)::

    X[t, s] = F[t, s] + p[t]                       (T, S, E)  -> (N = T*S, E)
    K = X Wk^T + bk,  V = X Wv^T + bv              (N, C), heads of Dh = C / H
    out_h = softmax_j(scale * q_h . K_h[j]) V_h    (Lq, Dh), heads concatenated -> (Lq, C)
    lse_h = logsumexp_j(scale * q_h . K_h[j])      (H, Lq)

There is no mask and no positional term in the scores, so key order does not matter and
chunks of frames combine exactly through their log-sum-exps (:func:`merge`).
"""

from __future__ import annotations

import math

import torch


def qformer_cross_attention(
    q: torch.Tensor,
    frames: torch.Tensor,
    pos: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q (B, Lq, C), frames (B, T, S, E), pos (T, E), wk/wv (C, E), bk/bv (C,)
    -> out (B, Lq, C) in q's dtype [, lse (B, H, Lq) fp32 (fp64 for fp64)]."""
    b, lq, c = q.shape
    t, s, e = frames.shape[1:]
    dh = c // num_heads
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    x = (frames.to(acc) + pos.to(acc)[None, :, None, :]).reshape(b, t * s, e)
    k = x @ wk.to(acc).T + bk.to(acc)  # (B, N, C)
    v = x @ wv.to(acc).T + bv.to(acc)
    qh = q.to(acc).reshape(b, lq, num_heads, dh).transpose(1, 2)  # (B, H, Lq, Dh)
    kh = k.reshape(b, t * s, num_heads, dh).transpose(1, 2)  # (B, H, N, Dh)
    vh = v.reshape(b, t * s, num_heads, dh).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, -1)
    out = (torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(b, lq, c).to(q.dtype)
    return (out, lse) if return_lse else out


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of two partial results over disjoint key sets.

    ``out`` (B, Lq, C) with C = H * Dh, ``lse`` (B, H, Lq). With ``m = logaddexp(a, b)``:
    ``out = exp(lse_a - m) out_a + exp(lse_b - m) out_b`` per head, ``lse = m``.
    """
    b, lq, c = out_a.shape
    h = lse_a.shape[1]
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).transpose(1, 2)[..., None]  # (B, Lq, H, 1)
    wb = torch.exp(lse_b - lse).transpose(1, 2)[..., None]
    acc = lse.dtype
    oa = out_a.to(acc).reshape(b, lq, h, c // h)
    ob = out_b.to(acc).reshape(b, lq, h, c // h)
    out = (wa * oa + wb * ob).reshape(b, lq, c).to(out_a.dtype)
    return out, lse
