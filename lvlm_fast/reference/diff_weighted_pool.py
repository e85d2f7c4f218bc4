"""Reference for ViLAMP's differential feature merging (DFM), parameter-free core.

Per frame n and patch p (ViLAMP eq. for "SigPooling", see shared/methods/vilamp.md):

    s[n, p] = ( cos(q[n], A[n, p]) - cos(R[ref[n], p], B[n, p]) ) / tau
    w[n, :] = softmax_p s[n, :]
    out[n]  = sum_p w[n, p] * X[n, p]

``ref[n] = -1`` drops the redundancy term for that frame (frames before the first keyframe).
``cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))`` with eps = 1e-8, the same convention
as ``torch.nn.functional.cosine_similarity``: a zero vector has cosine 0, never NaN.
NaN inputs propagate to the frames they touch (they are not checked for).
"""

from __future__ import annotations

import torch

COS_EPS = 1e-8


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Cosine similarity over the last dim, computed in float32 (float64 stays float64)."""
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(acc), b.to(acc)
    na = a.norm(dim=-1).clamp_min(eps)
    nb = b.norm(dim=-1).clamp_min(eps)
    return (a * b).sum(-1) / (na * nb)


def diff_weighted_pool(
    x: torch.Tensor,
    query: torch.Tensor,
    ref_bank: torch.Tensor | None = None,
    ref_index: torch.Tensor | None = None,
    *,
    rel: torch.Tensor | None = None,
    red: torch.Tensor | None = None,
    tau: float | torch.Tensor = 1.0,
    return_weights: bool = False,
):
    """x (N, P, D); query (Da,) or (N, Da); ref_bank (K, P, Db); ref_index (N,) in [-1, K);
    rel (N, P, Da) and red (N, P, Db) default to x. Returns out (N, D) [, weights (N, P)]."""
    rel = x if rel is None else rel
    red = x if red is None else red
    q = query if query.dim() == 2 else query.unsqueeze(0)
    score = cosine(q.unsqueeze(1), rel)  # (N, P)
    if ref_bank is not None:
        has_ref = ref_index >= 0
        bank_rows = ref_bank[ref_index.clamp_min(0).long()]  # (N, P, Db)
        # where, not a 0/1 product: a NaN bank row must not reach frames with ref = -1
        redundancy = torch.where(has_ref.unsqueeze(1), cosine(bank_rows, red), 0.0)
        score = score - redundancy
    score = score / tau
    weights = torch.softmax(score, dim=1)
    out = torch.einsum("np,npd->nd", weights.to(score.dtype), x.to(score.dtype)).to(x.dtype)
    if return_weights:
        return out, weights.to(x.dtype)
    return out
