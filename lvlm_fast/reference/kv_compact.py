"""Reference for ``kv_compact``: InfiniPot-V-style budgeted KV compaction (arXiv 2506.15745;
released code aiha-lab/InfiniPot-V ``kvcache_utils.py::process_kv_cache``), as an op spec.

Layout: key (L, B, H, C, D) and value (L, B, H, C, Dv): every layer's cache buffer of a
window, C = capacity (``budget + window``). Rows ``[0, n)`` are valid, ``n = length``.
Everything is decided independently per (layer, batch, KV head), like the released code.

Regions of the valid rows (``p = prefix``, ``r = recent``):
  * protected prefix ``[0, min(p, n))`` (system prompt / text before the video): kept;
  * recent ``[max(p, n - r), n)`` (the newest ``r`` rows, whole frames): kept;
  * middle ``[p, n - r)``: candidates. ``k = budget - p - r`` of them are kept when
    ``n > budget``; when ``n <= budget`` every row is kept and nothing moves.

Scores of middle row i (query-agnostic; computed from the cached, post-RoPE keys and the
values, as the released code does):
  * TaR (temporal redundancy): with ``P = tokens_per_frame`` and ``F = r / P`` recent frames,
    the patch index of row i is ``j = P - 1 - ((n - r - 1 - i) mod P)`` (slots counted
    backwards from the first recent frame, so a window of whole frames is aligned exactly;
    after earlier compactions old rows are no longer frame-aligned, the same caveat as
    the released code's ``slot mod P``), and
    ``TaR_i = -mean_{f < F} cos(K_i, K_{n - r + f P + j})`` with keys L2-normalised
    (``x / max(||x||, 1e-9)``, so a zero key has cosine 0). High = unlike the recent frames.
  * VaN (value norm): ``VaN_i = ||V_i||_2`` over the head dim.
  * external: a caller-given (L, B, H, C) score (e.g. the attention mass from
    ``summary_attention(..., return_key_mass=True)``), used as is.

Selection (the method's split): ``primary_slots = k1`` middle rows are taken by the primary
score (TaR, or the external score), then the remaining ``k - k1`` by the secondary score
(VaN) among the middle rows not yet taken. The released code gets the same split by giving
TaR-selected rows the score ``max(VaN) + 1`` and taking a top-|C| on VaN.
Order within one score: higher wins; equal scores: the EARLIER row wins (deterministic);
NaN ranks lowest (as -inf; equal to -inf, then earlier wins); -0.0 == +0.0.

Compaction: kept rows keep their time order and move to ``dest = #kept rows before them``
(so dest <= source, rows only move towards the front); the new length is
``min(n, budget)``. Rows ``[new_length, C)`` are stale and must never be read.

Position rule (one rule, bounded however long the stream): a row's RoPE position is its
slot in the bounded buffer. A kept key moving from slot s to slot d is re-rotated by
``d - s`` positions (HF rotate_half convention, ``angle = delta * inv_freq`` in fp32), the
re-rotation ``evict_summaries`` does, so every position stays < C <= max positions.
M-RoPE (``mrope_section = (t, h, w)``, ``t + h + w = R/2``): the temporal frequency pairs
are shifted by the slot delta and the spatial pairs are left unrotated (the spatial ids are
bounded by the grid already). Which pair is temporal (:func:`temporal_pairs`):
  * blocked (Qwen2.5-VL, HF's ``apply_multimodal_rotary_pos_emb``): pair i iff ``i < t``;
  * interleaved (``mrope_interleaved``: Qwen3-VL, Qwen3.5, HF's
    ``apply_interleaved_mrope``): pair i is height iff ``i % 3 == 1 and i < 3h``, width
    iff ``i % 3 == 2 and i < 3w``, temporal otherwise.
``mrope_section=None`` is 1-D RoPE (every pair shifted).
Partial rotary (Qwen3.5: ``R = head_dim * partial_rotary_factor < D``): the rotated part
is the first R dims of the key, pairs ``(i, i + R/2)`` for ``i < R/2`` (HF's rotate_half on
``k[..., :R]``), ``inv_freq`` is (R/2,), and dims ``R .. D-1`` move unrotated. ``R`` is
``2 * len(inv_freq)``. A zero frequency is the identity exactly (cos 0 = 1, sin 0 = 0), so
``inv_freq = 0`` moves rows without any re-rotation (Video-XL's logical positions).

Not differentiable: an in-place inference-time cache edit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvlm_fast.reference.videoxl import apply_rope, rope_cos_sin

NORM_EPS = 1e-9


def _rank_key(s: torch.Tensor) -> torch.Tensor:
    """fp64 copy where NaN -> -inf and -0.0 -> +0.0 (the op's total order)."""
    s = s.double()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    return torch.where(s == 0, torch.zeros_like(s), s)


def top_k_earliest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` best rows of a 1-D score: higher first, ties -> the
    earlier index, NaN lowest. A stable sort of the negated key gives exactly that order."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(-_rank_key(scores), stable=True).indices
    return order[:k].sort().values


def tar_scores(key: torch.Tensor, n: int, prefix: int, recent: int,
               tokens_per_frame: int) -> torch.Tensor:
    """TaR of every row of one head's key (C, D); 0 outside the middle ``[prefix, n - r)``."""
    c = key.shape[0]
    out = torch.zeros(c, dtype=torch.float64)
    p, r, pf = prefix, recent, tokens_per_frame
    lo, hi = p, n - r
    if hi <= lo:
        return out
    kn = F.normalize(key.double(), dim=-1, eps=NORM_EPS)
    frames = r // pf
    for i in range(lo, hi):
        j = pf - 1 - ((n - r - 1 - i) % pf)
        cos = [torch.dot(kn[i], kn[n - r + f * pf + j]) for f in range(frames)]
        out[i] = -torch.stack(cos).mean()
    return out


def van_scores(value: torch.Tensor, n: int, prefix: int, recent: int) -> torch.Tensor:
    """VaN of every row of one head's value (C, Dv); 0 outside the middle."""
    out = torch.zeros(value.shape[0], dtype=torch.float64)
    lo, hi = prefix, n - recent
    if hi > lo:
        out[lo:hi] = value[lo:hi].double().norm(dim=-1)
    return out


def select_rows(primary: torch.Tensor, secondary: torch.Tensor, n: int, budget: int,
                prefix: int, recent: int, primary_slots: int) -> torch.Tensor:
    """Boolean keep mask (C,) of one head (see module doc)."""
    c = primary.shape[0]
    keep = torch.zeros(c, dtype=torch.bool)
    keep[:n] = True
    if n <= budget:
        return keep
    lo, hi = prefix, n - recent
    k = budget - prefix - recent
    k1 = min(primary_slots, k)
    keep[lo:hi] = False
    first = lo + top_k_earliest(primary[lo:hi], k1)
    keep[first] = True
    rest = torch.nonzero(~keep[lo:hi]).flatten() + lo
    second = rest[top_k_earliest(secondary[rest], k - k1)]
    keep[second] = True
    return keep


def temporal_pairs(pairs: int, mrope_section: list[int] | None,
                   interleaved: bool = False,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(pairs,) bool on ``device``: which rotary frequency pairs carry the temporal id
    (module doc); all of them for 1-D RoPE (``mrope_section=None``)."""
    i = torch.arange(pairs, device=device)
    if mrope_section is None:
        return torch.ones(pairs, dtype=torch.bool, device=device)
    t, h, w = mrope_section
    if not interleaved:
        return i < t
    hh = (i % 3 == 1) & (i < 3 * h)
    ww = (i % 3 == 2) & (i < 3 * w)
    return ~(hh | ww)


def rotation_freqs(inv_freq: torch.Tensor, mrope_section: list[int] | None,
                   interleaved: bool = False) -> torch.Tensor:
    """inv_freq (R/2,) with the pairs that must not rotate zeroed (M-RoPE spatial pairs)."""
    f = inv_freq.float().cpu().clone()
    f[~temporal_pairs(f.shape[0], mrope_section, interleaved)] = 0.0
    return f


@torch.no_grad()
def kv_compact(
    key: torch.Tensor,
    value: torch.Tensor,
    length: int,
    inv_freq: torch.Tensor,
    *,
    budget: int,
    prefix: int = 0,
    recent: int = 0,
    tokens_per_frame: int = 0,
    primary_slots: int = 0,
    scores: torch.Tensor | None = None,
    mrope_section: list[int] | None = None,
    mrope_interleaved: bool = False,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """In place on key (L, B, H, C, D) / value (L, B, H, C, Dv). Returns
    ``(new_length, keep, score)``: keep (L, B, H, C) bool over the OLD rows, score
    (2, L, B, H, C) fp32 = (primary, secondary) score of every old row (0 outside the
    middle). Primary/secondary are TaR/VaN (TaR = 0 when ``tokens_per_frame`` = 0), or
    the external ``scores`` and 0 when given. ``inv_freq`` (R/2,): R = the rotated dims
    (R < D: partial rotary), ``mrope_section`` / ``mrope_interleaved``: module doc."""
    nl, b, h, c, _ = key.shape
    n = max(0, min(int(length), c))
    keep = torch.zeros(nl, b, h, c, dtype=torch.bool)
    score = torch.zeros(2, nl, b, h, c, dtype=torch.float32)
    freqs = rotation_freqs(inv_freq, mrope_section, mrope_interleaved)
    for li in range(nl):
        for bi in range(b):
            for hi in range(h):
                kk, vv = key[li, bi, hi], value[li, bi, hi]
                if scores is not None:
                    prim = torch.zeros(c, dtype=torch.float64)
                    lo, up = prefix, n - recent
                    if up > lo:
                        prim[lo:up] = scores[li, bi, hi, lo:up].double()
                    sec = torch.zeros(c, dtype=torch.float64)
                elif 0 < tokens_per_frame <= recent:
                    prim = tar_scores(kk.cpu(), n, prefix, recent, tokens_per_frame)
                    sec = van_scores(vv.cpu(), n, prefix, recent)
                else:  # no TaR (tokens_per_frame = 0): VaN only
                    prim = torch.zeros(c, dtype=torch.float64)
                    sec = van_scores(vv.cpu(), n, prefix, recent)
                score[0, li, bi, hi], score[1, li, bi, hi] = prim.float(), sec.float()
                # select on the fp32 scores the kernels compute and store
                m = select_rows(prim.float(), sec.float(), n, budget, prefix, recent,
                                primary_slots)
                keep[li, bi, hi] = m
                move_kept(kk, vv, m, freqs)
    return min(n, budget), keep, score


def move_kept(key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
              freqs: torch.Tensor) -> None:
    """In place on one head's (C, D)/(C, Dv): kept rows to slots 0, 1, ... in time order,
    keys re-rotated by ``new slot - old slot`` with ``freqs`` (:func:`rotation_freqs`, R/2
    entries: the first R = 2 * len(freqs) dims rotate, the rest move as they are)."""
    src = torch.nonzero(keep.cpu()).flatten().to(key.device)
    dst = torch.arange(src.numel(), device=key.device)
    cos, sin = rope_cos_sin(dst - src, freqs.to(key.device))
    rot = 2 * freqs.shape[0]
    moved_k = key[src]  # fancy indexing gathers a copy first
    moved_k[:, :rot] = apply_rope(moved_k[:, :rot], cos, sin)
    moved_v = value[src]
    key[dst] = moved_k
    value[dst] = moved_v


__all__ = ["kv_compact", "move_kept", "rotation_freqs", "select_rows", "tar_scores",
           "temporal_pairs", "top_k_earliest", "van_scores"]
