"""``keyframe_select``: ViLAMP's differential keyframe selection (DKS) as one op, plus the
per-frame reference-index maps that feed :func:`lvlm_fast.ops.diff_weighted_pool`.

Spec: :mod:`lvlm_fast.reference.keyframe_select`. Layers: C++ ``csrc/keyframe_select.cpp``
(CPU) and Triton ``kernels/keyframe_select.py`` (CUDA) implement
``torch.ops.lvlm_fast.keyframe_select``; this module owns the schema, validation and the fake
kernel. Integer outputs: no autograd.

What the released code does (steven-ccq/ViLAMP), and what this op does:

* Greedy (``llava/model/multimodal_resampler/frame_selector.py``, ``SeqFrameSelector``):
  sort ``rel`` descending, walk it; break at the first ``rel < f2t_thrd``; skip visited;
  select, mark ``f2f[i] > f2f_thrd`` visited. Released defaults: ``f2f_thrd = 0.85``,
  ``f2t_thrd = -1`` (pass ``min_relevance=-1.0`` for that; the paper's floor is 0.2;
  ``None`` = no floor at all), ``max_frame_num = 32``. The release builds the full N x N
  similarity matrix and syncs with the host every step; here the work is O(k N E) at most
  and the extra memory O(N): a frame is visited exactly when its cosine to some frame
  selected before its turn exceeds the threshold, so the CPU kernel checks each visited
  candidate against the (<= k) frames already selected, and the GPU kernel sweeps the
  unvisited frames against each new pick.
* Ties in ``rel``: the release's ``torch.sort`` is not stable; we visit the lower frame
  index first. NaN ``rel`` (a NaN/inf in a frame or the query): the release would visit
  it first (``sort`` puts NaN on top); here such a frame is never selected by the greedy
  step (it may still be added by the fill), and a NaN similarity marks nothing.
* Budget fill (``SeqFrameSelector.distribute_frames``): see the reference; it always
  returns exactly ``min(k, N)`` frames, also when nothing was selected (one gap spanning
  the video: frames ``D, 2D, ...`` plus the remainder packed at the end). The
  ``linspace(0, N-1, max_frame_num)`` fallback in ``llava/model/llava_arch.py``
  (``encode_images``, ``if hard_probs.sum().item() == 0``) is therefore never reached in
  the release; this op reproduces what the release actually returns.
* ``fill=False``: ``indices`` still has the static length ``min(k, N)``: the greedy frames
  in time order first, then -1 padding.
* ``ref_index`` (N,): position in ``indices`` of the nearest keyframe at or before each
  frame, -1 before the first one (the ``ref_index`` of ``diff_weighted_pool`` with
  ``ref_bank`` = the keyframe features in ``indices`` order). See
  :func:`released_reference_index` for the release's reading.
"""

from __future__ import annotations

import math

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::keyframe_select"

torch.library.define(
    OP,
    "(Tensor frame_emb, Tensor query_emb, int k, float threshold, float? min_relevance, "
    "bool fill) -> (Tensor indices, Tensor ref_index)",
)


# --------------------------------------------------------------------------- fake kernel
@torch.library.register_fake(OP)
def _fake(frame_emb, query_emb, k, threshold, min_relevance, fill):
    n = frame_emb.shape[0]
    m = torch.sym_min(k, n)
    return (frame_emb.new_empty((m,), dtype=torch.int64),
            frame_emb.new_empty((n,), dtype=torch.int64))


# --------------------------------------------------------------------------- CUDA (Triton)
@torch.library.impl(OP, "CUDA")
def _cuda(frame_emb, query_emb, k, threshold, min_relevance, fill):
    from lvlm_fast.kernels.keyframe_select import keyframe_select_fwd

    return keyframe_select_fwd(frame_emb, query_emb, k, threshold, min_relevance, fill)


# --------------------------------------------------------------------------- CPU fallback
def reference_fwd(frame_emb, query_emb, k, threshold, min_relevance, fill):
    """Schema-shaped reference, used as the CPU kernel only if the C++ build is missing."""
    from lvlm_fast.reference.keyframe_select import keyframe_select as ref

    return ref(frame_emb, query_emb.reshape(-1), k, threshold=threshold,
               min_relevance=min_relevance, fill=fill)


CPU_FALLBACKS = {"keyframe_select": reference_fwd}


# --------------------------------------------------------------------------- index maps
def _check_indices(indices: object, num_frames: object) -> None:
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    v.check_int_tensor("indices", indices, 1)
    if indices.numel() and v.value_checks_allowed(indices):
        idx = indices.long()
        valid = idx >= 0
        m = int(valid.sum())
        if bool((idx < -1).any()) or bool(valid[m:].any()):
            raise ValueError("indices must hold keyframe numbers followed only by -1 padding, "
                             f"got {indices.tolist()[:16]}")
        kf = idx[:m]
        if m and int(kf.max()) >= num_frames:
            raise ValueError(f"indices values must be in [0, num_frames={num_frames}), "
                             f"got max {int(kf.max())}")
        if m > 1 and not bool((kf[1:] > kf[:-1]).all()):
            raise ValueError("indices must be strictly increasing (time order, no repeats), "
                             f"got {indices.tolist()[:16]}")


def _segment_position(indices: torch.Tensor, num_frames: int) -> torch.Tensor:
    # -1 padding becomes num_frames: it sorts last and is never <= a frame number
    idx = indices.long()
    key = torch.where(idx < 0, torch.full_like(idx, num_frames), idx)
    frames = torch.arange(num_frames, dtype=torch.int64, device=idx.device)
    return torch.searchsorted(key, frames, right=True) - 1


def reference_index_from_keyframes(indices: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per frame, the position in ``indices`` of the nearest keyframe at or before it.

    Args:
        indices: (K,) int keyframe numbers in time order (strictly increasing), optionally
            followed by -1 padding (as :func:`keyframe_select` returns with ``fill=False``).
        num_frames: N.

    Returns:
        (N,) int64 in [-1, K): -1 before the first keyframe. This is the ``ref_index`` of
        :func:`diff_weighted_pool` with ``ref_bank`` = the keyframes' features gathered in
        ``indices`` order (e.g. ``x[indices]``): the paper's reading (nearest preceding
        keyframe; frames before the first keyframe get no redundancy term).
        One ``searchsorted``, no host sync (value checks only on eager CPU tensors).
    """
    _check_indices(indices, num_frames)
    return _segment_position(indices, num_frames)


def released_reference_index(indices: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The released code's reference rows, with its indexing slip.

    In ``llava/model/llava_arch.py`` (``encode_images``, ``composer_type == 'sig_pooling'``
    and ``'average_pooling_res'``) the per-frame reference is built from ``img_embs``, the
    features of ALL N frames: frames before the first keyframe are compared with
    themselves (``img_embs[:first]``), and every frame of the i-th keyframe segment
    (keyframe i up to, not including, keyframe i+1; the keyframe itself included) is
    compared with ``img_embs[i]`` -- frame number i, not keyframe i.

    Returns:
        (N,) int64 in [0, N): rows of the bank of ALL frames. Pass the frames' own features
        as the bank, e.g. ``diff_weighted_pool(x, q, ref_bank=x, ref_index=this)`` (with
        the released projections: ``ref_bank`` = every frame's features, ``red`` = their
        B projection). Never -1. Same input contract as
        :func:`reference_index_from_keyframes`.
    """
    _check_indices(indices, num_frames)
    pos = _segment_position(indices, num_frames)
    frames = torch.arange(num_frames, dtype=torch.int64, device=pos.device)
    return torch.where(pos < 0, frames, pos)


# --------------------------------------------------------------------------- public API
def _validate(frame_emb, query_emb, k, threshold, min_relevance, fill):
    v.check_tensor("frame_emb", frame_emb, 2)
    n, e = frame_emb.shape
    if n == 0 or e == 0:
        raise ValueError(f"frame_emb must be (N, E) with N, E >= 1, got shape "
                         f"{tuple(frame_emb.shape)}")
    v.check_tensor("query_emb", query_emb, (1, 2))
    if query_emb.dim() == 2 and query_emb.shape[0] != 1:
        raise ValueError(f"query_emb must be (E,) or (1, E) with E = {e}, got shape "
                         f"{tuple(query_emb.shape)}")
    v.check_size("query_emb", query_emb, query_emb.dim() - 1, e, "frame_emb.shape[1] (E)")
    v.check_same("device", "frame_emb", frame_emb, query_emb=query_emb)
    v.check_same("dtype", "frame_emb", frame_emb, query_emb=query_emb)
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int (the keyframe budget), got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (the keyframe budget), got {k}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if not -1.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    if min_relevance is not None:
        if not isinstance(min_relevance, (int, float)) or isinstance(min_relevance, bool):
            raise TypeError(f"min_relevance must be a float or None, got "
                            f"{type(min_relevance).__name__}")
        if not math.isfinite(min_relevance):
            raise ValueError(f"min_relevance must be finite (or None), got {min_relevance}")
    if not isinstance(fill, bool):
        raise TypeError(f"fill must be a bool, got {type(fill).__name__}")


def keyframe_select(
    frame_emb: torch.Tensor,
    query_emb: torch.Tensor,
    k: int,
    *,
    threshold: float = 0.85,
    min_relevance: float | None = None,
    fill: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differential keyframe selection: relevant, mutually dissimilar frames.

    Args:
        frame_emb: (N, E) frame embeddings (e.g. CLIP image features), any strides.
        query_emb: (E,) or (1, E) query embedding (e.g. CLIP text features of the question).
        k: keyframe budget, >= 1 (released: 32).
        threshold: redundancy cosine in [-1, 1] (released: 0.85); a selected frame marks
            frames with cosine strictly above it.
        min_relevance: relevance floor (``rel < floor`` stops the walk); None = no floor.
            The release's default is -1.0, the paper's 0.2.
        fill: apply the released budget fill so exactly ``min(k, N)`` frames come out.

    Returns:
        ``(indices, ref_index)``: ``indices`` (min(k, N),) int64, time order (with
        ``fill=False`` the greedy frames first, then -1); ``ref_index`` (N,) int64 =
        :func:`reference_index_from_keyframes` of ``indices``.

    Greedy ties go to the lower frame index. Zero vectors have cosine 0. NaN relevance is
    never selected by the greedy step; a NaN similarity marks nothing. Cosines and the
    comparisons run in float32 (float64 for float64 inputs). No host sync on CUDA.
    """
    _validate(frame_emb, query_emb, k, threshold, min_relevance, fill)
    return torch.ops.lvlm_fast.keyframe_select(
        frame_emb, query_emb.reshape(-1), k, float(threshold),
        None if min_relevance is None else float(min_relevance), fill,
    )
