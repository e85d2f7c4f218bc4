"""Seed-style ViLAMP baselines, written the way the released ViLAMP code does it.

These are the ``seed`` impls of ``speedup_vs_seed`` (see /work/shared/methods/vilamp.md).
They reproduce the released code's *costs* (what it materialises, where it syncs), with the
same math as the fused ops so the harness can check their outputs against the reference.

``seed_diff_weighted_pool`` — the released differential feature merging ("sig_pooling"),
parameter-free form (A = B = X, query already in the D-dim space):
  * the per-frame reference is materialised as an (N, P, D) tensor: frames before the first
    keyframe are copied as themselves, then for each keyframe segment the keyframe is
    ``unsqueeze(0).repeat(len, 1, 1)`` and the pieces are ``torch.cat``-ed;
  * the query is materialised as an (N, P, D) tensor with ``view(1, 1, -1).repeat(N, P, 1)``;
  * two ``F.cosine_similarity(..., dim=-1)`` over those (N, P, D) tensors, ``(a - b) / tau``,
    ``F.softmax`` over patches, ``mask * X`` (another (N, P, D)) and ``.sum(1)``.
  Differences from the release, both deliberate: (1) the released loop indexes frame ``idx``
  for the idx-th keyframe segment (an indexing slip); here the segment's own keyframe is used,
  the paper's intent and what the fused op computes; the cost is identical. (2) For
  N > 60 the release moves the cosines to the CPU in chunks of 60 frames and softmaxes in a
  Python loop over frames; on a CPU-only benchmark the ``.cpu()`` moves are no-ops, and we
  keep the single dense branch (the faster of the two on CPU), so the seed is if anything
  flattered.

``seed_keyframe_select`` — the released differential keyframe selection (SeqFrameSelector):
  * the full N x N frame-to-frame cosine matrix by normalised matmul (and N x 1 for the query);
  * a descending sort by relevance, then a Python ``while`` loop over frames that reads
    ``is_selected.sum().item()``, ``sorted_indices[idx].item()``, the score and the visited
    flag as host values each step (one host sync per read on a GPU), and ORs one row of the
    matrix into the visited mask for each selected frame;
  * the budget fill (``distribute_frames``) in pure Python over a list of N ints;
  * output: the selected frame indices in time order (``nonzero`` of the mask).
  The relevance floor is a parameter (released default -1, method note 0.2); the benchmark
  passes the same value to every impl.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ differential merging
def seed_diff_weighted_pool(
    img_embs: torch.Tensor,
    key_frame_positions: list[int],
    text_emb: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """img_embs (N, P, D); key_frame_positions: sorted frame numbers of the keyframes;
    text_emb (D,). Returns one token per frame, (N, D)."""
    n, p, _ = img_embs.shape
    bounds = [*list(key_frame_positions), n]
    pieces = []
    if bounds[0] > 0:  # frames before the first keyframe compare with themselves
        pieces.append(img_embs[: bounds[0]])
    for i in range(len(bounds) - 1):
        key_frame = img_embs[bounds[i]]
        pieces.append(key_frame.unsqueeze(0).repeat(bounds[i + 1] - bounds[i], 1, 1))
    key_frame_expanded = torch.cat(pieces)  # (N, P, D)
    query_expanded = text_emb.view(1, 1, -1).repeat(n, p, 1)  # (N, P, D)

    score_i2q = F.cosine_similarity(query_expanded, img_embs, dim=-1)
    score_i2k = F.cosine_similarity(key_frame_expanded, img_embs, dim=-1)
    score = (score_i2q - score_i2k) / tau
    mask = F.softmax(score, dim=-1).unsqueeze(-1)
    out = mask * img_embs
    return out.sum(1)


# ------------------------------------------------------------------ keyframe selection
def _cos_sim_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs cosine by normalised matmul, (len(a), len(b)) — the full matrix."""
    a = F.normalize(a, p=2, dim=1)
    b = F.normalize(b, p=2, dim=1)
    return a @ b.T


def _budget_fill(is_selected: list[int], budget: int) -> list[int]:
    """Spread the frames still missing from ``budget`` evenly through the gaps between the
    selected ones (smallest spacing whose per-gap splits fit), then top up from the end.
    Pure-Python, the way the release does it."""
    n = len(is_selected)
    missing = budget - sum(is_selected)
    chosen = [i for i, v in enumerate(is_selected) if v == 1]
    gaps: list[tuple[int, int]] = []
    if not chosen:
        gaps.append((0, n - 1))
    else:
        if chosen[0] > 0:
            gaps.append((0, chosen[0] - 1))
        for a, b in itertools.pairwise(chosen):
            if a + 1 <= b - 1:
                gaps.append((a + 1, b - 1))
        if chosen[-1] < n - 1:
            gaps.append((chosen[-1] + 1, n - 1))

    def needed(spacing: int) -> int:
        return sum(max(0, math.ceil((e - s + 1) / spacing) - 1) for s, e in gaps)

    lo, hi = 1, n
    while lo < hi:  # smallest spacing whose splits fit in the missing budget
        mid = (lo + hi) // 2
        if needed(mid) <= missing:
            hi = mid
        else:
            lo = mid + 1
    spacing = lo

    out = list(is_selected)
    added = 0
    for s, e in gaps:
        length = e - s + 1
        k = math.ceil(length / spacing) - 1
        if k <= 0:
            continue
        added += k
        step = math.ceil(length / (k + 1))
        for j in range(k):
            out[min(s + step * (j + 1), e)] = 1
    left = missing - added
    for s, e in reversed(gaps):
        if left <= 0:
            break
        for pos in range(e, s - 1, -1):
            if out[pos] == 0:
                out[pos] = 1
                left -= 1
                if left == 0:
                    break
    return out


def seed_keyframe_select(
    img_embs: torch.Tensor,
    text_emb: torch.Tensor,
    max_frame_num: int = 32,
    f2f_thrd: float = 0.85,
    f2t_thrd: float = 0.2,
) -> torch.Tensor:
    """img_embs (N, E), text_emb (E,) -> selected frame indices (int64), time order."""
    device = img_embs.device
    f2f_scores = _cos_sim_matrix(img_embs, img_embs)  # (N, N), all of it
    f2t_scores = _cos_sim_matrix(img_embs, text_emb.view(1, -1)).reshape(-1)
    frame_num = f2t_scores.shape[0]
    is_visited = torch.zeros(frame_num, dtype=torch.bool, device=device)
    is_selected = torch.zeros(frame_num, dtype=torch.long, device=device)

    sorted_scores, sorted_indices = torch.sort(f2t_scores, descending=True)
    idx = 0
    while idx < frame_num and is_selected.sum().item() < max_frame_num:  # sync per step
        if sorted_scores[idx] < f2t_thrd:  # tensor -> bool: another sync
            break
        cur = sorted_indices[idx].item()
        if is_visited[cur]:
            idx += 1
            continue
        is_visited[cur] = True
        is_selected[cur] = 1
        is_visited |= f2f_scores[cur] > f2f_thrd
        idx += 1

    mask = _budget_fill(is_selected.tolist(), max_frame_num)
    mask_t = torch.tensor(mask, dtype=torch.long, device=device)
    return torch.nonzero(mask_t).flatten()
