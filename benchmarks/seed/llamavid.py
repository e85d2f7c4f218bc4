"""Seed-style LLaMA-VID baseline, written the way the released LLaMA-VID code does it.

The ``seed`` impl of ``speedup_vs_seed`` for ``context_content_pool`` (see
/work/shared/methods/slowfast_llamavid.md, "LLaMA-VID"). It reproduces the released
``token_generation`` costs with the same math as the fused op, so the harness can check its
output against the reference:

  * the text queries are materialised per frame, (N, Lq, C) (the release runs its Q-Former
    once per frame on a per-frame copy of the instruction, so its queries arrive as one
    (Lq, C) block per frame even when they are all equal);
  * keys ``K = X W_k + b`` (when ``key_weight`` is given; the benchmark's keys = X);
  * ``Q @ K^T / sqrt(C)`` materialised as (N, Lq, P), ``softmax(-1)``, ``@ X`` materialised as
    (N, Lq, C), then ``.mean(1)``: the per-query product exists before the mean;
  * content: ``X.mean(1)`` ("mean") or ``F.avg_pool2d`` with kernel = stride = sqrt(P) // g
    over a permuted (N, C, s, s) copy ("grid:g");
  * ``torch.cat([context[:, None], content], 1)``.
Differences from the release, deliberate: the value/content projectors (``vlm_att_val_projector``,
``mm_projector``) are left out (the op stops before them, like the fused op), and the release's
long-video branch (a Python loop over 64-frame blocks of the softmax scores, then
``torch.cuda.empty_cache()``) is replaced by the single dense product, which is the faster
of the two on CPU, so the seed is if anything flattered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def seed_context_content(
    vis_embed: torch.Tensor,
    text_q: torch.Tensor,
    key_weight: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    content_grid: int = 1,
) -> torch.Tensor:
    """vis_embed (N, P, C); text_q (Lq, C) shared or (N, Lq, C). Returns (N, 1 + g*g, C)."""
    n = vis_embed.shape[0]
    if text_q.dim() == 2:
        text_q = text_q[None].repeat(n, 1, 1)  # one query block per frame, as released
    keys = vis_embed if key_weight is None else F.linear(vis_embed, key_weight, key_bias)
    ctx = text_q @ keys.transpose(-1, -2)  # (N, Lq, P)
    ctx = ctx / (vis_embed.shape[-1] ** 0.5)
    ctx = (ctx.softmax(-1) @ vis_embed).mean(1)  # (N, Lq, C) before the mean
    if content_grid > 1:
        side = int(vis_embed.shape[1] ** 0.5)
        stride = side // content_grid
        grid = vis_embed.reshape(n, side, side, -1).permute(0, 3, 1, 2)
        content = F.avg_pool2d(grid, kernel_size=stride, stride=stride, padding=0)
        content = content.permute(0, 2, 3, 1).flatten(1, 2)
    else:
        content = vis_embed.mean(dim=1, keepdim=True)
    return torch.cat([ctx[:, None], content], dim=1)


def seed_scale(c: int) -> float:
    """The release's score scale, 1/sqrt(C)."""
    return 1.0 / math.sqrt(c)
