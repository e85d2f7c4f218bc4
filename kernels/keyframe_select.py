"""Triton kernels for ``keyframe_select`` (ViLAMP differential keyframe selection).

Spec: :mod:`lvlm_fast.reference.keyframe_select`; definitions (ties, NaN, fill, static
shapes) in :mod:`lvlm_fast.ops.keyframe_select`.

The greedy walk "visit frames by descending relevance, skip visited, select, mark every
frame whose cosine to the pick exceeds the threshold" is run as: next pick = the unvisited
eligible frame with the highest relevance (ties: lowest index). Three kernels, all over
frame blocks of BLOCK_N rows, the embedding dim walked in BLOCK_E column tiles:

* ``_keyframe_select_prep_kernel`` (once): per frame the norm ``max(|E[n]|, eps)`` and
  ``rel[n] = E[n].t / (|t| |E[n]|)``; frames with NaN ``rel`` or ``rel < floor`` start
  visited (never picked); per block the best candidate (max rel, min index) is written.
* ``_keyframe_select_pick_kernel`` (one program): reduces the per-block candidates to the
  next pick, or -1 when none is left, and stores it in ``picks[step]`` on the device.
* ``_keyframe_select_fwd_kernel`` (per step): reads ``picks[step]``; for every unvisited
  frame of its block computes ``cos(E[pick], E[n])`` and marks it visited when ``> thr``
  (the pick itself is marked too); rows already visited are masked out of the loads, so a
  step reads only the frames still in play; then writes the block's best remaining
  candidate. With pick = -1 it marks nothing and reports no candidate, so every later
  pick is -1 too.

The launcher runs prep, pick, then (fwd, pick) ``min(k, N) - 1`` times: 2 min(k, N)
launches, no host sync, O(k N E) reads at most, O(N) extra memory, never an N x N matrix.
The budget fill, time ordering and ``ref_index`` are O(N + k log k) device tensor ops
(sort, cumsum, searchsorted, scatter; no ``nonzero_static``, which has no CUDA kernel before
torch 2.6), also without a host sync.

Masking: rows >= N and columns >= E load 0 and are never stored; the row offset is int64
(N x stride can pass 2^31). Accumulation is fp32 (fp64 for fp64 inputs) in the dtype of
the ``norm`` buffer; square root and division are the IEEE-rounded ones (``sqrt_rn``,
``div_rn``) so cosines follow the reference's formula and operand order exactly. The
embedding dim must be unit-stride (the launcher copies once otherwise). Launchers take the
op's arguments, return its tuple and do not assert CUDA (tier 1 runs them on CPU tensors
with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COS_EPS = tl.constexpr(1e-8)


# --------------------------------------------------------------------------- helpers
@triton.jit
def _sqrt(x, IS_F64: tl.constexpr):
    if IS_F64:
        return tl.sqrt(x)  # fp64 sqrt is IEEE-rounded
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(a, b, IS_F64: tl.constexpr):
    if IS_F64:
        return a / b  # fp64 division is IEEE-rounded
    else:
        return tl.div_rn(a, b)


@triton.jit
def _block_best(rel, cand, rows, N):
    """(max rel over candidate rows, lowest such row) of one block; (-inf, N) if none."""
    v = tl.where(cand, rel, float("-inf"))
    bv = tl.max(v, axis=0)
    bi = tl.min(tl.where(cand & (v == bv), rows, N), axis=0)
    return bv, bi


# --------------------------------------------------------------------------- kernels
@triton.jit
def _keyframe_select_prep_kernel(
    e_ptr, q_ptr, norm_ptr, rel_ptr, vis_ptr, best_v_ptr, best_i_ptr, param_ptr,
    N, E, stride_n,
    HAS_FLOOR: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    acc_ty = norm_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_n
    dot = tl.zeros([BLOCK_N], dtype=acc_ty)
    ss = tl.zeros([BLOCK_N], dtype=acc_ty)
    qq = tl.zeros([BLOCK_E], dtype=acc_ty)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        cmask = cols < E
        q = tl.load(q_ptr + cols, mask=cmask, other=0.0).to(acc_ty)
        x = tl.load(e_ptr + row_off[:, None] + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(acc_ty)
        dot += tl.sum(x * q[None, :], axis=1)
        ss += tl.sum(x * x, axis=1)
        qq += q * q
    qn = tl.maximum(_sqrt(tl.sum(qq, axis=0), IS_F64), COS_EPS)
    nrm = tl.maximum(_sqrt(ss, IS_F64), COS_EPS)
    rel = _div(dot, qn * nrm, IS_F64)
    cand = rmask & (rel == rel)  # NaN relevance: never a candidate
    if HAS_FLOOR:
        cand = cand & (rel >= tl.load(param_ptr + 1))
    tl.store(norm_ptr + rows, nrm, mask=rmask)
    tl.store(rel_ptr + rows, rel, mask=rmask)
    tl.store(vis_ptr + rows, (~cand).to(tl.int8), mask=rmask)
    bv, bi = _block_best(rel, cand, rows, N)
    tl.store(best_v_ptr + pid, bv)
    tl.store(best_i_ptr + pid, bi.to(tl.int64))


@triton.jit
def _keyframe_select_pick_kernel(
    best_v_ptr, best_i_ptr, picks_ptr, step, NB, N,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    acc_ty = best_v_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_B)
    # element-wise running best over chunks of the per-block candidates, reduced once
    run_v = tl.full([BLOCK_B], float("-inf"), acc_ty)
    run_i = tl.full([BLOCK_B], N, tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        o = b0 + offs
        m = o < NB
        v = tl.load(best_v_ptr + o, mask=m, other=float("-inf"))
        i = tl.load(best_i_ptr + o, mask=m, other=N)
        take = (v > run_v) | ((v == run_v) & (i < run_i))
        run_v = tl.where(take, v, run_v)
        run_i = tl.where(take, i, run_i)
    bv = tl.max(run_v, axis=0)
    bi = tl.min(tl.where(run_v == bv, run_i, N), axis=0)
    pick = tl.where(bv == float("-inf"), -1, bi)
    tl.store(picks_ptr + step, pick.to(tl.int64))


@triton.jit
def _keyframe_select_fwd_kernel(
    e_ptr, norm_ptr, rel_ptr, vis_ptr, picks_ptr, best_v_ptr, best_i_ptr, param_ptr,
    step, N, E, stride_n,
    IS_F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    acc_ty = norm_ptr.dtype.element_ty
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    pick = tl.load(picks_ptr + step)  # -1: nothing was picked, nothing to mark
    vis = tl.load(vis_ptr + rows, mask=rmask, other=1)
    # the pick test is made a block (rows * 0 + pick): the interpreter mis-types a scalar
    # bool in a block mask
    active = rmask & (vis == 0) & ((rows.to(tl.int64) * 0 + pick) >= 0)
    p = tl.maximum(pick, 0)
    p_off = p * stride_n
    row_off = rows.to(tl.int64) * stride_n
    dot = tl.zeros([BLOCK_N], dtype=acc_ty)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        cmask = cols < E
        pv = tl.load(e_ptr + p_off + cols, mask=cmask, other=0.0).to(acc_ty)
        x = tl.load(e_ptr + row_off[:, None] + cols[None, :],
                    mask=active[:, None] & cmask[None, :], other=0.0).to(acc_ty)
        dot += tl.sum(x * pv[None, :], axis=1)
    nr = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    sim = _div(dot, tl.load(norm_ptr + p) * nr, IS_F64)
    marked = active & ((sim > tl.load(param_ptr)) | (rows == pick))  # NaN sim marks nothing
    tl.store(vis_ptr + rows, tl.full([BLOCK_N], 1, tl.int8), mask=marked)
    rel = tl.load(rel_ptr + rows, mask=rmask, other=0.0)
    bv, bi = _block_best(rel, active & ~marked, rows, N)
    tl.store(best_v_ptr + pid, bv)
    tl.store(best_i_ptr + pid, bi.to(tl.int64))


# --------------------------------------------------------------------------- configs
def fwd_config(e: int, is_f64: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_E, num_warps). 32 rows x 128 columns per tile (4,096 elements, 32
    per thread at 4 warps): N = 10,240 gives 320 programs per step, enough to fill a GPU,
    and E = 512 is four column tiles. fp64 halves the column tile (register pressure)."""
    return 32, max(16, min(64 if is_f64 else 128, triton.next_power_of_2(e))), 4


PICK_BLOCK = 512
PICK_WARPS = 4


# --------------------------------------------------------------------------- device-side fill
def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def _budget_fill(mask: torch.Tensor, sel_sorted: torch.Tensor, n: int, k: int) -> None:
    """The released budget fill on ``mask`` (N + 1,) bool (slot N is a dump), in place.
    ``sel_sorted`` (m,): the greedy frames ascending, then N padding. Device ops only."""
    dev = sel_sorted.device
    m = sel_sorted.shape[0]
    s = (sel_sorted < n).sum()
    missing = k - s
    bound_n = torch.full((1,), n, dtype=torch.int64, device=dev)
    right = torch.cat([sel_sorted, bound_n])  # gap g ends before right[g] ...
    left = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=dev), sel_sorted])
    start = left + 1  # ... and starts after left[g]; padding gives empty gaps
    length = (right - left - 1).clamp_min(0)
    lo = torch.ones((), dtype=torch.int64, device=dev)
    hi = torch.full((), n, dtype=torch.int64, device=dev)
    for _ in range(n.bit_length() + 1):  # static trip count: binary search for spacing D
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        fits = (_ceil_div(length, mid) - 1).clamp_min(0).sum() <= missing
        busy = lo < hi
        hi = torch.where(busy & fits, mid, hi)
        lo = torch.where(busy & ~fits, mid + 1, lo)
    kg = (_ceil_div(length, lo) - 1).clamp_min(0)  # frames added inside each gap
    step = _ceil_div(length, kg + 1)
    cum = torch.cumsum(kg, 0)
    added = cum[-1]
    # sum(kg) <= min(k, N) - s <= m: the t-th added frame, t < m, lives in gap g(t)
    t = torch.arange(m, dtype=torch.int64, device=dev)
    g = torch.searchsorted(cum, t, right=True).clamp_max(m)
    j = t - (cum[g] - kg[g]) + 1
    pos = torch.minimum(start[g] + j * step[g], start[g] + length[g] - 1)
    mask.scatter_(0, torch.where(t < added, pos, n), True)
    free = ~mask[:n]
    free_from_end = torch.flip(torch.cumsum(torch.flip(free, [0]).to(torch.int64), 0), [0])
    mask[:n] |= free & (free_from_end <= missing - added)  # top-up: highest free frames


def finish(picks: torch.Tensor, n: int, k: int, fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy picks (min(k, N),) in pick order with -1 = none -> (indices, ref_index)."""
    m = picks.shape[0]
    dev = picks.device
    key = torch.where(picks >= 0, picks, n)
    mask = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    mask.scatter_(0, key, True)
    if fill:
        _budget_fill(mask, torch.sort(key).values, n, k)
    sel = mask[:n]
    ref_index = torch.cumsum(sel, 0, dtype=torch.int64) - 1
    return compact(sel, ref_index, m), ref_index


def compact(sel: torch.Tensor, rank: torch.Tensor, m: int) -> torch.Tensor:
    """The positions of the True entries of ``sel`` (N,) bool, ascending, padded with -1 to
    the static length ``m``: ``torch.nonzero_static(sel, size=m, fill_value=-1)``.

    ``nonzero_static`` has no CUDA kernel before torch 2.6; this is the same result from a
    scatter, for every torch the project allows and without a host sync. ``rank`` (N,) int64
    is ``cumsum(sel) - 1`` (the caller's ``ref_index``): the output slot of each selected
    frame. Unselected frames, and selected ones past ``m`` (never the case for ``finish``:
    at most min(k, N) frames are selected), go to a dump slot ``m`` that is cut off.
    """
    n = sel.shape[0]
    dev = sel.device
    slot = torch.where(sel & (rank < m), rank, m)
    out = torch.full((m + 1,), -1, dtype=torch.int64, device=dev)
    out.scatter_(0, slot, torch.arange(n, dtype=torch.int64, device=dev))
    return out[:m]


# --------------------------------------------------------------------------- launcher
def keyframe_select_fwd(frame_emb, query_emb, k, threshold, min_relevance, fill):
    """Launcher with the registered op's arguments; returns (indices, ref_index)."""
    if frame_emb.stride(-1) != 1:
        frame_emb = frame_emb.contiguous()  # the one documented copy
    q = query_emb.reshape(-1).contiguous()
    n, e = frame_emb.shape
    dev = frame_emb.device
    is_f64 = frame_emb.dtype == torch.float64
    acc = torch.float64 if is_f64 else torch.float32
    m = min(int(k), n)
    block_n, block_e, nw = fwd_config(e, is_f64)
    nb = triton.cdiv(n, block_n)
    norm = torch.empty(n, dtype=acc, device=dev)
    rel = torch.empty(n, dtype=acc, device=dev)
    vis = torch.empty(n, dtype=torch.int8, device=dev)
    best_v = torch.empty(nb, dtype=acc, device=dev)
    best_i = torch.empty(nb, dtype=torch.int64, device=dev)
    picks = torch.empty(m, dtype=torch.int64, device=dev)
    # threshold and floor rounded to the accumulation dtype (a fill kernel, no host copy)
    param = torch.full((2,), float(threshold), dtype=acc, device=dev)
    if min_relevance is not None:
        param[1:].fill_(float(min_relevance))
    stride_n = frame_emb.stride(0)
    grid = (nb,)
    _keyframe_select_prep_kernel[grid](
        frame_emb, q, norm, rel, vis, best_v, best_i, param, n, e, stride_n,
        HAS_FLOOR=min_relevance is not None, IS_F64=is_f64, BLOCK_N=block_n, BLOCK_E=block_e,
        num_warps=nw, num_stages=1,
    )
    _keyframe_select_pick_kernel[(1,)](best_v, best_i, picks, 0, nb, n, BLOCK_B=PICK_BLOCK,
                                       num_warps=PICK_WARPS, num_stages=1)
    for step in range(1, m):
        _keyframe_select_fwd_kernel[grid](
            frame_emb, norm, rel, vis, picks, best_v, best_i, param, step - 1, n, e, stride_n,
            IS_F64=is_f64, BLOCK_N=block_n, BLOCK_E=block_e, num_warps=nw, num_stages=1,
        )
        _keyframe_select_pick_kernel[(1,)](best_v, best_i, picks, step, nb, n,
                                           BLOCK_B=PICK_BLOCK, num_warps=PICK_WARPS,
                                           num_stages=1)
    return finish(picks, n, int(k), fill)


# --------------------------------------------------------------------------- compile specs
def _specs() -> list[dict]:
    """Every config :func:`fwd_config` can return (issue 14): BLOCK_E 16 / 32 / 64 / 128
    (64 at most for fp64) per dtype, the prep kernel with and without the relevance floor;
    named by an E that gives the block (E 512 for the widest)."""
    specs = []
    # fp64 inputs run the IS_F64 variants: fp64 accumulation buffers and parameters, and
    # half the column tile (fwd_config)
    for name in ("fp32", "fp16", "bf16", "fp64"):
        p = "*" + name
        f64 = name == "fp64"
        acc = "*fp64" if f64 else "*fp32"
        for e in (16, 32, 64, 512) if not f64 else (16, 32, 512):
            block_n, block_e, nw = fwd_config(e, f64)
            for floor in (True, False):
                ce = dict(HAS_FLOOR=floor, IS_F64=f64, BLOCK_N=block_n, BLOCK_E=block_e)
                sig = dict(e_ptr=p, q_ptr=p, norm_ptr=acc, rel_ptr=acc, vis_ptr="*i8",
                           best_v_ptr=acc, best_i_ptr="*i64", param_ptr=acc, N="i32",
                           E="i32", stride_n="i32")
                sig.update({c: "constexpr" for c in ce})
                div16 = [a for a, t in sig.items() if t.startswith("*") or a in ("E", "stride_n")]
                specs.append({"name": f"kfs_prep_E{e}_{name}{'' if floor else '_nofloor'}",
                              "fn": _keyframe_select_prep_kernel, "signature": sig,
                              "constexprs": ce, "num_warps": nw, "num_stages": 1,
                              "divisible_by_16": div16})
            ce = dict(IS_F64=f64, BLOCK_N=block_n, BLOCK_E=block_e)
            sig = dict(e_ptr=p, norm_ptr=acc, rel_ptr=acc, vis_ptr="*i8", picks_ptr="*i64",
                       best_v_ptr=acc, best_i_ptr="*i64", param_ptr=acc, step="i32",
                       N="i32", E="i32", stride_n="i32")
            sig.update({c: "constexpr" for c in ce})
            div16 = [a for a, t in sig.items() if t.startswith("*") or a in ("E", "stride_n")]
            specs.append({"name": f"kfs_fwd_E{e}_{name}", "fn": _keyframe_select_fwd_kernel,
                          "signature": sig, "constexprs": ce, "num_warps": nw,
                          "num_stages": 1, "divisible_by_16": div16})
    # the pick kernel sees candidates in the accumulation dtype: fp32, or fp64 for fp64
    for acc in ("fp32", "fp64"):
        ce = dict(BLOCK_B=PICK_BLOCK)
        sig = dict(best_v_ptr="*" + acc, best_i_ptr="*i64", picks_ptr="*i64", step="i32",
                   NB="i32", N="i32", BLOCK_B="constexpr")
        specs.append({"name": f"kfs_pick_{acc}", "fn": _keyframe_select_pick_kernel,
                      "signature": sig, "constexprs": ce, "num_warps": PICK_WARPS,
                      "num_stages": 1,
                      "divisible_by_16": ["best_v_ptr", "best_i_ptr", "picks_ptr"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
