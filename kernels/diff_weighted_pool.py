"""Triton kernels for ``diff_weighted_pool`` (ViLAMP differential feature merging).

Math (spec: :mod:`lvlm_fast.reference.diff_weighted_pool`)::

    s[n,p] = (cos(q[n], A[n,p]) - cos(R[ref[n],p], B[n,p])) / tau      ref[n] = -1: no 2nd term
    w[n,:] = softmax_p s[n,:]          out[n] = sum_p w[n,p] X[n,p]       lse[n] = logsumexp_p s

``A`` (rel) and ``B`` (red) default to ``X``; then the kernels are specialised by constexpr
flags so X is loaded once and serves as all three.

Forward (``_diff_weighted_pool_fwd_kernel``): one program per frame (per (frame, patch
split) when N is small: :func:`p_splits`, partials merged by their lse). It loops over patch
blocks of ``BLOCK_P`` rows x the whole channel dim padded to ``BLOCK_D = next_pow2(D)``;
every dot product and norm of a row comes from the one tile load, so X (and A, B, the
referenced R row) is read exactly once. Online softmax (running max and sum, fp32) with an
fp32 accumulator of length ``BLOCK_D``. Masking: padded channels load as 0 (they change no
dot or norm); padded patch rows get score -inf (weight 0). With ``return_weights`` the raw
scores go to an fp32 (N, P) scratch and, after a barrier, a second cheap pass over that
scratch writes ``exp(s - lse)`` in x's dtype (the big inputs are not read again).

Backward (``_diff_weighted_pool_bwd_kernel``): one program per patch block, looping over
all frames. Each program owns its patches, so it writes dX/dA/dB tiles exactly once and
accumulates ``grad_ref_bank`` rows in an fp32 register tile, flushing (load+add+store) to
an fp32 buffer only when ``ref[n]`` changes: no atomics, deterministic, and each row is
written once when ``ref_index`` is sorted (ViLAMP's nearest preceding keyframe).
``grad_query`` (shared query) and ``grad_tau`` are per-program fp32 partials summed by torch
afterwards (deterministic). A per-frame query (N, Da) needs a sum over all patches of a
frame, which no patch-block program sees; the main kernel then stores two fp32 (N, P)
coefficients and ``_diff_weighted_pool_bwd_query_kernel`` (one program per frame) does
``dq[n] = sum_p u[n,p] A[n,p] - (sum_p v[n,p]) q[n] / |q[n]|^2`` — an extra read of A, only
in that mode. ``delta[n] = g[n].out[n]`` is precomputed in fp32 by torch (N x D, small).

Backward math: ``ds = w (g.X - delta)``, ``dc1 = ds/tau``, ``dc2 = -ds/tau`` (0 where
ref = -1), ``dtau = -sum ds s / tau``, ``d cos(a,b)/da = b/(na nb) - cos a/na^2`` with
``na = max(|a|, eps)``; the second term is dropped when ``|a| <= eps`` (the clamp is then
constant), so zero vectors get finite gradients.

Accumulation is fp32 throughout; outputs are in the input dtype (``lse`` fp32). Index math
is int64 (frame, patch and reference-row offsets), strides are passed for the two leading
dims and for ``ref_index`` (a strided view such as ``idx[::2]`` is read through its stride),
the channel dim must be unit-stride (the launcher copies otherwise). ``tau`` is read
in-kernel from its 0-d tensor (no host sync). Launch configs (BLOCK_P, num_warps) are
chosen from BLOCK_D and the number of live tiles so that the tiles stay in registers:
see :func:`fwd_config` / :func:`bwd_config` and ``COMPILE_SPECS`` (tier-2 checks zero spills
for sm_80 and sm_90). Launchers do not assert CUDA: tier-1 runs them under TRITON_INTERPRET=1.

Default configs (8 warps for 512 < BLOCK_D <= 4096, 4 below): D = 1152 (BLOCK_D 2048):
forward BLOCK_P = 2, backward BLOCK_P = 2 (1 with separate A and/or B); D = 3584
(BLOCK_D 4096): BLOCK_P = 1 for both. 16 warps would cap ptxas at 128 registers/thread,
which the backward cannot meet without spilling.

Bytes (ideal DRAM traffic, A = B = X, bf16; an estimate, not a measurement): the forward
reads X once (N*P*D*2 B) plus each referenced bank row (consecutive frames share a row, so
mostly L2 hits; at least K*P*D*2 B) and writes N*D*2 B. N = 10,240, P = 729: D = 1152 is
17.2 GB, about 5.1 ms at 3.35 TB/s (H100 SXM) / 8.4 ms at 2.04 TB/s (A100 80GB); D = 3584
is 53.5 GB, about 16 ms / 26 ms. The backward reads X and writes dX (2x those bytes) plus
an fp32 grad_ref_bank (K*P*Db*4, zeroed then read+written per flush); each program also
re-reads g[n] (N*D) per frame: L2 traffic of 1/BLOCK_P of X's bytes, in g's dtype.
Separate A and B triple the forward bytes and the backward's. Padding D to a power of two
idles 44% of the lanes at D = 1152 (12.5% at 3584); the kernel is still memory-bound by
a flop/byte estimate (~10 fp32 flops per padded element per 2 B read) but closer to the
fp32 roofline at D = 1152 than at 3584.

Limitations: one program per frame in the forward and one per patch block in the
backward, so very small N (forward) or very small P (backward) under-fill a large GPU.
D is supported up to 8192 in one launch (BLOCK_D = 8192 with one row per block, 16 warps;
not in the spill-checked specs). Wider values are split by channels when the weights do not
read them (``rel`` given, and ``red`` given or no reference bank): Qwen3-VL / Qwen3.5
ViLAMP passes values of D = 16384 (main + 3 DeepStack levels) with rel / red of 4096, run as
launches over channel chunks of ``SPLIT_D`` = 4096 (a spill-checked width), each computing
the same weights (bitwise: same inputs, same program) and its own output channels; in the
backward every chunk's gradients of the weight inputs (query, rel, red, ref_bank, tau) are
linear in that chunk's (go . x, go . out) and are summed in fp32 in chunk order (rounded to
the input dtype once per chunk for rel / red / ref_bank: the chunk launch writes them). A
value width above 8192 whose weights read it (A = X or B = X) raises a ValueError.

Compile coverage (issue 14; tests/tier2/test_spec_coverage.py): BLOCK_D / BLOCK_DA /
BLOCK_DB follow their dims, so the space is open. Checked (sm_80 / sm_90, zero spills):
D = Da = Db = 1152 (BLOCK 2048) and 3584 (BLOCK 4096), bf16 / fp16 / fp32, ViLAMP's two
calls (A = B = X; separate A / B) with every launch variant (whole-P and split-P forward,
return_weights, shared and per-frame query backward), the rarer variants (no ref bank; rel
without red) in bf16 (whole / split-P forward, shared-query backward), one fp64 config per
kernel. BLOCK_P depends on P only below 4
patches at these widths (P >= 4 gives P = 729's BLOCK_P), so every P >= 4 is covered.
Also checked (tests/tier2/test_spec_coverage.py): Qwen3-VL / Qwen3.5 ViLAMP's values of
16,384 channels with rel / red / bank of 4,096, launched as 4,096-channel chunks (BLOCK_D
4096, the D = 3584 entries' configs). NOT checked: other widths (any other BLOCK_D), Da / Db
!= D outside that pattern, the rarer variants in fp16 / fp32 / fp64 or with weights /
per-frame query, P < 4, and one-launch widths 4097-8192 (BLOCK_D 8192).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_kv import merge_partials

COS_EPS = 1e-8
MAX_BLOCK_D = 8192
SPLIT_D = 4096  # channel chunk of values wider than MAX_BLOCK_D (a spill-checked BLOCK_D)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _diff_weighted_pool_fwd_kernel(
    x_ptr, a_ptr, b_ptr, q_ptr, r_ptr, ref_ptr, tau_ptr,
    out_ptr, lse_ptr, s_ptr, w_ptr,
    P, D, DA, DB, PPS,
    stride_xn, stride_xp, stride_an, stride_ap, stride_bn, stride_bp,
    stride_qn, stride_rk, stride_rp, stride_on, stride_ref,
    HAS_REL: tl.constexpr, HAS_RED: tl.constexpr, HAS_REF: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
):  # fmt: skip
    EPS: tl.constexpr = 1e-8
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)  # patch split (0 unless the launcher splits P)
    p_lo = (sp * PPS).to(tl.int32)
    p_hi = tl.minimum(p_lo + PPS, P)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    tau = tl.load(tau_ptr).to(tl.float32)

    if HAS_REL:
        offs_a = tl.arange(0, BLOCK_DA)
        amask = offs_a < DA
    else:
        offs_a = offs_d
        amask = dmask
    q = tl.load(q_ptr + n * stride_qn + offs_a, mask=amask, other=0.0).to(tl.float32)
    nq = tl.maximum(tl.sqrt(tl.sum(q * q, 0)), EPS)

    if HAS_REF:
        if HAS_RED:
            offs_b = tl.arange(0, BLOCK_DB)
            bmask = offs_b < DB
        else:
            offs_b = offs_d
            bmask = dmask
        ref = tl.load(ref_ptr + n * stride_ref).to(tl.int64)
        has_ref = ref >= 0
        p_ref = P * has_ref.to(tl.int32)  # patch limit for R loads: 0 without a reference
        r_row = r_ptr + tl.maximum(ref, 0) * stride_rk

    x_row = x_ptr + n * stride_xn
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + offs_p
        pmask = p < p_hi
        pl = p.to(tl.int64)
        xt = tl.load(
            x_row + pl[:, None] * stride_xp + offs_d[None, :],
            mask=pmask[:, None] & dmask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_REL:
            at = tl.load(
                a_ptr + n * stride_an + pl[:, None] * stride_ap + offs_a[None, :],
                mask=pmask[:, None] & amask[None, :], other=0.0,
            ).to(tl.float32)
        else:
            at = xt
        na = tl.maximum(tl.sqrt(tl.sum(at * at, 1)), EPS)
        score = tl.sum(at * q[None, :], 1) / (nq * na)
        if HAS_REF:
            if HAS_RED:
                bt = tl.load(
                    b_ptr + n * stride_bn + pl[:, None] * stride_bp + offs_b[None, :],
                    mask=pmask[:, None] & bmask[None, :], other=0.0,
                ).to(tl.float32)
                nb = tl.maximum(tl.sqrt(tl.sum(bt * bt, 1)), EPS)
            else:
                bt = xt
                nb = tl.maximum(tl.sqrt(tl.sum(xt * xt, 1)), EPS) if HAS_REL else na
            # Frames without a reference load nothing: rt = 0 makes the 2nd cosine 0.
            rt = tl.load(
                r_row + pl[:, None] * stride_rp + offs_b[None, :],
                mask=(p < p_ref)[:, None] & bmask[None, :], other=0.0,
            ).to(tl.float32)
            nr = tl.maximum(tl.sqrt(tl.sum(rt * rt, 1)), EPS)
            score -= tl.sum(rt * bt, 1) / (nr * nb)
        score = score / tau
        score = tl.where(pmask, score, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, 0))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(score - m_new)
        l_i = l_i * alpha + tl.sum(e, 0)
        acc = acc * alpha + tl.sum(e[:, None] * xt, 0)
        m_i = m_new
        if RETURN_WEIGHTS:
            tl.store(s_ptr + n * P + pl, score, mask=pmask)

    out = acc / l_i
    # split P: row (split, n) of fp32 partials (out_ptr / lse_ptr are the partial buffers)
    row = sp * tl.num_programs(0) + n
    tl.store(out_ptr + row * stride_on + offs_d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + row, lse)
    if RETURN_WEIGHTS:
        # Scores were stored by other threads of this program: make them visible first.
        tl.debug_barrier()
        for p0 in range(0, P, 512):
            p = p0 + tl.arange(0, 512)
            pmask = p < P
            pl = p.to(tl.int64)
            s = tl.load(s_ptr + n * P + pl, mask=pmask, other=0.0)
            tl.store(w_ptr + n * P + pl, tl.exp(s - lse).to(w_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _diff_weighted_pool_bwd_kernel(
    g_ptr, x_ptr, a_ptr, b_ptr, q_ptr, r_ptr, ref_ptr, tau_ptr, lse_ptr, delta_ptr,
    dx_ptr, da_ptr, db_ptr, dr_ptr, dq_part_ptr, dtau_part_ptr, u_ptr, v_ptr,
    N, P, D, DA, DB,
    stride_gn, stride_xn, stride_xp, stride_an, stride_ap, stride_bn, stride_bp,
    stride_qn, stride_rk, stride_rp, stride_ref,
    HAS_REL: tl.constexpr, HAS_RED: tl.constexpr, HAS_REF: tl.constexpr,
    QUERY_PER_FRAME: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
):  # fmt: skip
    EPS: tl.constexpr = 1e-8
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    pl = p.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    m2x = pmask[:, None] & dmask[None, :]
    tau = tl.load(tau_ptr).to(tl.float32)
    if HAS_REL:
        offs_a = tl.arange(0, BLOCK_DA)
        amask = offs_a < DA
    else:
        offs_a = offs_d
        amask = dmask
    m2a = pmask[:, None] & amask[None, :]
    if HAS_RED:
        offs_b = tl.arange(0, BLOCK_DB)
        bmask = offs_b < DB
    else:
        offs_b = offs_d
        bmask = dmask
    m2b = pmask[:, None] & bmask[None, :]

    if not QUERY_PER_FRAME:
        q = tl.load(q_ptr + offs_a, mask=amask, other=0.0).to(tl.float32)
        q_norm = tl.sqrt(tl.sum(q * q, 0))
        nq = tl.maximum(q_norm, EPS)
        acc_q = tl.zeros([BLOCK_DA], dtype=tl.float32)
        sum_cq = tl.zeros([], dtype=tl.float32)
    sum_tau = tl.zeros([], dtype=tl.float32)
    if HAS_REF:
        acc_r = tl.zeros([BLOCK_P, BLOCK_DB], dtype=tl.float32)
        prev = tl.zeros([], dtype=tl.int64) - 1
        # fp32 buffer (K, P, DB), contiguous, zero-initialised by the launcher.
        dr_off = pl[:, None] * DB + offs_b[None, :]

    for n in range(0, N):
        n64 = n + tl.zeros([], dtype=tl.int64)
        if QUERY_PER_FRAME:
            q = tl.load(q_ptr + n64 * stride_qn + offs_a, mask=amask, other=0.0).to(tl.float32)
            q_norm = tl.sqrt(tl.sum(q * q, 0))
            nq = tl.maximum(q_norm, EPS)
        g = tl.load(g_ptr + n64 * stride_gn + offs_d, mask=dmask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + n64)
        delta = tl.load(delta_ptr + n64)
        xt = tl.load(
            x_ptr + n64 * stride_xn + pl[:, None] * stride_xp + offs_d[None, :],
            mask=m2x, other=0.0,
        ).to(tl.float32)
        if HAS_REL:
            at = tl.load(
                a_ptr + n64 * stride_an + pl[:, None] * stride_ap + offs_a[None, :],
                mask=m2a, other=0.0,
            ).to(tl.float32)
        else:
            at = xt
        a_norm = tl.sqrt(tl.sum(at * at, 1))
        na = tl.maximum(a_norm, EPS)
        c1 = tl.sum(at * q[None, :], 1) / (nq * na)
        score = c1
        if HAS_REF:
            ref = tl.load(ref_ptr + n64 * stride_ref).to(tl.int64)
            has_ref = ref >= 0
            if HAS_RED:
                bt = tl.load(
                    b_ptr + n64 * stride_bn + pl[:, None] * stride_bp + offs_b[None, :],
                    mask=m2b, other=0.0,
                ).to(tl.float32)
                b_norm = tl.sqrt(tl.sum(bt * bt, 1))
            else:
                bt = xt
                b_norm = tl.sqrt(tl.sum(xt * xt, 1)) if HAS_REL else a_norm
            nb = tl.maximum(b_norm, EPS)
            rt = tl.load(
                r_ptr + tl.maximum(ref, 0) * stride_rk + pl[:, None] * stride_rp
                + offs_b[None, :],
                mask=(p < P * has_ref.to(tl.int32))[:, None] & bmask[None, :], other=0.0,
            ).to(tl.float32)
            r_norm = tl.sqrt(tl.sum(rt * rt, 1))
            nr = tl.maximum(r_norm, EPS)
            c2 = tl.sum(rt * bt, 1) / (nr * nb)
            score = score - c2
        score = score / tau
        w = tl.where(pmask, tl.exp(score - lse), 0.0)
        ds = w * (tl.sum(g[None, :] * xt, 1) - delta)
        sum_tau += tl.sum(ds * score, 0)
        dc1 = ds / tau

        # d cos(q, a) / da and / dq share the coefficient dc1 / (|q| |a|).
        k1 = dc1 / (nq * na)
        h1 = tl.where(a_norm > EPS, dc1 * c1 / (na * na), 0.0)
        da = k1[:, None] * q[None, :] - h1[:, None] * at
        if QUERY_PER_FRAME:
            tl.store(u_ptr + n64 * P + pl, k1, mask=pmask)
            tl.store(v_ptr + n64 * P + pl, dc1 * c1, mask=pmask)
        else:
            acc_q += tl.sum(k1[:, None] * at, 0)
            sum_cq += tl.sum(dc1 * c1, 0)

        dx = w[:, None] * g[None, :]
        dst = n64 * P * D + pl[:, None] * D + offs_d[None, :]
        if HAS_REL:
            tl.store(
                da_ptr + n64 * P * DA + pl[:, None] * DA + offs_a[None, :],
                da.to(da_ptr.dtype.element_ty), mask=m2a,
            )
        else:
            dx += da

        if HAS_REF:
            dc2 = tl.where(has_ref, -dc1, 0.0)
            k2 = dc2 / (nr * nb)
            hb = tl.where(b_norm > EPS, dc2 * c2 / (nb * nb), 0.0)
            hr = tl.where(r_norm > EPS, dc2 * c2 / (nr * nr), 0.0)
            db = k2[:, None] * rt - hb[:, None] * bt
            if HAS_RED:
                tl.store(
                    db_ptr + n64 * P * DB + pl[:, None] * DB + offs_b[None, :],
                    db.to(db_ptr.dtype.element_ty), mask=m2b,
                )
            else:
                dx += db
            # Flush the running grad_ref_bank row when the reference changes (frames with
            # ref = -1 contribute nothing and do not break a run).
            if has_ref & (ref != prev):
                if prev >= 0:
                    tl.debug_barrier()  # earlier flushes by other threads must be visible
                    cur = tl.load(dr_ptr + prev * P * DB + dr_off, mask=m2b, other=0.0)
                    tl.store(dr_ptr + prev * P * DB + dr_off, cur + acc_r, mask=m2b)
                acc_r = tl.zeros([BLOCK_P, BLOCK_DB], dtype=tl.float32)
                prev = ref
            acc_r += k2[:, None] * bt - hr[:, None] * rt

        tl.store(dx_ptr + dst, dx.to(dx_ptr.dtype.element_ty), mask=m2x)

    if HAS_REF:  # noqa: SIM102 (constexpr branch around a runtime one)
        if prev >= 0:
            tl.debug_barrier()
            cur = tl.load(dr_ptr + prev * P * DB + dr_off, mask=m2b, other=0.0)
            tl.store(dr_ptr + prev * P * DB + dr_off, cur + acc_r, mask=m2b)
    if not QUERY_PER_FRAME:
        dq = acc_q - tl.where(q_norm > EPS, sum_cq / (nq * nq), 0.0) * q
        tl.store(dq_part_ptr + pid.to(tl.int64) * DA + offs_a, dq, mask=amask)
    tl.store(dtau_part_ptr + pid, -sum_tau / tau)


@triton.jit
def _diff_weighted_pool_bwd_query_kernel(
    a_ptr, q_ptr, u_ptr, v_ptr, dq_ptr,
    P, DA, stride_an, stride_ap, stride_qn,
    BLOCK_P: tl.constexpr, BLOCK_DA: tl.constexpr,
):  # fmt: skip
    """Per-frame query only: dq[n] = sum_p u[n,p] A[n,p] - (sum_p v[n,p]) q[n] / |q[n]|^2."""
    EPS: tl.constexpr = 1e-8
    n = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_DA)
    amask = offs_a < DA
    q = tl.load(q_ptr + n * stride_qn + offs_a, mask=amask, other=0.0).to(tl.float32)
    q_norm = tl.sqrt(tl.sum(q * q, 0))
    nq = tl.maximum(q_norm, EPS)
    acc = tl.zeros([BLOCK_DA], dtype=tl.float32)
    sum_v = tl.zeros([], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < P
        pl = p.to(tl.int64)
        at = tl.load(
            a_ptr + n * stride_an + pl[:, None] * stride_ap + offs_a[None, :],
            mask=pmask[:, None] & amask[None, :], other=0.0,
        ).to(tl.float32)
        u = tl.load(u_ptr + n * P + pl, mask=pmask, other=0.0)
        acc += tl.sum(u[:, None] * at, 0)
        sum_v += tl.sum(tl.load(v_ptr + n * P + pl, mask=pmask, other=0.0), 0)
    dq = acc - tl.where(q_norm > EPS, sum_v / (nq * nq), 0.0) * q
    tl.store(dq_ptr + n * DA + offs_a, dq, mask=amask)


# --------------------------------------------------------------------------- configs
# Register budget: a (BLOCK_P, BLOCK_D) fp32 tile costs BLOCK_P * BLOCK_D / (32 * num_warps)
# registers per thread. The budgets below keep every live tile plus temporaries under the
# 255-register cap with zero spills (checked by tests/tier2 for sm_80 and sm_90).
_FWD_ELEMS = {1: 32, 2: 16, 3: 16, 4: 16}  # per-thread elements per tile, by live tiles
_BWD_ELEMS = {1: 16, 2: 16, 3: 8, 4: 8}


def _num_warps(block_d: int) -> int:
    # 8 warps keep the per-thread register cap at 255 (16 warps would cap it at 128, which
    # the backward cannot meet); 16 only for BLOCK_D = 8192 (beyond the checked configs).
    return 4 if block_d <= 512 else (8 if block_d <= 4096 else 16)


def _block_p(block_d: int, num_warps: int, elems: int, p: int | None) -> int:
    bp = max(1, elems * 32 * num_warps // block_d)
    bp = min(bp, 16)
    if p is not None:
        bp = min(bp, triton.next_power_of_2(p))
    return bp


def _live_tiles(has_rel: bool, has_red: bool, has_ref: bool) -> int:
    return 1 + int(has_rel) + int(has_ref) * (1 + int(has_red))


def fwd_config(block_d: int, has_rel: bool, has_red: bool, has_ref: bool,
               p: int | None = None, return_weights: bool = False) -> tuple[int, int]:
    """(BLOCK_P, num_warps) for the forward kernel. With return_weights and all four tiles
    live (separate A and B, ref bank) the weights pass halves the tile: at D 1152 (BLOCK_D
    2048) fp32, BLOCK_P 2 spilled 8/8 B on sm_90 (128 registers); BLOCK_P 1 uses <= 88."""
    nw = _num_warps(block_d)
    live = _live_tiles(has_rel, has_red, has_ref)
    elems = _FWD_ELEMS[live] // (2 if return_weights and live == 4 else 1)
    return _block_p(block_d, nw, elems, p), nw


def bwd_config(block_d: int, has_rel: bool, has_red: bool, has_ref: bool,
               p: int | None = None) -> tuple[int, int]:
    """(BLOCK_P, num_warps) for the backward kernel."""
    nw = _num_warps(block_d)
    elems = _BWD_ELEMS[_live_tiles(has_rel, has_red, has_ref)]
    return _block_p(block_d, nw, elems, p), nw


def query_config(block_da: int, p: int | None = None) -> tuple[int, int]:
    nw = _num_warps(block_da)
    return _block_p(block_da, nw, 32, p), nw


# --------------------------------------------------------------------------- launchers
# Occupancy at small N (a vision chunk of 17-38 frames on 132 SMs): the forward splits P
# across programs (grid (N, splits)), each writing an fp32 partial and its lse, merged by
# the split-KV merge kernel (kernels/split_kv.py). Only without return_weights (the
# weights need the frame's final lse inside the kernel).
SPLIT_TARGET_PROGRAMS = 264  # 2 waves on 132 SMs
SPLIT_MIN_PATCHES = 64


def p_splits(n: int, p: int, block_p: int, return_weights: bool) -> tuple[int, int]:
    """(splits, patches per split, a multiple of BLOCK_P); (1, P) when N fills the GPU."""
    if return_weights or n >= SPLIT_TARGET_PROGRAMS or p <= SPLIT_MIN_PATCHES:
        return 1, p
    want = min(triton.cdiv(SPLIT_TARGET_PROGRAMS, n), triton.cdiv(p, SPLIT_MIN_PATCHES))
    per = triton.cdiv(triton.cdiv(p, want), block_p) * block_p
    return triton.cdiv(p, per), per


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """Kernels assume a unit-stride channel dim; copy once otherwise."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def _block(d: int) -> int:
    b = triton.next_power_of_2(d)
    if b > MAX_BLOCK_D:
        raise ValueError(f"diff_weighted_pool Triton kernels support channel dims up to "
                         f"{MAX_BLOCK_D}, got {d}")
    return b


def _query_mode(query: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    """(query as 2-D, per_frame). (Da,) and (1, Da) are shared by every frame."""
    q2 = query if query.dim() == 2 else query.unsqueeze(0)
    return q2, q2.shape[0] != 1


def _tau32(tau: torch.Tensor) -> torch.Tensor:
    return tau.reshape(1).to(torch.float32)


def _value_chunks(x: torch.Tensor, rel: torch.Tensor | None, red: torch.Tensor | None,
                  ref_bank: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """Channel chunks [c0, c1) for values wider than one launch takes, or None."""
    d = x.shape[-1]
    if triton.next_power_of_2(d) <= MAX_BLOCK_D:
        return None
    if rel is None or (red is None and ref_bank is not None):
        raise ValueError(f"diff_weighted_pool Triton kernels take values of up to "
                         f"{MAX_BLOCK_D} channels when the weights read them (A = X or B = X); "
                         f"got D = {d}: pass rel (and red) to split the values by channels")
    return [(c, min(c + SPLIT_D, d)) for c in range(0, d, SPLIT_D)]


def diff_weighted_pool_fwd(
    x: torch.Tensor,
    query: torch.Tensor,
    ref_bank: torch.Tensor | None,
    ref_index: torch.Tensor | None,
    rel: torch.Tensor | None,
    red: torch.Tensor | None,
    tau: torch.Tensor,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (out (N, D) x.dtype, weights (N, P) x.dtype or
    (0,), lse (N,) fp32)."""
    chunks = _value_chunks(x, rel, red, ref_bank)
    if chunks is not None:  # wide values: one launch per channel chunk (module doc)
        parts = [diff_weighted_pool_fwd(x[..., c0:c1], query, ref_bank, ref_index, rel, red,
                                        tau, return_weights) for c0, c1 in chunks]
        return torch.cat([o for o, _, _ in parts], dim=-1), parts[0][1], parts[0][2]
    x, rel, red, ref_bank = (_unit_last(t) for t in (x, rel, red, ref_bank))
    n, p, d = x.shape
    q2, _ = _query_mode(_unit_last(query), n)
    has_rel, has_red, has_ref = rel is not None, red is not None, ref_bank is not None
    if not has_ref:
        has_red = False  # no redundancy term: B is never read
    a = rel if has_rel else x
    b = red if has_red else x
    da, db = a.shape[2], b.shape[2]
    block_d = _block(d)
    block_da = _block(da)
    block_db = _block(db)
    block_p, num_warps = fwd_config(max(block_d, block_da, block_db), has_rel, has_red,
                                    has_ref, p, return_weights)
    r = ref_bank if has_ref else x
    ref = ref_index if has_ref else x  # dummy pointer, never read

    out = torch.empty((n, d), device=x.device, dtype=x.dtype)
    lse = torch.empty((n,), device=x.device, dtype=torch.float32)
    if return_weights:
        s_buf = torch.empty((n, p), device=x.device, dtype=torch.float32)
        weights = s_buf if x.dtype == torch.float32 else torch.empty_like(s_buf, dtype=x.dtype)
    else:
        s_buf = lse  # dummy pointers, never written
        weights = x.new_empty((0,))
    nsplit, pps = p_splits(n, p, block_p, return_weights)
    if nsplit > 1:  # fp32 partials per (patch split, frame), merged with their lse below
        o_dst = torch.empty((nsplit, n, d), device=x.device, dtype=torch.float32)
        l_dst = torch.empty((nsplit, n), device=x.device, dtype=torch.float32)
    else:
        o_dst, l_dst = out, lse
    _diff_weighted_pool_fwd_kernel[(n, nsplit)](
        x, a, b, q2, r, ref, _tau32(tau),
        o_dst, l_dst, s_buf, weights if return_weights else lse,
        p, d, da, db, pps,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        q2.stride(0) if q2.shape[0] != 1 else 0, r.stride(0), r.stride(1), o_dst.stride(-2),
        ref_index.stride(0) if has_ref else 0,
        HAS_REL=has_rel, HAS_RED=has_red, HAS_REF=has_ref, RETURN_WEIGHTS=return_weights,
        BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_DA=block_da, BLOCK_DB=block_db,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if nsplit > 1:
        lse = merge_partials(o_dst.view(nsplit, 1, 1, n, d), l_dst.view(nsplit, 1, 1, n),
                             out.view(1, 1, n, d)).view(n)
    return out, weights, lse


def diff_weighted_pool_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    query: torch.Tensor,
    ref_bank: torch.Tensor | None,
    ref_index: torch.Tensor | None,
    rel: torch.Tensor | None,
    red: torch.Tensor | None,
    tau: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel(s). Returns (grad_x, grad_query, grad_ref_bank, grad_rel,
    grad_red, grad_tau); absent rel/red/ref_bank get (0,) tensors, grad_tau is 0-d fp32."""
    chunks = _value_chunks(x, rel, red, ref_bank)
    if chunks is not None:  # wide values: per-chunk gradients (module doc)
        parts = [diff_weighted_pool_bwd(grad_out[..., c0:c1], x[..., c0:c1], query, ref_bank,
                                        ref_index, rel, red, tau, out[..., c0:c1], lse)
                 for c0, c1 in chunks]

        def total(i: int) -> torch.Tensor:
            acc = parts[0][i].to(torch.float32)
            for part in parts[1:]:
                acc = acc + part[i].to(torch.float32)
            return acc.to(parts[0][i].dtype)

        return (torch.cat([g[0] for g in parts], dim=-1), *(total(i) for i in range(1, 6)))
    x, rel, red, ref_bank, grad_out = (_unit_last(t) for t in (x, rel, red, ref_bank, grad_out))
    n, p, d = x.shape
    q2, per_frame = _query_mode(_unit_last(query), n)
    has_rel, has_ref = rel is not None, ref_bank is not None
    has_red = red is not None and has_ref
    a = rel if has_rel else x
    b = red if has_red else x
    da, db = a.shape[2], b.shape[2]
    block_d, block_da, block_db = _block(d), _block(da), _block(db)
    block_p, num_warps = bwd_config(max(block_d, block_da, block_db), has_rel, has_red,
                                    has_ref, p)
    r = ref_bank if has_ref else x
    ref = ref_index if has_ref else x
    dev = x.device
    f32 = torch.float32

    delta = (grad_out.to(f32) * out.to(f32)).sum(-1)  # (N,): g[n] . out[n]
    grad_x = torch.empty((n, p, d), device=dev, dtype=x.dtype)
    grad_rel = torch.empty((n, p, da), device=dev, dtype=x.dtype) if has_rel else None
    grad_red = torch.empty((n, p, db), device=dev, dtype=x.dtype) if has_red else None
    dr = torch.zeros((ref_bank.shape[0], p, db), device=dev, dtype=f32) if has_ref else None
    n_prog = triton.cdiv(p, block_p)
    dq_part = torch.empty((n_prog, da), device=dev, dtype=f32) if not per_frame else None
    dtau_part = torch.empty((n_prog,), device=dev, dtype=f32)
    uv = torch.empty((2, n, p), device=dev, dtype=f32) if per_frame else None
    dummy = dtau_part
    _diff_weighted_pool_bwd_kernel[(n_prog,)](
        grad_out, x, a, b, q2, r, ref, _tau32(tau), lse, delta,
        grad_x, grad_rel if has_rel else dummy, grad_red if has_red else dummy,
        dr if has_ref else dummy, dq_part if not per_frame else dummy, dtau_part,
        uv[0] if per_frame else dummy, uv[1] if per_frame else dummy,
        n, p, d, da, db,
        grad_out.stride(0), x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), q2.stride(0), r.stride(0), r.stride(1),
        ref_index.stride(0) if has_ref else 0,
        HAS_REL=has_rel, HAS_RED=has_red, HAS_REF=has_ref, QUERY_PER_FRAME=per_frame,
        BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_DA=block_da, BLOCK_DB=block_db,
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    if per_frame:
        dq = torch.empty((n, da), device=dev, dtype=f32)
        qbp, qnw = query_config(block_da, p)
        _diff_weighted_pool_bwd_query_kernel[(n,)](
            a, q2, uv[0], uv[1], dq, p, da, a.stride(0), a.stride(1), q2.stride(0),
            BLOCK_P=qbp, BLOCK_DA=block_da, num_warps=qnw, num_stages=1,
        )  # fmt: skip
    else:
        dq = dq_part.sum(0)
    grad_query = dq.to(query.dtype).reshape(query.shape)
    empty = x.new_empty((0,))
    grad_ref_bank = dr.to(ref_bank.dtype) if has_ref else empty
    # red without ref_bank (only reachable through the raw op) is never read: zero grad.
    grad_red_out = grad_red if has_red else (torch.zeros_like(red) if red is not None else empty)
    grad_tau = dtau_part.sum()
    return (grad_x, grad_query, grad_ref_bank,
            grad_rel if has_rel else empty, grad_red_out, grad_tau)


# --------------------------------------------------------------------------- tier-2 specs
def _specs() -> list[dict]:
    """One entry per kernel x dtype x (A=B=X | separate A/B) at the launcher's default
    configs for D = 1152 (SigLIP-so400m width) and D = 3584 (Qwen2-7B width)."""
    specs = []
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for d in (1152, 3584):
        bd = triton.next_power_of_2(d)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            t = "*" + ty[dt]
            # (tag, HAS_REL, HAS_RED, HAS_REF): ViLAMP's two calls (A = B = X without the
            # DFM projections, separate A / B with them) in every dtype; the rarer variants
            # in bf16 only
            variants = [("AB=X", False, False, True), ("sepAB", True, True, True)]
            if dt == torch.bfloat16:
                variants += [("noref", False, False, False), ("relonly", True, False, True)]
            vilamp = ("AB=X", "sepAB")
            for vname, has_rel, has_red, has_ref in variants:
                tag = f"D{d}_{ty[dt]}_{vname}"
                bp, nw = fwd_config(bd, has_rel, has_red, has_ref)
                sig = {k: t for k in ("x_ptr", "a_ptr", "b_ptr", "q_ptr", "r_ptr")}
                # without RETURN_WEIGHTS the launcher passes lse (fp32) as the unused w_ptr
                sig.update(ref_ptr="*i64", tau_ptr="*fp32", out_ptr=t, lse_ptr="*fp32",
                           s_ptr="*fp32", w_ptr="*fp32")
                sig.update({k: "i32" for k in ("P", "D", "DA", "DB", "PPS", "stride_xn",
                                               "stride_xp", "stride_an", "stride_ap",
                                               "stride_bn", "stride_bp", "stride_qn",
                                               "stride_rk", "stride_rp", "stride_on",
                                               "stride_ref")})
                ce = dict(HAS_REL=has_rel, HAS_RED=has_red, HAS_REF=has_ref, RETURN_WEIGHTS=False,
                          BLOCK_P=bp, BLOCK_D=bd, BLOCK_DA=bd, BLOCK_DB=bd)
                sig.update({k: "constexpr" for k in ce})
                base = {"name": f"dwp_fwd_{tag}", "fn": _diff_weighted_pool_fwd_kernel,
                        "signature": sig, "constexprs": ce, "num_warps": nw,
                        "num_stages": 1, "divisible_by_16": _div16(sig)}
                specs.append(base)
                if vname in vilamp or dt != torch.float32:
                    # split P (small N): fp32 partial outputs
                    specs.append({**base, "name": f"dwp_fwd_{tag}_split",
                                  "signature": {**sig, "out_ptr": "*fp32"}})
                if vname in vilamp:
                    # return_weights adds the second pass over the fp32 scores
                    bp_w, _ = fwd_config(bd, has_rel, has_red, has_ref, None, True)
                    specs.append({**base, "name": f"dwp_fwd_{tag}_weights",
                                  "signature": {**sig, "w_ptr": t},
                                  "constexprs": {**ce, "RETURN_WEIGHTS": True,
                                                 "BLOCK_P": bp_w}})

                bp, nw = bwd_config(bd, has_rel, has_red, has_ref)
                sig = {k: t for k in ("g_ptr", "x_ptr", "a_ptr", "b_ptr", "q_ptr", "r_ptr")}
                sig.update(ref_ptr="*i64", tau_ptr="*fp32", lse_ptr="*fp32",
                           delta_ptr="*fp32", dx_ptr=t, dr_ptr="*fp32",
                           # absent grad_rel / grad_red: the launcher passes an fp32 dummy
                           da_ptr=t if has_rel else "*fp32", db_ptr=t if has_red else "*fp32",
                           dq_part_ptr="*fp32", dtau_part_ptr="*fp32", u_ptr="*fp32",
                           v_ptr="*fp32")
                sig.update({k: "i32" for k in ("N", "P", "D", "DA", "DB", "stride_gn",
                                               "stride_xn", "stride_xp", "stride_an",
                                               "stride_ap", "stride_bn", "stride_bp",
                                               "stride_qn", "stride_rk", "stride_rp",
                                               "stride_ref")})
                for per_frame in (False, True) if vname in vilamp else (False,):
                    ce = dict(HAS_REL=has_rel, HAS_RED=has_red, HAS_REF=has_ref,
                              QUERY_PER_FRAME=per_frame, BLOCK_P=bp, BLOCK_D=bd,
                              BLOCK_DA=bd, BLOCK_DB=bd)
                    sig_b = {**sig, **{k: "constexpr" for k in ce}}
                    specs.append({"name": f"dwp_bwd_{tag}{'_qpf' if per_frame else ''}",
                                  "fn": _diff_weighted_pool_bwd_kernel, "signature": sig_b,
                                  "constexprs": ce, "num_warps": nw, "num_stages": 1,
                                  "divisible_by_16": _div16(sig_b)})
            bp, nw = query_config(bd)
            sig = {"a_ptr": t, "q_ptr": t, "u_ptr": "*fp32", "v_ptr": "*fp32",
                   "dq_ptr": "*fp32", "P": "i32", "DA": "i32", "stride_an": "i32",
                   "stride_ap": "i32", "stride_qn": "i32", "BLOCK_P": "constexpr",
                   "BLOCK_DA": "constexpr"}
            specs.append({"name": f"dwp_bwd_query_D{d}_{ty[dt]}",
                          "fn": _diff_weighted_pool_bwd_query_kernel, "signature": sig,
                          "constexprs": {"BLOCK_P": bp, "BLOCK_DA": bd}, "num_warps": nw,
                          "num_stages": 1, "divisible_by_16": _div16(sig)})
    # fp64 inputs run these kernels (fp32 accumulation): one config per kernel
    specs += [_as_fp64(s) for s in specs if s["name"] in (
        "dwp_fwd_D1152_bf16_AB=X", "dwp_bwd_D1152_bf16_AB=X", "dwp_bwd_query_D1152_bf16")]
    return specs


def _as_fp64(spec: dict) -> dict:
    """The same launch with fp64 data pointers (fp32 scratch unchanged): fp64 inputs reach
    this kernel on CUDA, so it must compile for them too (tier 2, issue 9.4)."""
    sig = {k: "*fp64" if v == "*bf16" else v for k, v in spec["signature"].items()}
    return {**spec, "signature": sig, "name": spec["name"].replace("bf16", "fp64")}


def _div16(sig: dict) -> list[str]:
    """Args the JIT would mark 16-divisible for contiguous SigLIP/Qwen-width inputs:
    pointers (torch allocations are aligned) and the row strides (D % 16 == 0)."""
    return [k for k, v in sig.items()
            if v.startswith("*") or (k.startswith("stride_") and k not in ("stride_qn",
                                                                            "stride_ref"))]


COMPILE_SPECS: list[dict] = _specs()
