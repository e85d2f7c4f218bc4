"""Triton kernels for ``context_content_pool`` (LLaMA-VID context + content tokens).

Spec: :mod:`lvlm_fast.reference.context_content_pool`; definitions in
:mod:`lvlm_fast.ops.context_content_pool`. Never materialised: (N, Lq, P) or (N, Lq, C).

Forward, two kernels:
  * ``_context_content_pool_fwd_kernel``, one program per frame (per chunk of <= 64
    queries): flash-style over P blocks. Scores S = Q K^T (BLOCK_Q x BLOCK_P) are built by a
    loop over BLOCK_C channel blocks with ``tl.dot`` (BLOCK_Q >= 16 by padding the query
    block; padded queries load 0 and are excluded). Pass 1 keeps an online max / sum per
    query -> lse (N, Lq) fp32. Pass 2 recomputes each score block, A = exp(S - lse), and
    reduces it over the queries to one weight per patch, w[n, p] = mean_q A (an (N, P) fp32
    vector, 1/C of X). When the frame's whole score block fits in registers
    (BLOCK_Q x next_pow2(P) <= 8192, e.g. LLaMA-VID's 32 x 256) the two passes collapse
    into one (SINGLE_BLOCK: scores computed once, X read twice in all instead of three
    times). With Lq > 64 the launcher runs one launch per 64-query chunk and the later
    ones add to w.
    Split P (``PHASE`` 1 / 2, issue 14.5): with few frames (N < SPLIT_TARGET_PROGRAMS = 264,
    two waves of 132 SMs; e.g. the wrapper's ~17-frame vision chunk) and P >
    SPLIT_MIN_PATCHES = 64, one program per frame leaves most SMs idle, so the launcher
    splits P as ``diff_weighted_pool``'s forward does (:func:`p_splits`, same policy:
    ~264 programs, splits of whole SPLIT_BLOCK_P = 64 blocks, every split >= 1 patch; e.g.
    N = 17, P = 256 -> 4 splits, 68 programs; N = 17, P = 729 -> 12 splits, 204 programs).
    Grid (N, splits); program (n, s) owns patches [s * PPS, min(s * PPS + PPS, P)),
    addressed as a sub-frame (K / w bases advanced, local offsets from 0, the ragged tail
    masked like p >= P). Phase 1 stores the split's partial lse over its patches, part
    (splits, N, Lq) fp32: only a per-query max / sum is carried, no (Lq, C) accumulator.
    Phase 2 merges the partials itself (logsumexp over the splits, walked in order, so
    every program of a frame gets the same bits; split 0 stores lse): there is no output
    vector to rescale, so split_kv's (o, lse) merge kernel and a third launch are not
    needed. It then recomputes its score blocks and writes w for its own patches (later
    query chunks add into them, as above). Each w entry has one writer per launch: no
    atomics, deterministic; against one program per frame only the lse is reassociated
    (fp32 rounding). Cost: the split path never takes SINGLE_BLOCK, so for P <= 256 K is
    read twice for the scores instead of once (a few MB at N < 264; multi-block frames,
    e.g. P = 729, read it twice either way) for 4-12x more programs.
  * ``_context_content_pool_pool_kernel``, one program per (frame, BLOCK_C channels): one
    pass over the frame's patches, context = sum_p w[p] X[p] and the content token(s):
    the mean (g = 1) or, for g > 1, a (G_PAD x BLOCK_P) bin-membership matrix (1/area
    entries, adaptive_avg_pool2d bins, built from indices) times the X tile (``tl.dot``,
    ieee fp32). The g x g bins go in chunks of G_PAD = 16 (g is a runtime argument, only
    BINS = g > 1 is compiled in, so any g compiles to the same two kernels, every one
    without spills: a G_PAD of next_pow2(g^2) spilled from g = 6 on); each chunk walks
    only the patch rows its bins cover, and the context sum takes each patch once (in the
    first chunk that walks it). For g <= 4 (one chunk) every patch element is loaded once;
    larger grids re-read the patch rows shared by two chunks' bins.
Backward (recompute, saved: lse only):
  * ``_context_content_pool_bwd_prep_kernel``, per frame (per query chunk): recomputes S,
    dw[p] = gc . X[p] (gc = the context token's gradient; computed from the same X tile
    as the scores when keys is X) and D[q] = sum_p A[q, p] dw[p]; stores dw (N, P) and
    D (N, Lq) fp32. It is one full read of K (and X with separate keys) per frame, so at
    small N it splits P exactly like the forward (grid (N, splits), same :func:`p_splits`):
    dw is per patch (each split writes its own), D is a sum over patches, so each split
    stores a partial D row (splits, N, Lq) and the launcher sums them over the split dim
    (a torch reduction over a dim of size splits: deterministic, no atomics) before the
    backward kernel reads D. All prep chunks run first, then the backward chunks.
  * ``_context_content_pool_bwd_kernel``, per (frame, BLOCK_P patches): recomputes the
    score block, dS = scale/Lq * A * (dw - D), w = mean_q A; stores dS (N, Lq, P) (fp32 on
    the ieee path, else in the input dtype, as it enters the tensor-core products: 1/22 of
    X's bytes at Lq 32, C 1408); per channel block grad_K = dS^T Q (stored; added into
    grad_x when keys is X), grad_X = w gc + content gradient (+ grad_K). Later query chunks
    add into grad_x / grad_keys (fp32 buffers then).
  * ``_context_content_pool_bwd_dq_kernel``, per (BLOCK_C channels, frame group): grad_Q
    rows = sum over the group's frames and P blocks of dS_f K_f, in order, in fp32
    registers (no atomics: deterministic). Per-frame queries: one frame per group, the
    output is grad_Q. Shared queries: :func:`dq_groups` frame groups (~4 waves of
    programs), fp32 (groups, Lq, CK) partials summed over the groups in a fixed order.
    K is read once more here (instead of ~Lq*P*C/BLOCK_P fp32 atomic adds per frame).

Masking: padded queries (q >= Lq), patches (p >= P, and past a split's end) and channels
load 0, get weight 0 and are never stored. Accumulation fp32 (the split partials too: part
lse, partial D); ``tl.dot`` on fp16/bf16 tiles uses the tensor cores with fp32 accumulation
(dS is rounded to the input dtype for the two gradient products, as in flash attention); on
fp32 tiles it is forced to ieee fp32 (no tf32), matching the CPU kernel. Frame offsets are
int64 (frame stride x N can pass 2^31); offsets inside a frame are int32, so a view whose
single frame spans >= 2^31 elements is made contiguous first (:func:`_frame_i32`). All
strides are passed: strided frames / patches / query rows need no copy; a strided channel
dim is copied once by the launcher (as on CPU) so the compiled specialisation is the
unit-stride one. fp64 inputs on CUDA run the reference (documented). Launchers take the
op's arguments, return its tuple and do not assert CUDA (tier 1 runs them on CPU tensors
with TRITON_INTERPRET=1).

Default configs (``fwd_config`` / ``prep_config`` / ``bwd_config`` / ``dq_config``): BLOCK_Q =
clamp(next_pow2(Lq), 16, 64), BLOCK_P = 64, BLOCK_C = 64 (32 for fp32 tiles), 4 warps (8 for
the backward kernel except fp32 at BLOCK_Q = 16, and for the prep and grad_Q kernels at
BLOCK_Q = 64), 2 stages for the score loops; the split kernels use the multi-block config
with BLOCK_P = SPLIT_BLOCK_P. Every config these can return is in ``COMPILE_SPECS`` (zero
spills for sm_80 / sm_90; tests/tier2/test_spec_coverage.py checks the launches against
the list). Roofline note:
per frame the scores cost 2*Lq*P*C flops (LLaMA-VID: 23 MFLOP) against P*C input elements
(0.7 MB in bf16), ~32 flop/byte: on an
A100 the tensor-core scores take ~1/10 of the time to read X, so the op is memory-bound
there and the two score passes are free; fp32 (ieee) is FMA-bound instead.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


# --------------------------------------------------------------------------- helpers
@triton.jit
def _scores(q_base, k_base, offs_q, qmask, offs_p, pmask, CK, stride_qq, stride_qc,
            stride_kp, stride_kc, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
    """Q K^T for one (query block, patch block), fp32 (unscaled)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, CK, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < CK
        qt = tl.load(q_base + offs_q[:, None] * stride_qq + offs_c[None, :] * stride_qc,
                     mask=qmask[:, None] & cmask[None, :], other=0.0)
        kt = tl.load(k_base + offs_p[:, None] * stride_kp + offs_c[None, :] * stride_kc,
                     mask=pmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(qt, tl.trans(kt), acc, input_precision="ieee")
        else:
            acc = tl.dot(qt, tl.trans(kt), acc)
    return acc


@triton.jit
def _bin_matrix(offs_p, pmask, side, grid, b0, G_PAD: tl.constexpr):
    """(G_PAD, BLOCK_P) fp32: 1/area where patch p lies in content bin b0 + i (adaptive
    bins of the side x side grid, row-major bins), else 0."""
    b = b0 + tl.arange(0, G_PAD)
    bi = b // grid
    bj = b % grid
    rs = (bi * side) // grid
    re = ((bi + 1) * side + grid - 1) // grid
    cs = (bj * side) // grid
    ce = ((bj + 1) * side + grid - 1) // grid
    r = offs_p // side
    c = offs_p % side
    member = ((r[None, :] >= rs[:, None]) & (r[None, :] < re[:, None])
              & (c[None, :] >= cs[:, None]) & (c[None, :] < ce[:, None])
              & (b < grid * grid)[:, None] & pmask[None, :])
    area = tl.maximum((re - rs) * (ce - cs), 1).to(tl.float32)
    return tl.where(member, 1.0 / area[:, None], 0.0)


# --------------------------------------------------------------------------- forward
@triton.jit
def _lse_range(q_base, k_base, offs_q, qmask, n_p, CK, scale, stride_qq, stride_qc,
               stride_kp, stride_kc, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
    """Per-query logsumexp of the scaled scores over the n_p >= 1 patches at ``k_base``
    (online max / sum in fp32, BLOCK_P patches at a time)."""
    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for p0 in range(0, n_p, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < n_p
        s = _scores(q_base, k_base, offs_q, qmask, offs_p, pmask, CK, stride_qq, stride_qc,
                    stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE) * scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    return m_i + tl.log(l_i)


@triton.jit
def _merged_lse(part_ptr, n, N, offs_q, qmask, LQ, NSPLIT, BLOCK_Q: tl.constexpr):
    """logsumexp over the NSPLIT partial lse rows ``part[s, n, q]`` (each finite: every
    split holds >= 1 patch), splits walked in order: every program of the frame gets the
    same bits."""
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    for s in range(0, NSPLIT):
        m = tl.maximum(m, tl.load(part_ptr + (s * N + n) * LQ + offs_q, mask=qmask,
                                  other=0.0))
    l_s = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for s in range(0, NSPLIT):
        l_s += tl.exp(tl.load(part_ptr + (s * N + n) * LQ + offs_q, mask=qmask, other=0.0) - m)
    return m + tl.log(l_s)


@triton.jit
def _context_content_pool_fwd_kernel(
    q_ptr, k_ptr, w_ptr, lse_ptr, part_ptr,
    P, CK, LQ, q_start, scale, inv_lq, PPS, NSPLIT,
    stride_qn, stride_qq, stride_qc, stride_kn, stride_kp, stride_kc,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ACCUM_W: tl.constexpr, IEEE: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    PHASE: tl.constexpr,
):  # fmt: skip
    # PHASE 0: one program per frame, lse and w of the whole frame (grid (N, 1), PPS = P).
    # Split P (grid (N, NSPLIT), program (n, sp) owns patches [sp * PPS, sp * PPS + PPS)):
    # PHASE 1 stores the split's partial lse part[sp, n, :]; PHASE 2 merges the partials
    # and writes w for its own patches (split 0 also stores the merged lse).
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    offs_q = q_start + tl.arange(0, BLOCK_Q)
    qmask = offs_q < LQ
    q_base = q_ptr + n * stride_qn
    k_base = k_ptr + n * stride_kn
    if SINGLE_BLOCK:  # BLOCK_P >= P: the scores are computed once and stay in registers
        offs_p = tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        s = _scores(q_base, k_base, offs_q, qmask, offs_p, pmask, CK, stride_qq, stride_qc,
                    stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE) * scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        e = tl.exp(s - m[:, None])
        l_s = tl.sum(e, axis=1)
        lse = m + tl.log(l_s)
        a = tl.where(qmask[:, None], e / l_s[:, None], 0.0)
        wb = tl.sum(a, axis=0) * inv_lq
        w_ptrs = w_ptr + n * P + offs_p
        if ACCUM_W:
            wb += tl.load(w_ptrs, mask=pmask, other=0.0)
        tl.store(w_ptrs, wb, mask=pmask)
        tl.store(lse_ptr + n * LQ + offs_q, lse, mask=qmask)
        return
    w_base = w_ptr + n * P
    if PHASE == 0:
        n_p = P
    else:  # the split's patches as a sub-frame: bases advanced, local offsets from 0
        p_lo = sp * PPS
        n_p = tl.minimum(p_lo + PPS, P) - p_lo
        k_base += p_lo * stride_kp
        w_base += p_lo
    if PHASE == 1:
        lse = _lse_range(q_base, k_base, offs_q, qmask, n_p, CK, scale, stride_qq, stride_qc,
                         stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE)
        tl.store(part_ptr + (sp * tl.num_programs(0) + n) * LQ + offs_q, lse, mask=qmask)
        return
    if PHASE == 2:
        lse = _merged_lse(part_ptr, n, tl.num_programs(0), offs_q, qmask, LQ, NSPLIT,
                          BLOCK_Q)
        if sp == 0:  # every split merged the same bits; one stores them
            tl.store(lse_ptr + n * LQ + offs_q, lse, mask=qmask)
    else:
        lse = _lse_range(q_base, k_base, offs_q, qmask, n_p, CK, scale, stride_qq, stride_qc,
                         stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE)
    for p0 in range(0, n_p, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < n_p
        s = _scores(q_base, k_base, offs_q, qmask, offs_p, pmask, CK, stride_qq, stride_qc,
                    stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE) * scale
        a = tl.exp(s - lse[:, None])
        a = tl.where(qmask[:, None] & pmask[None, :], a, 0.0)
        wb = tl.sum(a, axis=0) * inv_lq
        if ACCUM_W:
            wb += tl.load(w_base + offs_p, mask=pmask, other=0.0)
        tl.store(w_base + offs_p, wb, mask=pmask)
    if PHASE == 0:
        tl.store(lse_ptr + n * LQ + offs_q, lse, mask=qmask)


@triton.jit
def _context_content_pool_pool_kernel(
    x_ptr, w_ptr, out_ptr,
    P, C, side, grid, inv_p,
    stride_xn, stride_xp, stride_xc, stride_on, stride_or,
    BINS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x_base = x_ptr + n * stride_xn
    o_base = out_ptr + n * stride_on
    ty = out_ptr.dtype.element_ty
    ctx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if not BINS:  # g = 1: context and the mean in one pass
        cont = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            xt = tl.load(x_base + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
                         mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            wb = tl.load(w_ptr + n * P + offs_p, mask=pmask, other=0.0)
            ctx += tl.sum(wb[:, None] * xt, axis=0)
            cont += tl.sum(xt, axis=0)
        tl.store(o_base + stride_or + offs_c, (cont * inv_p).to(ty), mask=cmask)
    else:
        # bins in chunks of G_PAD; chunk [b0, b0 + G_PAD) walks the patch rows its bin
        # rows cover, [p_lo, p_hi); the context takes patches from the previous chunk's
        # p_hi on (chunks' row ranges are contiguous, increasing, and cover the frame)
        n_bins = grid * grid
        for b0 in range(0, n_bins, G_PAD):
            b_last = tl.minimum(b0 + G_PAD, n_bins) - 1
            p_lo = ((b0 // grid) * side // grid) * side
            p_hi = (((b_last // grid + 1) * side + grid - 1) // grid) * side
            prev = tl.maximum(b0 - 1, 0) // grid  # the previous chunk's last bin row
            p_done = tl.where(b0 > 0, (((prev + 1) * side + grid - 1) // grid) * side, 0)
            cont2 = tl.zeros((G_PAD, BLOCK_C), dtype=tl.float32)
            for p0 in range(p_lo, p_hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                pmask = offs_p < p_hi
                xt = tl.load(x_base + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
                             mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                new = pmask & (offs_p >= p_done)
                wb = tl.load(w_ptr + n * P + offs_p, mask=new, other=0.0)
                ctx += tl.sum(tl.where(new[:, None], wb[:, None] * xt, 0.0), axis=0)
                mb = _bin_matrix(offs_p, pmask, side, grid, b0, G_PAD)
                cont2 = tl.dot(mb, xt, cont2, input_precision="ieee")
            b = b0 + tl.arange(0, G_PAD)
            tl.store(o_base + (1 + b)[:, None] * stride_or + offs_c[None, :], cont2.to(ty),
                     mask=(b < n_bins)[:, None] & cmask[None, :])
    tl.store(o_base + offs_c, ctx.to(ty), mask=cmask)


# --------------------------------------------------------------------------- backward
@triton.jit
def _content_grad(go_base, offs_c, cmask, mb_t, offs_p, pmask, side, grid, b_lo, b_hi,
                  stride_gor, stride_goc, G_PAD: tl.constexpr):
    """(BLOCK_P, BLOCK_C) fp32: sum over the bins [b_lo, b_hi) of M^T[p, b] gcont[b, c],
    in chunks of G_PAD bins; ``mb_t`` is the first chunk's M^T (built once per program)."""
    b = b_lo + tl.arange(0, G_PAD)
    gcont = tl.load(go_base + (1 + b)[:, None] * stride_gor + offs_c[None, :] * stride_goc,
                    mask=(b < b_hi)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(mb_t, gcont, input_precision="ieee")
    for b0 in range(b_lo + G_PAD, b_hi, G_PAD):
        b = b0 + tl.arange(0, G_PAD)
        gcont = tl.load(go_base + (1 + b)[:, None] * stride_gor + offs_c[None, :] * stride_goc,
                        mask=(b < b_hi)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        m_t = tl.trans(_bin_matrix(offs_p, pmask, side, grid, b0, G_PAD))
        acc = tl.dot(m_t, gcont, acc, input_precision="ieee")
    return acc


@triton.jit
def _context_content_pool_bwd_prep_kernel(
    q_ptr, k_ptr, x_ptr, go_ptr, lse_ptr, dw_ptr, d_ptr,
    P, CK, C, LQ, q_start, scale, PPS,
    stride_qn, stride_qq, stride_qc, stride_kn, stride_kp, stride_kc,
    stride_xn, stride_xp, stride_xc, stride_gon, stride_goc,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    KEYS_IS_X: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # program (n, sp) owns patches [sp * PPS, sp * PPS + PPS) (grid (N, 1), PPS = P unless
    # the launcher splits P): dw of its patches, and its partial D row d[sp, n, :]
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    p_lo = sp * PPS
    p_hi = tl.minimum(p_lo + PPS, P)
    offs_q = q_start + tl.arange(0, BLOCK_Q)
    qmask = offs_q < LQ
    q_base = q_ptr + n * stride_qn
    k_base = k_ptr + n * stride_kn
    x_base = x_ptr + n * stride_xn
    go_base = go_ptr + n * stride_gon
    lse = tl.load(lse_ptr + n * LQ + offs_q, mask=qmask, other=0.0)
    d_acc = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for p0 in range(0, p_hi - p_lo, BLOCK_P):
        offs_p = p_lo + p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < p_hi
        s = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
        dw = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, CK, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < CK
            qt = tl.load(q_base + offs_q[:, None] * stride_qq + offs_c[None, :] * stride_qc,
                         mask=qmask[:, None] & cmask[None, :], other=0.0)
            kt = tl.load(k_base + offs_p[:, None] * stride_kp + offs_c[None, :] * stride_kc,
                         mask=pmask[:, None] & cmask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(qt, tl.trans(kt), s, input_precision="ieee")
            else:
                s = tl.dot(qt, tl.trans(kt), s)
            if KEYS_IS_X:  # the key tile is the X tile: dw from the same load
                gc = tl.load(go_base + offs_c * stride_goc, mask=cmask, other=0.0).to(tl.float32)
                dw += tl.sum(kt.to(tl.float32) * gc[None, :], axis=1)
        if not KEYS_IS_X:
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cmask = offs_c < C
                xt = tl.load(x_base + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
                             mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                gc = tl.load(go_base + offs_c * stride_goc, mask=cmask, other=0.0).to(tl.float32)
                dw += tl.sum(xt * gc[None, :], axis=1)
        a = tl.exp(s * scale - lse[:, None])
        a = tl.where(qmask[:, None] & pmask[None, :], a, 0.0)
        d_acc += tl.sum(a * dw[None, :], axis=1)
        tl.store(dw_ptr + n * P + offs_p, dw, mask=pmask)
    tl.store(d_ptr + (sp * tl.num_programs(0) + n) * LQ + offs_q, d_acc, mask=qmask)


@triton.jit
def _context_content_pool_bwd_kernel(
    q_ptr, k_ptr, go_ptr, lse_ptr, dw_ptr, d_ptr, gx_ptr, ds_ptr, gk_ptr,
    P, CK, C, LQ, q_start, scale, inv_lq, side, grid, inv_p,
    stride_qn, stride_qq, stride_qc, stride_kn, stride_kp, stride_kc,
    stride_gon, stride_gor, stride_goc,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    BINS: tl.constexpr, G_PAD: tl.constexpr, KEYS_IS_X: tl.constexpr, FIRST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_q = q_start + tl.arange(0, BLOCK_Q)
    qmask = offs_q < LQ
    q_base = q_ptr + n * stride_qn
    k_base = k_ptr + n * stride_kn
    go_base = go_ptr + n * stride_gon
    s = _scores(q_base, k_base, offs_q, qmask, offs_p, pmask, CK, stride_qq, stride_qc,
                stride_kp, stride_kc, BLOCK_Q, BLOCK_P, BLOCK_C, IEEE)
    lse = tl.load(lse_ptr + n * LQ + offs_q, mask=qmask, other=0.0)
    dq = tl.load(d_ptr + n * LQ + offs_q, mask=qmask, other=0.0)
    dw = tl.load(dw_ptr + n * P + offs_p, mask=pmask, other=0.0)
    a = tl.exp(s * scale - lse[:, None])
    a = tl.where(qmask[:, None] & pmask[None, :], a, 0.0)
    wb = tl.sum(a, axis=0) * inv_lq
    ds = a * (dw[None, :] - dq[:, None]) * (scale * inv_lq)
    gx_rows = gx_ptr + (n * P + offs_p)[:, None] * C
    gk_rows = gk_ptr + (n * P + offs_p)[:, None] * CK
    # dS for the grad_Q kernel (no atomics): fp32 on the ieee path, else rounded to the
    # input dtype exactly as it enters the tensor-core products
    ds_rows = ds_ptr + (n * LQ + offs_q)[:, None] * P + offs_p[None, :]
    if IEEE:
        tl.store(ds_rows, ds, mask=qmask[:, None] & pmask[None, :])
    else:
        tl.store(ds_rows, ds.to(ds_ptr.dtype.element_ty), mask=qmask[:, None] & pmask[None, :])
    if BINS:  # the bins whose rows meet this block's patch rows [r_lo, r_hi]: [b_lo, b_hi)
        r_lo = (tl.program_id(1) * BLOCK_P) // side
        r_hi = (tl.minimum(tl.program_id(1) * BLOCK_P + BLOCK_P, P) - 1) // side
        b_lo = ((r_lo * grid) // side) * grid
        b_hi = tl.minimum(((r_hi + 1) * grid + side - 1) // side, grid) * grid
        # (BLOCK_P, G_PAD), first chunk (the only one unless > G_PAD bins meet the block)
        mb_t = tl.trans(_bin_matrix(offs_p, pmask, side, grid, b_lo, G_PAD))
    for c0 in range(0, CK, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < CK
        qt = tl.load(q_base + offs_q[:, None] * stride_qq + offs_c[None, :] * stride_qc,
                     mask=qmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            gk = tl.dot(tl.trans(ds), qt, input_precision="ieee")
        else:
            gk = tl.dot(tl.trans(ds.to(qt.dtype)), qt)
        tile_mask = pmask[:, None] & cmask[None, :]
        if KEYS_IS_X:
            gc = tl.load(go_base + offs_c * stride_goc, mask=cmask, other=0.0).to(tl.float32)
            g = gk + wb[:, None] * gc[None, :]
            if FIRST:
                if not BINS:
                    gcont = tl.load(go_base + stride_gor + offs_c * stride_goc, mask=cmask,
                                    other=0.0).to(tl.float32)
                    g += gcont[None, :] * inv_p
                else:
                    g += _content_grad(go_base, offs_c, cmask, mb_t, offs_p, pmask, side, grid,
                                       b_lo, b_hi, stride_gor, stride_goc, G_PAD)
            else:
                g += tl.load(gx_rows + offs_c[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(gx_rows + offs_c[None, :], g.to(gx_ptr.dtype.element_ty), mask=tile_mask)
        else:
            if not FIRST:
                gk += tl.load(gk_rows + offs_c[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(gk_rows + offs_c[None, :], gk.to(gk_ptr.dtype.element_ty), mask=tile_mask)
    if not KEYS_IS_X:
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            tile_mask = pmask[:, None] & cmask[None, :]
            gc = tl.load(go_base + offs_c * stride_goc, mask=cmask, other=0.0).to(tl.float32)
            g = wb[:, None] * gc[None, :]
            if FIRST:
                if not BINS:
                    gcont = tl.load(go_base + stride_gor + offs_c * stride_goc, mask=cmask,
                                    other=0.0).to(tl.float32)
                    g += gcont[None, :] * inv_p
                else:
                    g += _content_grad(go_base, offs_c, cmask, mb_t, offs_p, pmask, side, grid,
                                       b_lo, b_hi, stride_gor, stride_goc, G_PAD)
            else:
                g += tl.load(gx_rows + offs_c[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(gx_rows + offs_c[None, :], g.to(gx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _context_content_pool_bwd_dq_kernel(
    ds_ptr, k_ptr, gq_ptr, P, CK, LQ, q_start, N, frames_per_group,
    stride_kn, stride_kp, stride_kc,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # grad_Q partial of one frame group for one channel block: sum_f dS_f K_f (no atomics)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    grp = tl.program_id(1).to(tl.int64)
    cmask = offs_c < CK
    offs_q = q_start + tl.arange(0, BLOCK_Q)
    qmask = offs_q < LQ
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    f0 = grp * frames_per_group
    f1 = tl.minimum(f0 + frames_per_group, N)
    for f in range(f0, f1):
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            ds = tl.load(ds_ptr + (f * LQ + offs_q)[:, None] * P + offs_p[None, :],
                         mask=qmask[:, None] & pmask[None, :], other=0.0)
            kt = tl.load(k_ptr + f * stride_kn + offs_p[:, None] * stride_kp
                         + offs_c[None, :] * stride_kc,
                         mask=pmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(ds, kt, acc, input_precision="ieee" if IEEE else None)
    tl.store(gq_ptr + (grp * LQ + offs_q)[:, None] * CK + offs_c[None, :], acc,
             mask=qmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- configs
def _block_q(lq: int) -> int:
    return min(64, max(16, triton.next_power_of_2(lq)))


G_PAD = 16  # content bins per chunk (pool and backward kernels, content_grid > 1)


def fwd_config(lq: int, dtype: torch.dtype, p: int | None = None) -> dict:
    """Score kernel (fwd, bwd prep): BLOCK_Q, BLOCK_P, BLOCK_C, warps, stages. With ``p``
    (forward only): when the whole frame's score block fits (BLOCK_Q * next_pow2(P) <=
    8192, e.g. 32 x 256), one P block (SINGLE_BLOCK): scores computed once, X read twice
    in total (scores, weighted sum) instead of three times."""
    bq = _block_q(lq)
    bc = 32 if dtype == torch.float32 else 64
    if p is not None and bq * triton.next_power_of_2(p) <= 8192:
        bp = max(16, triton.next_power_of_2(p))
        return dict(BLOCK_Q=bq, BLOCK_P=bp, BLOCK_C=bc if bp <= 128 else 32,
                    num_warps=4 if bp <= 64 else 8, num_stages=2, SINGLE_BLOCK=True)
    return dict(BLOCK_Q=bq, BLOCK_P=64, BLOCK_C=bc, num_warps=4, num_stages=2,
                SINGLE_BLOCK=False)


def prep_config(lq: int, dtype: torch.dtype) -> dict:
    """Backward prep kernel: the multi-block score config, 8 warps at BLOCK_Q = 64 (4 warps
    spill there: s, A and the dw products of a 64 x 64 tile)."""
    cfg = fwd_config(lq, dtype)
    return {**cfg, "num_warps": 8} if cfg["BLOCK_Q"] == 64 else cfg


def pool_config(grid: int) -> dict:
    return dict(BLOCK_P=64, BLOCK_C=64 if grid == 1 else 32, num_warps=4, num_stages=1)


def bwd_config(lq: int, dtype: torch.dtype) -> dict:
    """Backward kernel: 8 warps, but 4 for fp32 at BLOCK_Q = 16 (8 warps made ptxas spill
    8 bytes for sm_80 there with separate keys and content bins, at 80 registers)."""
    bq = _block_q(lq)
    fp32 = dtype == torch.float32
    return dict(BLOCK_Q=bq, BLOCK_P=64, BLOCK_C=32 if fp32 else 64,
                num_warps=4 if fp32 and bq == 16 else 8, num_stages=1)


def dq_config(lq: int, dtype: torch.dtype) -> dict:
    """grad_Q kernel: 8 warps at BLOCK_Q = 64 (4 warps spill there on sm_80: the (64, 64)
    dS tile, the K tile and the (64, BLOCK_C) accumulator, ~300 B for fp32, ~24 B for
    fp16 / bf16)."""
    bq = _block_q(lq)
    bc = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_Q=bq, BLOCK_P=64, BLOCK_C=bc, num_warps=8 if bq == 64 else 4,
                num_stages=2)


DQ_TARGET_PROGRAMS = 528  # shared queries: frame groups x channel blocks ~ 4 waves of 132 SMs


def dq_groups(n: int, ck: int, block_c: int, shared: bool) -> tuple[int, int]:
    """(groups, frames per group) of the grad_Q kernel: one frame per group for per-frame
    queries (the group's rows are that frame's grad_Q); for shared queries enough groups to
    fill the GPU, each writing an fp32 (Lq, CK) partial summed in a fixed order after."""
    if not shared:
        return n, 1
    want = max(1, min(n, triton.cdiv(DQ_TARGET_PROGRAMS, triton.cdiv(ck, block_c))))
    per = triton.cdiv(n, want)
    return triton.cdiv(n, per), per


# Occupancy at small N (the wrapper's vision chunk: ~17-38 frames on 132 SMs): the per-frame
# score kernels (forward, backward prep) split P across programs, as diff_weighted_pool's
# forward does (same policy and constants).
SPLIT_TARGET_PROGRAMS = 264  # 2 waves on 132 SMs
SPLIT_MIN_PATCHES = 64
SPLIT_BLOCK_P = 64  # BLOCK_P of the split kernels; a split is a whole number of blocks


def p_splits(n: int, p: int, block_p: int | None = None) -> tuple[int, int]:
    """(splits, patches per split, a multiple of BLOCK_P) of the per-frame score kernels;
    (1, P) when N frames already fill the GPU or P is small. Every split holds >= 1 patch."""
    block_p = SPLIT_BLOCK_P if block_p is None else block_p
    if n >= SPLIT_TARGET_PROGRAMS or p <= SPLIT_MIN_PATCHES:
        return 1, p
    want = min(triton.cdiv(SPLIT_TARGET_PROGRAMS, n), triton.cdiv(p, SPLIT_MIN_PATCHES))
    per = triton.cdiv(triton.cdiv(p, want), block_p) * block_p
    splits = triton.cdiv(p, per)
    return (splits, per) if splits > 1 else (1, p)


def _split_cfg(cfg: dict, nsplit: int) -> dict:
    """A split kernel's config: the multi-block ``cfg`` with BLOCK_P = SPLIT_BLOCK_P (a
    split is a whole number of blocks); ``cfg`` unchanged without a split."""
    return cfg if nsplit == 1 else {**cfg, "BLOCK_P": SPLIT_BLOCK_P, "SINGLE_BLOCK": False}


def _side(p: int, grid: int) -> int:
    if grid == 1:
        return 1
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"content_grid > 1 needs a square P, got P = {p}")
    return side


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """The one documented copy: a strided channel dim is made unit-stride."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _frame_i32(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """In-kernel offsets inside one frame (``patch * stride``, ``query * stride``) are int32;
    frame offsets are int64. A view whose one frame spans >= 2^31 elements (e.g. x given as
    ``(P, N, C).transpose(0, 1)``: patch stride N * C) is made contiguous once, which brings
    the span down to P * C; that must then fit."""
    if t is None or t.dim() < 3:
        return t

    def span(u: torch.Tensor) -> int:
        return 1 + sum((n - 1) * abs(s) for n, s in zip(u.shape[1:], u.stride()[1:],
                                                        strict=True) if n > 0)

    if span(t) < 2**31:
        return t
    t = t.contiguous()
    if span(t) >= 2**31:
        raise ValueError(f"{name}: one frame holds {span(t)} elements (>= 2^31)")
    return t


def _q_strides(queries: torch.Tensor) -> tuple[int, int, int]:
    if queries.dim() == 2:
        return 0, queries.stride(0), queries.stride(1)
    return queries.stride(0), queries.stride(1), queries.stride(2)


# --------------------------------------------------------------------------- launchers
def context_content_pool_fwd(x, queries, keys, scale, content_grid):
    """Launcher with the registered op's arguments; returns (out, lse)."""
    if x.dtype == torch.float64:  # no fp64 tensor-core path: the reference (documented)
        from lvlm_fast.ops.context_content_pool import reference_fwd

        return reference_fwd(x, queries, keys, scale, content_grid)
    x, queries, keys = _unit_last(x), _unit_last(queries), _unit_last(keys)
    x, queries, keys = _frame_i32(x, "x"), _frame_i32(queries, "queries"), _frame_i32(keys, "keys")
    n, p, c = x.shape
    k = x if keys is None else keys
    ck = k.shape[2]
    lq = queries.shape[-2]
    g = int(content_grid)
    side = _side(p, g)
    out = torch.empty((n, 1 + g * g, c), device=x.device, dtype=x.dtype)
    lse = torch.empty((n, lq), device=x.device, dtype=torch.float32)
    if n == 0:
        return out, lse
    w = torch.empty((n, p), device=x.device, dtype=torch.float32)
    nsplit, pps = p_splits(n, p)
    cfg = _split_cfg(fwd_config(lq, x.dtype, p if nsplit == 1 else None), nsplit)
    # split P: partial lse (split, frame, query), merged by the phase-2 programs
    part = (torch.empty((nsplit, n, lq), device=x.device, dtype=torch.float32)
            if nsplit > 1 else lse)
    sqn, sqq, sqc = _q_strides(queries)
    for q0 in range(0, lq, cfg["BLOCK_Q"]):  # one pass per 64-query chunk (usually one)
        for phase in (1, 2) if nsplit > 1 else (0,):
            _context_content_pool_fwd_kernel[(n, nsplit)](
                queries, k, w, lse, part, p, ck, lq, q0, float(scale), 1.0 / lq, pps, nsplit,
                sqn, sqq, sqc, k.stride(0), k.stride(1), k.stride(2),
                BLOCK_Q=cfg["BLOCK_Q"], BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"],
                ACCUM_W=q0 > 0, IEEE=x.dtype == torch.float32,
                SINGLE_BLOCK=cfg["SINGLE_BLOCK"], PHASE=phase,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    pc = pool_config(g)
    _context_content_pool_pool_kernel[(n, triton.cdiv(c, pc["BLOCK_C"]))](
        x, w, out, p, c, side, g, 1.0 / p,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        BINS=g > 1, G_PAD=G_PAD, BLOCK_P=pc["BLOCK_P"], BLOCK_C=pc["BLOCK_C"],
        num_warps=pc["num_warps"], num_stages=pc["num_stages"])
    return out, lse


def context_content_pool_bwd(grad_out, x, queries, keys, scale, content_grid, lse):
    """Launcher with the backward op's arguments; returns (grad_x, grad_queries, grad_keys)."""
    if x.dtype == torch.float64:
        from lvlm_fast.ops.context_content_pool import reference_bwd

        return reference_bwd(grad_out, x, queries, keys, scale, content_grid, lse)
    x, queries, keys = _unit_last(x), _unit_last(queries), _unit_last(keys)
    x, queries, keys = _frame_i32(x, "x"), _frame_i32(queries, "queries"), _frame_i32(keys, "keys")
    grad_out = _frame_i32(_unit_last(grad_out), "grad_out")
    n, p, c = x.shape
    k = x if keys is None else keys
    ck = k.shape[2]
    lq = queries.shape[-2]
    g = int(content_grid)
    side = _side(p, g)
    lse = lse.float().contiguous()
    nsplit, pps = p_splits(n, p)
    cfg = _split_cfg(prep_config(lq, x.dtype), nsplit)
    bcfg = bwd_config(lq, x.dtype)
    chunks = list(range(0, lq, cfg["BLOCK_Q"]))
    # One query chunk (Lq <= 64): gradients are written once, in the input dtype. More
    # chunks add into fp32 buffers, cast at the end.
    acc_dtype = x.dtype if len(chunks) == 1 else torch.float32
    gx = torch.empty((n, p, c), device=x.device, dtype=acc_dtype)
    gk = (torch.empty((n, p, ck), device=x.device, dtype=acc_dtype) if keys is not None
          else torch.empty((0,), device=x.device, dtype=acc_dtype))
    if n == 0:
        gq = torch.zeros(queries.shape, device=x.device, dtype=queries.dtype)
        return gx.to(x.dtype), gq, gk.to(x.dtype)
    shared = queries.dim() == 2
    qcfg = dq_config(lq, x.dtype)
    n_grp, per_grp = dq_groups(n, ck, qcfg["BLOCK_C"], shared)
    # grad_Q without atomics: dS (N, Lq, P) is stored by the backward kernel, then each
    # (channel block, frame group) program sums dS_f K_f over its frames in order
    gq = torch.empty((n_grp, lq, ck), device=x.device, dtype=torch.float32)
    ds = torch.empty((n, lq, p), device=x.device,
                     dtype=torch.float32 if x.dtype == torch.float32 else x.dtype)
    dw = torch.empty((n, p), device=x.device, dtype=torch.float32)
    dd = torch.empty((nsplit, n, lq), device=x.device, dtype=torch.float32)  # partial D
    sqn, sqq, sqc = _q_strides(queries)
    ieee = x.dtype == torch.float32
    for q0 in chunks:  # dw (the same for every chunk) and the chunk's rows of D
        _context_content_pool_bwd_prep_kernel[(n, nsplit)](
            queries, k, x, grad_out, lse, dw, dd, p, ck, c, lq, q0, float(scale), pps,
            sqn, sqq, sqc, k.stride(0), k.stride(1), k.stride(2),
            x.stride(0), x.stride(1), x.stride(2), grad_out.stride(0), grad_out.stride(2),
            BLOCK_Q=cfg["BLOCK_Q"], BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"],
            KEYS_IS_X=keys is None, IEEE=ieee,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # split P: D = the per-split partials summed (a torch reduction over a dim of size
    # nsplit: deterministic, no atomics; (nsplit, N, Lq) fp32, tiny)
    d_rows = dd.sum(0) if nsplit > 1 else dd[0]
    for q0 in chunks:
        _context_content_pool_bwd_kernel[(n, triton.cdiv(p, bcfg["BLOCK_P"]))](
            queries, k, grad_out, lse, dw, d_rows, gx, ds, gk,
            p, ck, c, lq, q0, float(scale), 1.0 / lq, side, g, 1.0 / p,
            sqn, sqq, sqc, k.stride(0), k.stride(1), k.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            BLOCK_Q=bcfg["BLOCK_Q"], BLOCK_P=bcfg["BLOCK_P"], BLOCK_C=bcfg["BLOCK_C"],
            BINS=g > 1, G_PAD=G_PAD, KEYS_IS_X=keys is None, FIRST=q0 == 0, IEEE=ieee,
            num_warps=bcfg["num_warps"], num_stages=bcfg["num_stages"])
    for q0 in range(0, lq, qcfg["BLOCK_Q"]):
        _context_content_pool_bwd_dq_kernel[(triton.cdiv(ck, qcfg["BLOCK_C"]), n_grp)](
            ds, k, gq, p, ck, lq, q0, n, per_grp, k.stride(0), k.stride(1), k.stride(2),
            BLOCK_Q=qcfg["BLOCK_Q"], BLOCK_P=qcfg["BLOCK_P"], BLOCK_C=qcfg["BLOCK_C"],
            IEEE=ieee, num_warps=qcfg["num_warps"], num_stages=qcfg["num_stages"])
    gq = gq.sum(0) if shared else gq  # fixed-order reduction over the frame groups
    return gx.to(x.dtype), gq.to(queries.dtype), gk.to(x.dtype)


# --------------------------------------------------------------------------- tier-2 specs
_UNIT = ("stride_qc", "stride_kc", "stride_xc", "stride_goc")


def _spec(name: str, fn, sig: dict, ce: dict, cfg: dict, ones: tuple[str, ...] = (),
          odd: tuple[str, ...] = ()) -> dict:
    """A COMPILE_SPECS entry as the JIT specialises a launch on contiguous inputs with
    16-divisible sizes (e.g. LLaMA-VID: P = 256, C = Ck = 1408): channel strides and ``ones``
    (side = grid = 1 for g = 1, NSPLIT = 1 without a P split) are 1 (constexpr), every other
    integer argument and every pointer is 16-divisible except ``odd`` (a split count: a plain
    i32)."""
    sig = dict(sig)
    ce = dict(ce)
    for k in (*_UNIT, *ones):
        if k in sig:
            sig[k] = "constexpr"
            ce[k] = 1
    sig.update({k: "constexpr" for k in ce})
    div16 = [k for k, v in sig.items() if (v.startswith("*") or v == "i32") and k not in odd]
    return {"name": name, "fn": fn, "signature": sig, "constexprs": ce,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "divisible_by_16": div16}


def _specs() -> list[dict]:
    """Every config the launchers can pick (issue 14), per dtype: BLOCK_Q 16 / 32 / 64
    (Lq <= 16, <= 32, > 32); the forward's single-block configs (every BLOCK_P with
    BLOCK_Q x BLOCK_P <= 8192), its multi-block one (PHASE 0) and the split-P phases 1 and 2,
    each also with ACCUM_W (a later 64-query chunk, Lq > 64); the pool kernel with and
    without content bins; the prep kernel (a split only changes PPS: the same code); the
    backward kernel with and without bins, keys = X or separate, FIRST and (Lq > 64) not;
    the grad_Q kernel. tests/tier2/test_spec_coverage.py records the launchers' launches
    over the ops' input space and checks each is one of these."""
    specs: list[dict] = []
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        ptr = "*" + ty[dt]
        ieee = dt == torch.float32
        fsig = dict(q_ptr=ptr, k_ptr=ptr, w_ptr="*fp32", lse_ptr="*fp32", part_ptr="*fp32",
                    P="i32", CK="i32", LQ="i32", q_start="i32", scale="fp32", inv_lq="fp32",
                    PPS="i32", NSPLIT="i32", stride_qn="i32", stride_qq="i32",
                    stride_qc="i32", stride_kn="i32", stride_kp="i32", stride_kc="i32")
        for bq in (16, 32, 64):
            lq = bq  # an Lq whose query block is bq
            accums = (False, True) if bq == 64 else (False,)
            fwd_cfgs = []  # (tag, cfg, phase)
            bp = 16
            while bq * bp <= 8192:  # single block: one BLOCK_P per next_pow2(P)
                fwd_cfgs.append((f"p{bp}", fwd_config(lq, dt, bp), 0))
                bp *= 2
            fwd_cfgs.append(("blocks", fwd_config(lq, dt), 0))
            for phase in (1, 2):
                fwd_cfgs.append((f"split_ph{phase}", _split_cfg(fwd_config(lq, dt), 2), phase))
            for tag, fc, phase in fwd_cfgs:
                for accum in accums:
                    ce = dict(BLOCK_Q=fc["BLOCK_Q"], BLOCK_P=fc["BLOCK_P"],
                              BLOCK_C=fc["BLOCK_C"], ACCUM_W=accum, IEEE=ieee,
                              SINGLE_BLOCK=fc["SINGLE_BLOCK"], PHASE=phase)
                    specs.append(_spec(f"ccp_fwd_{ty[dt]}_q{bq}_{tag}{'_acc' if accum else ''}",
                                       _context_content_pool_fwd_kernel, fsig, ce, fc,
                                       ("NSPLIT",) if phase == 0 else (),
                                       ("NSPLIT",) if phase else ()))
        for bins in (False, True):
            pc = pool_config(2 if bins else 1)
            ce = dict(BINS=bins, G_PAD=G_PAD, BLOCK_P=pc["BLOCK_P"], BLOCK_C=pc["BLOCK_C"])
            sig = dict(x_ptr=ptr, w_ptr="*fp32", out_ptr=ptr, P="i32", C="i32", side="i32",
                       grid="i32", inv_p="fp32", stride_xn="i32", stride_xp="i32",
                       stride_xc="i32", stride_on="i32", stride_or="i32")
            specs.append(_spec(f"ccp_pool_{ty[dt]}_{'bins' if bins else 'g1'}",
                               _context_content_pool_pool_kernel, sig, ce, pc,
                               () if bins else ("side", "grid")))
        for keys_is_x in (True, False):
            tag = "x" if keys_is_x else "k"
            sig = dict(q_ptr=ptr, k_ptr=ptr, x_ptr=ptr, go_ptr=ptr, lse_ptr="*fp32",
                       dw_ptr="*fp32", d_ptr="*fp32", P="i32", CK="i32", C="i32", LQ="i32",
                       q_start="i32", scale="fp32", PPS="i32", stride_qn="i32",
                       stride_qq="i32", stride_qc="i32", stride_kn="i32", stride_kp="i32",
                       stride_kc="i32", stride_xn="i32", stride_xp="i32", stride_xc="i32",
                       stride_gon="i32", stride_goc="i32")
            for bq in (16, 32, 64):
                pc = prep_config(bq, dt)
                ce = dict(BLOCK_Q=pc["BLOCK_Q"], BLOCK_P=pc["BLOCK_P"], BLOCK_C=pc["BLOCK_C"],
                          KEYS_IS_X=keys_is_x, IEEE=ieee)
                specs.append(_spec(f"ccp_bwd_prep_{ty[dt]}_{tag}_q{bq}",
                                   _context_content_pool_bwd_prep_kernel, sig, ce, pc))
            sig = dict(q_ptr=ptr, k_ptr=ptr, go_ptr=ptr, lse_ptr="*fp32", dw_ptr="*fp32",
                       d_ptr="*fp32", gx_ptr=ptr, ds_ptr="*fp32" if ieee else ptr,
                       gk_ptr=ptr, P="i32", CK="i32", C="i32", LQ="i32", q_start="i32",
                       scale="fp32", inv_lq="fp32", side="i32", grid="i32", inv_p="fp32",
                       stride_qn="i32", stride_qq="i32", stride_qc="i32", stride_kn="i32",
                       stride_kp="i32", stride_kc="i32", stride_gon="i32",
                       stride_gor="i32", stride_goc="i32")
            # (FIRST, fp32 gradient buffers): Lq > 64 runs several 64-query chunks into fp32
            # grad_x / grad_keys, the first one with FIRST
            chunked = [(True, True), (False, True)] if not ieee else [(False, True)]
            for bq in (16, 32, 64):
                bc = bwd_config(bq, dt)
                for bins in (False, True):
                    for first, acc32 in [(True, ieee)] + (chunked if bq == 64 else []):
                        ce = dict(BLOCK_Q=bc["BLOCK_Q"], BLOCK_P=bc["BLOCK_P"],
                                  BLOCK_C=bc["BLOCK_C"], BINS=bins, G_PAD=G_PAD,
                                  KEYS_IS_X=keys_is_x, FIRST=first, IEEE=ieee)
                        gsig = {**sig, "gx_ptr": "*fp32", "gk_ptr": "*fp32"} if acc32 else sig
                        name = (f"ccp_bwd_{ty[dt]}_{tag}_q{bq}_{'bins' if bins else 'g1'}"
                                f"{'' if first else '_acc'}"
                                f"{'_f32buf' if acc32 and first and not ieee else ''}")
                        specs.append(_spec(name, _context_content_pool_bwd_kernel, gsig, ce,
                                           bc, () if bins else ("side", "grid")))
        sig = dict(ds_ptr="*fp32" if ieee else ptr, k_ptr=ptr, gq_ptr="*fp32", P="i32",
                   CK="i32", LQ="i32", q_start="i32", N="i32", frames_per_group="i32",
                   stride_kn="i32", stride_kp="i32", stride_kc="i32")
        for bq in (16, 32, 64):
            qc = dq_config(bq, dt)
            ce = dict(BLOCK_Q=qc["BLOCK_Q"], BLOCK_P=qc["BLOCK_P"], BLOCK_C=qc["BLOCK_C"],
                      IEEE=ieee)
            specs.append(_spec(f"ccp_bwd_dq_{ty[dt]}_q{bq}", _context_content_pool_bwd_dq_kernel,
                               sig, ce, qc))
    return specs


COMPILE_SPECS: list[dict] = _specs()
