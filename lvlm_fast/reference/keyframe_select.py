"""Reference for ViLAMP's differential keyframe selection (DKS) and the reference-index maps.

Spec (see shared/methods/vilamp.md; the fill rule as the released ``SeqFrameSelector``):

1. ``rel[n] = cos(E[n], t)``.
2. Greedy: visit frames by descending ``rel`` (ties: lower frame index first). Stop when
   ``k`` frames are selected or ``rel < min_relevance`` (when a floor is given). Skip a
   frame marked visited. Selecting frame ``i`` marks every ``j`` with
   ``cos(E[i], E[j]) > threshold`` (and ``i`` itself) visited.
3. Budget fill (``fill=True``) when fewer than ``k`` were selected, with ``R = k - s``
   frames missing:
     * gaps = maximal runs of unselected frames (the whole video if nothing was selected);
     * ``D`` = the smallest spacing in ``[1, N]`` such that
       ``sum_gaps (ceil(len / D) - 1) <= R``;
     * each gap ``[start, end]`` gets ``kg = ceil(len / D) - 1`` frames at
       ``start + j * ceil(len / (kg + 1))``, ``j = 1..kg``;
     * the ``R - sum kg`` still missing are the highest-index unselected frames.
   This yields exactly ``min(k, N)`` frames. An empty greedy selection takes the same
   path with one gap ``[0, N-1]`` (this is what the release runs; its later
   ``linspace(0, N-1, k)`` fallback in ``llava_arch.py`` is unreachable, see
   :mod:`lvlm_fast.ops.keyframe_select`).
4. Output in time order.

Cosine: ``cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))``, eps = 1e-8, computed in
float32 (float64 for float64 inputs), ``|a| = sqrt(sum a^2)``: a zero vector has cosine 0.
Comparisons with ``threshold`` / ``min_relevance`` happen in that same dtype.
Non-finite values: a frame whose ``rel`` is NaN is never selected by the greedy step (it
can still be added by the fill); a NaN similarity never marks a frame visited.

This module is the executable spec: plain loops over frames, slow, easy to check.
"""

from __future__ import annotations

import math

import torch

COS_EPS = 1e-8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``max(sqrt(sum x^2), eps)`` over the last dim, in the accumulation dtype."""
    x = x.to(acc_dtype(x.dtype))
    return torch.sqrt((x * x).sum(-1)).clamp_min(COS_EPS)


def cosine_to(frames: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``cos(frames[n], v)`` for every row n, (N,), accumulation dtype."""
    acc = acc_dtype(frames.dtype)
    f, v = frames.to(acc), v.to(acc)
    return (f * v).sum(-1) / (row_norms(v) * row_norms(f))


def greedy_select(
    frame_emb: torch.Tensor,
    query_emb: torch.Tensor,
    k: int,
    threshold: float = 0.85,
    min_relevance: float | None = None,
) -> list[int]:
    """Frames selected by the greedy step, in the order they were picked."""
    n = frame_emb.shape[0]
    acc = acc_dtype(frame_emb.dtype)
    rel = cosine_to(frame_emb, query_emb).tolist()
    thr = torch.tensor(threshold, dtype=acc)
    floor = None if min_relevance is None else float(torch.tensor(min_relevance, dtype=acc))
    # NaN relevance: never visited by the greedy walk
    order = sorted((i for i in range(n) if not math.isnan(rel[i])), key=lambda i: (-rel[i], i))
    visited = torch.zeros(n, dtype=torch.bool)
    picked: list[int] = []
    for i in order:
        if len(picked) == k:
            break
        if floor is not None and rel[i] < floor:
            break
        if visited[i]:
            continue
        picked.append(i)
        visited[i] = True
        visited |= cosine_to(frame_emb, frame_emb[i]) > thr
    return picked


def budget_fill(selected: list[int], num_frames: int, k: int) -> list[int]:
    """The released budget fill: ``selected`` frames plus the missing ones, time order."""
    chosen = set(selected)
    missing = k - len(chosen)
    gaps = []  # (start, end) of every maximal run of unselected frames
    start = None
    for f in range(num_frames + 1):
        free = f < num_frames and f not in chosen
        if free and start is None:
            start = f
        elif not free and start is not None:
            gaps.append((start, f - 1))
            start = None

    def needed(spacing: int) -> int:
        return sum(math.ceil((e - s + 1) / spacing) - 1 for s, e in gaps)

    spacing = next(d for d in range(1, num_frames + 1) if needed(d) <= missing)
    added = 0
    for s, e in gaps:
        length = e - s + 1
        kg = math.ceil(length / spacing) - 1
        step = math.ceil(length / (kg + 1))
        for j in range(1, kg + 1):
            chosen.add(min(s + j * step, e))
        added += kg
    left = missing - added
    for f in range(num_frames - 1, -1, -1):  # the rest: highest-index free frames
        if left <= 0:
            break
        if f not in chosen:
            chosen.add(f)
            left -= 1
    return sorted(chosen)


def reference_index(indices: list[int], num_frames: int) -> list[int]:
    """Per frame, the position in ``indices`` (time order) of the nearest keyframe at or
    before it; -1 before the first keyframe."""
    out, pos = [], -1
    for f in range(num_frames):
        while pos + 1 < len(indices) and indices[pos + 1] <= f:
            pos += 1
        out.append(pos)
    return out


def released_reference_index(indices: list[int], num_frames: int) -> list[int]:
    """The released merging's reference rows into the bank of ALL frames: frames before the
    first keyframe use themselves; every frame of the i-th keyframe segment (keyframe i up
    to the next keyframe) uses frame number ``i`` (the indexing slip)."""
    return [f if p < 0 else p for f, p in enumerate(reference_index(indices, num_frames))]


def keyframe_select(
    frame_emb: torch.Tensor,
    query_emb: torch.Tensor,
    k: int,
    *,
    threshold: float = 0.85,
    min_relevance: float | None = None,
    fill: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (min(k, N),) int64 in time order, ref_index (N,) int64). Without fill the
    greedy frames come first (time order) and the rest is -1."""
    n = frame_emb.shape[0]
    picked = greedy_select(frame_emb, query_emb, k, threshold, min_relevance)
    idx = budget_fill(picked, n, k) if fill else sorted(picked)
    m = min(k, n)
    idx = idx + [-1] * (m - len(idx))
    ref = reference_index([i for i in idx if i >= 0], n)
    dev = frame_emb.device
    return (torch.tensor(idx, dtype=torch.int64, device=dev),
            torch.tensor(ref, dtype=torch.int64, device=dev))
