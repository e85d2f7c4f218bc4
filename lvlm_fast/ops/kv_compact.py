"""``kv_compact``: InfiniPot-V-style budgeted KV compaction, in place, one launch for every
layer and KV head of a window, with its query-agnostic scores computed in the same kernel.

Spec (regions, TaR/VaN, selection order, ties, position rule):
:mod:`lvlm_fast.reference.kv_compact`. In short, per (layer, batch, KV head) of a
(L, B, H, C, D) key / (L, B, H, C, Dv) value buffer holding ``n = length`` valid rows:
keep the protected prefix ``[0, p)`` and the newest ``recent`` rows; if ``n > budget``
keep ``k = budget - p - recent`` of the middle rows ``[p, n - recent)``: ``primary_slots``
by the primary score (TaR, or caller-given ``scores``), the rest by the secondary score
(VaN); ties go to the earlier row. Kept rows move, in time order, to the front; each key is
re-rotated by its slot delta (``new slot - old slot``) so positions are slots of the bounded
buffer and never pass C. New length = ``min(n, budget)``. RoPE layouts: 1-D, blocked
M-RoPE (Qwen2.5-VL) and interleaved M-RoPE (Qwen3-VL) are the kernels' own rotation
(spatial pairs at frequency 0 = the identity exactly); partial rotary (Qwen3.5, pairs
``(i, i + R/2)`` the kernels' ``(i, i + D/2)`` pairing cannot express) is moved unrotated
by the kernel and its temporal pairs re-rotated by a small elementwise pass over the
first ``budget`` rows (:func:`_kernel_rotation`), with no host sync.

Why scores live inside this op (the "fused" choice): the selection needs every middle
row's score before the first row can move, and one head's K/V (C x D) does not fit on
chip, so any design reads K/V once for the scores and once more for the rows that move.
Computing TaR and VaN in the compaction kernel's first phase costs no extra pass over the
cache, no (L, B, H, C) round trip between launches and no second launch. TaR uses the
linearity of the mean of cosines: ``-mean_f cos(K_i, K_{f,j}) = -K^_i . M_j`` with
``M_j = mean_f K^_{f,j}`` (a (P, D) fp32 table per head built from the recent keys first),
so each middle key is read once instead of F times.

Returned: ``new_length`` (0-d int64 on the buffers' device, no host sync), ``keep``
(L, B, H, C) bool over the OLD rows, ``score`` (2, L, B, H, C) fp32: the (primary,
secondary) score of each old row, 0 outside the middle (for inspection, ablations and
the quality proxy).

Caller-given scores (e.g. the attention mass each key got from the window's queries,
``summary_attention(q, k, v, return_key_mass=True)`` -> (B, S) per layer): stack them to
(L, B, S), pad/expand to (L, B, H, C) (``expand`` views are fine: strides are honoured)
and pass ``scores=``; all ``k`` selectable slots then go to that score.

Race freedom: the kept rows' destinations are ``dest(i) = #kept rows before i <= i``.
Both kernels move rows of one (layer, batch, head) in increasing i (C++: one task per
head, row by row, each row read fully before its destination is written; Triton: one
program per head, blocks of rows in order, loads of a block before a barrier, stores
after it). A row's destination is never a row that a later block still has to read
(dest(i) <= i < every later source), so in-place moves are safe without scratch.

Using it from a cache (e.g. a ``stream`` strategy over ``PreallocatedLayer``s): allocate
one stacked buffer per K and V, ``key = torch.empty(L, B, Hkv, budget + window, D)``, and
give layer l the view ``key[l]`` as its ``key_buffer`` (the per-layer list is accepted and
turned back into the stacked view without a copy, :func:`stacked_layer_view`). After each
window is appended (``length`` rows), call ``kv_compact(key, value, length, budget=...)``
once for all layers, then set every layer's host length to ``min(length, budget)`` (the
same number ``new_length`` holds on device: no sync needed) and refresh its views.
Positions stay slots: the model's default positions (``get_seq_length() + arange``) are
then exactly right for the next window and the question, all below ``budget + window``.

Not differentiable (an in-place inference-time cache edit): inputs that require grad are
rejected. Layers: C++ ``csrc/kv_compact.cpp`` (CPU), Triton ``kernels/kv_compact.py``
(CUDA), a fake kernel for meta/FakeTensor (outputs depend only on shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::kv_compact"

torch.library.define(
    OP,
    "(Tensor(a!) key, Tensor(b!) value, Tensor length, Tensor inv_freq, Tensor? scores, "
    "int budget, int prefix, int recent, int tokens_per_frame, int primary_slots, "
    "int rotary_pairs) -> (Tensor new_length, Tensor keep, Tensor score)",
)

DEFAULT_TAR_RATIO = 0.5  # the released code's tar_ratio default


@torch.library.register_fake(OP)
def _fake(key, value, length, inv_freq, scores, budget, prefix, recent, tokens_per_frame,
          primary_slots, rotary_pairs):
    nl, b, h, c, _ = key.shape
    new_length = key.new_empty((), dtype=torch.int64)
    keep = key.new_empty((nl, b, h, c), dtype=torch.bool)
    score = key.new_empty((2, nl, b, h, c), dtype=torch.float32)
    return new_length, keep, score


@torch.library.impl(OP, "CUDA")
def _cuda(key, value, length, inv_freq, scores, budget, prefix, recent, tokens_per_frame,
          primary_slots, rotary_pairs):
    from lvlm_fast.kernels.kv_compact import kv_compact_fwd

    return kv_compact_fwd(key, value, length, inv_freq, scores, budget, prefix, recent,
                          tokens_per_frame, primary_slots, rotary_pairs)


def reference_impl(key, value, length, inv_freq, scores, budget, prefix, recent,
                   tokens_per_frame, primary_slots, rotary_pairs):
    """CPU fallback only if the C++ build is missing."""
    from lvlm_fast.reference.kv_compact import kv_compact as ref

    d = key.shape[-1]
    section = None if rotary_pairs == d // 2 else [rotary_pairs, d // 2 - rotary_pairs, 0]
    new_len, keep, score = ref(key, value, int(length), inv_freq, budget=budget,
                               prefix=prefix, recent=recent, tokens_per_frame=tokens_per_frame,
                               primary_slots=primary_slots, scores=scores,
                               mrope_section=section)
    return torch.tensor(new_len, dtype=torch.int64), keep, score


CPU_FALLBACKS = {"kv_compact": reference_impl}


@dataclasses.dataclass(frozen=True)
class KVCompactResult:
    """``new_length``: 0-d int64 device tensor (== ``min(length, budget)``); ``keep``:
    (L, B, H, C) bool over the old rows; ``score``: (2, L, B, H, C) fp32 (primary,
    secondary) scores of the old rows, 0 outside the middle."""

    new_length: torch.Tensor
    keep: torch.Tensor
    score: torch.Tensor


def stacked_layer_view(buffers: torch.Tensor | Sequence[torch.Tensor], name: str
                       ) -> torch.Tensor:
    """(L, B, H, C, D) view of per-layer buffers without a copy.

    A 5-D tensor is returned as is. A sequence of 4-D (B, H, C, D) layer buffers must be
    views of ONE storage with the same shape/strides, spaced by one constant offset (e.g.
    ``stacked = torch.empty(L, B, H, C, D); layer.key_buffer = stacked[l]``); anything else
    would need a copy (or one launch per layer) and is rejected."""
    if isinstance(buffers, torch.Tensor):
        v.check_tensor(name, buffers, 5)
        return buffers
    if not isinstance(buffers, Sequence) or not buffers:
        raise TypeError(f"{name} must be a 5-D tensor or a non-empty sequence of 4-D tensors")
    for i, t in enumerate(buffers):
        v.check_tensor(f"{name}[{i}]", t, 4)
    t0 = buffers[0]
    if len(buffers) == 1:
        return t0.unsqueeze(0)
    step = buffers[1].storage_offset() - t0.storage_offset()
    base = t0.untyped_storage().data_ptr()
    for i, t in enumerate(buffers):
        if (t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype
                or t.device != t0.device or t.untyped_storage().data_ptr() != base
                or t.storage_offset() != t0.storage_offset() + i * step):
            raise ValueError(
                f"{name}: the layer buffers must be equally spaced views of one storage "
                f"(allocate one (L, B, H, C, D) tensor and give layer l the view [l]); "
                f"{name}[{i}] is not"
            )
    return t0.as_strided((len(buffers), *t0.shape), (step, *t0.stride()),
                         t0.storage_offset())


def kv_compact(
    key: torch.Tensor | Sequence[torch.Tensor],
    value: torch.Tensor | Sequence[torch.Tensor],
    length: int | torch.Tensor,
    *,
    budget: int,
    inv_freq: torch.Tensor,
    prefix: int = 0,
    recent: int = 0,
    tokens_per_frame: int = 0,
    tar_ratio: float | None = None,
    scores: torch.Tensor | None = None,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = False,
    rotary_dim: int | None = None,
) -> KVCompactResult:
    """Compact every layer's cache of a window to ``budget`` rows, in place (module doc).

    Args:
        key, value: (L, B, H, C, D) / (L, B, H, C, Dv) buffers (last dim unit-stride, D even),
            or sequences of L per-layer (B, H, C, D) buffers that are views of one stacked
            tensor (:func:`stacked_layer_view`). Post-RoPE keys at position = row.
        length: valid rows n (host int, 0 <= n <= C; or a 1-element int64 tensor on the
            buffers' device, clamped to [0, C] in the kernel: no host sync).
        budget: rows kept in total (prefix + selected + recent) when n > budget; the new
            length is ``min(n, budget)``. Needs ``budget >= prefix + recent``.
        inv_freq: (R/2,) RoPE inverse frequencies of the model (R = ``rotary_dim``).
        prefix: protected leading rows (system prompt, text before the video).
        recent: protected newest rows (whole frames: a multiple of ``tokens_per_frame``).
        tokens_per_frame: P, tokens per frame (TaR's patch index); 0 = no TaR (then
            ``tar_ratio`` must be 0 or ``scores`` given).
        tar_ratio: share of the ``k = budget - prefix - recent`` selectable slots filled by
            TaR (``round(tar_ratio * k)``, half up); the rest by VaN. Default 0.5 (the
            released code's default; note its ratio counts the recent frames inside TaR's
            share). Not allowed with ``scores``.
        scores: optional (L, B, H, C) caller-given score (higher = keep), e.g. attention
            mass; then every selectable slot goes to it.
        mrope_section: None for 1-D RoPE, or M-RoPE's (t, h, w) with t + h + w = R/2: only
            the temporal pairs are shifted by the slot delta.
        mrope_interleaved: the sections are interleaved across the pairs (Qwen3-VL,
            Qwen3.5: :func:`lvlm_fast.reference.kv_compact.temporal_pairs`) instead of
            blocked (Qwen2.5-VL). Needs ``mrope_section``.
        rotary_dim: R, the rotated dims of a key (None = D; partial rotary as Qwen3.5:
            R < D, the first R dims rotate with pairs ``(i, i + R/2)``, the rest move
            unrotated; 0 = no re-rotation at all). Even, 0 <= R <= D.

    Returns:
        :class:`KVCompactResult` (new_length tensor, keep mask, scores).
    """
    key = stacked_layer_view(key, "key")
    value = stacked_layer_view(value, "value")
    c, d = key.shape[3], key.shape[4]
    if value.shape[:4] != key.shape[:4]:
        raise ValueError(f"value must be (L, B, H, C, Dv) = {tuple(key.shape[:4])} + (Dv,), "
                         f"got {tuple(value.shape)}")
    v.check_same("device", "key", key, value=value, inv_freq=inv_freq)
    v.check_same("dtype", "key", key, value=value)
    for name, t in (("key", key), ("value", value), ("scores", scores)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} requires grad: kv_compact is an in-place inference "
                             "cache edit and is not differentiable")
    v.check_tensor("inv_freq", inv_freq, 1)
    # the kernels' rotation is rotate_half over the whole head dim: validate the layout
    # (even head dim, unit-stride rows) with a (D/2,) stand-in, inv_freq against R below
    v.check_rope_kv(key, value, inv_freq.new_zeros(d // 2))
    rot = d if rotary_dim is None else rotary_dim
    v.check_int("rotary_dim", rot, 0)
    if rot > d or rot % 2:
        raise ValueError(f"rotary_dim must be even and <= the head dim D = {d}, got {rot}")
    half_name = "D/2" if rotary_dim is None else "rotary_dim/2"
    if inv_freq.shape[0] != rot // 2:
        raise ValueError(f"inv_freq must be ({half_name} = {rot // 2},), got "
                         f"{tuple(inv_freq.shape)}")
    v.check_int("budget", budget, 1)
    v.check_int("prefix", prefix, 0)
    v.check_int("recent", recent, 0)
    v.check_int("tokens_per_frame", tokens_per_frame, 0)
    if prefix + recent > budget:
        raise ValueError(f"budget must be >= prefix + recent = {prefix + recent} (both are "
                         f"always kept), got {budget}")
    k = budget - prefix - recent
    if scores is not None:
        if tar_ratio is not None:
            raise ValueError("tar_ratio must not be given with scores (every selectable slot "
                             "goes to the given scores)")
        v.check_tensor("scores", scores, 4)
        if scores.shape != key.shape[:4]:
            raise ValueError(f"scores must be (L, B, H, C) = {tuple(key.shape[:4])}, got "
                             f"{tuple(scores.shape)}")
        v.check_same("device", "key", key, scores=scores)
        primary_slots, tpf = k, 0
    else:
        ratio = DEFAULT_TAR_RATIO if tar_ratio is None else tar_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
            raise ValueError(f"tar_ratio must be a number in [0, 1], got {tar_ratio!r}")
        primary_slots = int(ratio * k + 0.5)
        tpf = tokens_per_frame
        if primary_slots > 0 or tpf > 0:
            if tpf < 1:
                raise ValueError("tokens_per_frame must be >= 1 for TaR (tar_ratio > 0); "
                                 f"got {tokens_per_frame} (pass tar_ratio=0 for VaN only)")
            if recent < tpf or recent % tpf:
                raise ValueError(f"recent must be a positive multiple of tokens_per_frame = "
                                 f"{tpf} (TaR compares against whole recent frames), got "
                                 f"{recent}")
    if not isinstance(mrope_interleaved, bool):
        raise TypeError(f"mrope_interleaved must be a bool, got {mrope_interleaved!r}")
    sec = None
    if mrope_section is not None:
        sec = list(mrope_section)
        if len(sec) != 3 or any(not isinstance(s, int) or isinstance(s, bool) or s < 0
                                for s in sec) or sum(sec) != rot // 2:
            raise ValueError(f"mrope_section must be 3 non-negative ints summing to "
                             f"{half_name} = {rot // 2}, got {mrope_section!r}")
    elif mrope_interleaved:
        raise ValueError("mrope_interleaved=True needs mrope_section")
    kernel_freq, rotary_pairs, post = _kernel_rotation(inv_freq, d, rot, sec,
                                                       mrope_interleaved)
    if isinstance(length, torch.Tensor):
        v.check_int_tensor("length", length, length.dim())
        if length.numel() != 1 or length.dtype != torch.int64:
            raise ValueError(f"length must be a host int or a 1-element int64 tensor, got "
                             f"{length.dtype} shape {tuple(length.shape)}")
        v.check_same("device", "key", key, length=length)
        length_t = length.reshape(())
    else:
        v.check_int("length", length, 0)
        if length > c:
            raise ValueError(f"length must be <= the buffer capacity key.shape[3] = {c}, "
                             f"got {length}")
        length_t = torch.full((), length, dtype=torch.int64, device=key.device)
    new_length, keep, score = torch.ops.lvlm_fast.kv_compact(
        key, value, length_t, kernel_freq, scores, budget, prefix, recent, tpf, primary_slots,
        rotary_pairs)
    if post is not None:
        _rerotate_kept(key, keep, budget, *post)
    return KVCompactResult(new_length, keep, score)


def _kernel_rotation(inv_freq: torch.Tensor, d: int, rot: int, sec: list[int] | None,
                     interleaved: bool
                     ) -> tuple[torch.Tensor, int, tuple[torch.Tensor, int] | None]:
    """How the kernels (rotate_half over all D dims, the first ``rotary_pairs`` pairs) are
    driven for a RoPE layout, without changing them: ``(inv_freq for the kernel,
    rotary_pairs, post)``.

    * full rotary, 1-D or blocked M-RoPE: the model's inv_freq, ``rotary_pairs`` = all
      pairs or the temporal section ``t`` (the kernels' native layouts);
    * full rotary, interleaved M-RoPE: inv_freq with the spatial pairs zeroed, all pairs
      "rotated": angle 0 is the identity exactly (cos 0 = 1, sin 0 = 0 in fp32, and
      ``x * 1 + y * 0`` rounds back to x), so only the temporal pairs move;
    * partial rotary (R < D: pairs ``(i, i + R/2)``, which the kernels' ``(i, i + D/2)``
      pairing cannot express): the kernel moves the rows unrotated (``rotary_pairs`` = 0)
      and ``post = (freqs, R)`` re-rotates the kept rows' temporal pairs afterwards
      (:func:`_rerotate_kept`: elementwise, over the temporal pairs of the first
      ``budget`` rows only; R = 0 or no temporal pair: nothing to do)."""
    from lvlm_fast.reference.kv_compact import temporal_pairs

    pairs = rot // 2
    if rot == d and not interleaved:
        return inv_freq, (pairs if sec is None else sec[0]), None
    if rot == d:  # the mask built where inv_freq lives: no host-to-device copy
        mask = temporal_pairs(pairs, sec, interleaved, device=inv_freq.device)
        return inv_freq * mask.to(inv_freq.dtype), d // 2, None
    mask = temporal_pairs(pairs, sec, interleaved)  # on the host: nonzero without a sync
    idx = torch.nonzero(mask).flatten()
    post = None if idx.numel() == 0 else (
        (idx.to(inv_freq.device), inv_freq.float()[idx.to(inv_freq.device)]), rot)
    return inv_freq.new_zeros(d // 2), 0, post


def _rerotate_kept(key: torch.Tensor, keep: torch.Tensor, budget: int,
                   pair_freq: tuple[torch.Tensor, torch.Tensor], rot: int) -> None:
    """Partial rotary, after the kernel moved the kept rows unrotated: rotate each kept
    key's temporal pairs ``(i, i + R/2)`` by its slot delta (``new - old``), fp32 angles
    ``delta * inv_freq[i]`` (HF rotate_half). The deltas come from ``keep`` on the device
    (new slot = kept rows before it), so nothing syncs with the host; rows at or past the
    number kept get delta 0 (identity). Only the first ``min(budget, C)`` rows can hold a
    kept row."""
    idx, freq = pair_freq
    c = key.shape[3]
    cap = min(budget, c)
    dest = keep.to(torch.int64).cumsum(-1) - 1  # new slot of each kept old row
    delta = dest - torch.arange(c, device=key.device)
    by_dest = torch.zeros(*keep.shape[:3], cap + 1, dtype=torch.int64, device=key.device)
    by_dest.scatter_(-1, torch.where(keep, dest, cap).clamp_(max=cap), delta)
    ang = by_dest[..., :cap, None].float() * freq  # (L, B, H, cap, pairs)
    cos, sin = ang.cos(), ang.sin()
    half = rot // 2
    rows = key[..., :cap, :]
    x1 = rows[..., idx].float()
    x2 = rows[..., idx + half].float()
    rows[..., idx] = (x1 * cos - x2 * sin).to(key.dtype)
    rows[..., idx + half] = (x2 * cos + x1 * sin).to(key.dtype)


__all__ = ["KVCompactResult", "kv_compact", "stacked_layer_view"]
