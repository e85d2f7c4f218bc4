"""LLaMA-VID's token generation as an nn.Module: two tokens (or 1 + g*g) per frame.

Per frame t with visual features X_t (P, C) and text queries Q_t (Lq, C) (the release's
``text_q``: its Q-Former output after ``vlm_att_projector``)::

    K_t       = X_t W_k^T + b_k                     key_projector, C -> C
    context_t = mean_q softmax(Q_t K_t^T / sqrt(C)) X_t
    context   = val_projector(context_t)            C -> llm width
    content   = mm_projector(mean_p X_t)            C -> llm width (or a g x g grid average)
    tokens_t  = [context, content ...]

Parameter names follow the released ``llamavid_arch.py`` (``vlm_att_key_projector``,
``vlm_att_val_projector``, ``mm_projector``); :meth:`ContextContentPooling.load_released`
maps a released state dict onto this module.

The key projection is folded into the queries: ``Q K^T = (Q W_k) X^T + (Q b_k) 1^T`` and
the second term is constant over patches, so it cancels in the softmax. The op then runs
with keys = X and queries ``Q W_k`` (Lq x C per query set instead of P x C per frame: the
(N, P, C) keys are never built). ``fold_key_projection=False`` computes the keys per chunk
of frames instead (the release's literal order; for checking).

Frames are processed in chunks of ``frames_per_chunk`` into a preallocated output, so the
working memory beyond the output is one chunk's pooled features.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from lvlm_fast.ops.context_content_pool import context_content_pool

__all__ = ["ContextContentPooling", "build_projector"]


def build_projector(projector_type: str, in_dim: int, out_dim: int, **factory) -> nn.Module:
    """The release's (LLaVA's) ``build_vision_projector``: ``linear`` or ``mlp{k}x_gelu``."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim, **factory)
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"projector_type must be 'linear' or 'mlp<k>x_gelu' (k >= 1), got {projector_type!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, **factory)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim, **factory)]
    return nn.Sequential(*layers)


class ContextContentPooling(nn.Module):
    """LLaMA-VID context + content tokens for every frame, on the fused op.

    Args:
        vision_dim: C, the visual feature width (1,408 for EVA-ViT-G).
        llm_dim: the LLM hidden size the tokens are projected to (4,096 for Vicuna-7B).
        projector_type: content projector, ``"linear"`` or ``"mlp<k>x_gelu"`` (release:
            ``mm_projector_type``, default ``mlp2x_gelu``).
        content_grid: 1 = one content token (release ``compress_type="mean"``); g > 1 =
            g x g content tokens over the sqrt(P) x sqrt(P) grid (release ``"grid:g"``).
        frames_per_chunk: frames per op call (bounds the working memory).
        scale: score scale; default 1/sqrt(C) as released.
        fold_key_projection: apply W_k to the queries (default) instead of to every patch.

    ``forward(x, text_queries)``: x (N, P, C), text_queries (Lq, C) shared or (N, Lq, C) per
    frame. Returns (N, 1 + g*g, llm_dim).
    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        *,
        projector_type: str = "mlp2x_gelu",
        content_grid: int = 1,
        frames_per_chunk: int = 256,
        scale: float | None = None,
        fold_key_projection: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if vision_dim < 1 or llm_dim < 1:
            raise ValueError(f"vision_dim and llm_dim must be >= 1, got {vision_dim}, {llm_dim}")
        if isinstance(content_grid, bool) or not isinstance(content_grid, int) or content_grid < 1:
            raise ValueError(f"content_grid must be an int >= 1, got {content_grid!r}")
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        factory = {"device": device, "dtype": dtype}
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.content_grid = content_grid
        self.frames_per_chunk = frames_per_chunk
        self.scale = scale
        self.fold_key_projection = fold_key_projection
        self.key_projector = nn.Linear(vision_dim, vision_dim, **factory)
        self.val_projector = nn.Linear(vision_dim, llm_dim, **factory)
        self.mm_projector = build_projector(projector_type, vision_dim, llm_dim, **factory)

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.content_grid * self.content_grid

    def forward(self, x: torch.Tensor, text_queries: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.vision_dim:
            raise ValueError(f"x must be (N, P, C={self.vision_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        if (not isinstance(text_queries, torch.Tensor) or text_queries.dim() not in (2, 3)
                or text_queries.shape[-1] != self.vision_dim):
            raise ValueError(f"text_queries must be (Lq, C={self.vision_dim}) or (N, Lq, C)")
        n = x.shape[0]
        if text_queries.dim() == 3 and text_queries.shape[0] != n:
            raise ValueError(f"text_queries.shape[0] must equal N = {n}, got "
                             f"{tuple(text_queries.shape)}")
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.vision_dim)
        w = self.key_projector.weight
        if self.fold_key_projection:
            # (Q W_k) X^T = Q (X W_k^T)^T; Q b_k is constant over patches (cancels).
            queries = (text_queries.to(w.dtype) @ w).to(x.dtype)
        else:
            queries = text_queries.to(x.dtype)
        out = x.new_empty((n, self.tokens_per_frame, self.llm_dim),
                          dtype=self.val_projector.weight.dtype)
        step = self.frames_per_chunk
        for i in range(0, n, step):
            j = min(n, i + step)
            xc = x[i:j]
            qc = queries[i:j] if queries.dim() == 3 else queries
            keys = None
            if not self.fold_key_projection:
                keys = self.key_projector(xc.to(w.dtype)).to(x.dtype)
            pooled = context_content_pool(xc, qc, keys, scale=scale,
                                          content_grid=self.content_grid)
            pooled = pooled.to(self.val_projector.weight.dtype)
            out[i:j, :1] = self.val_projector(pooled[:, :1])
            out[i:j, 1:] = self.mm_projector(pooled[:, 1:])
        return out

    def load_released(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load ``vlm_att_key_projector.*``, ``vlm_att_val_projector.*`` and
        ``mm_projector.*`` from a released LLaMA-VID state dict (any key prefix)."""
        names = {"vlm_att_key_projector.": "key_projector.",
                 "vlm_att_val_projector.": "val_projector.",
                 "mm_projector.": "mm_projector."}
        mine = {}
        for k, t in state_dict.items():
            for rel, ours in names.items():
                pos = k.find(rel)
                if pos >= 0 and (pos == 0 or k[pos - 1] == "."):
                    mine[ours + k[pos + len(rel):]] = t
        self.load_state_dict(mine, strict=strict)

    def extra_repr(self) -> str:
        return (f"vision_dim={self.vision_dim}, llm_dim={self.llm_dim}, "
                f"content_grid={self.content_grid}, frames_per_chunk={self.frames_per_chunk}, "
                f"fold_key_projection={self.fold_key_projection}")
