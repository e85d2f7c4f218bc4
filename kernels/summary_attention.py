"""Triton kernels for ``summary_attention`` (Video-XL window attention, flash-style).

Spec: :mod:`lvlm_fast.reference.summary_attention`; definitions in
:mod:`lvlm_fast.ops.summary_attention`. Query i (of Lq) sees key j (of S) iff
``j <= S - Lq + i`` (bottom-right causal); query head h reads KV head ``h // G``.

Forward (``_summary_attention_fwd_kernel``): one program per (BLOCK_M queries, b, h).
Q tile (BLOCK_M, BLOCK_D) stays in registers; the program walks key blocks of BLOCK_N up
to the last key its last query can see (keys past it are skipped, not masked), computing
scores with ``tl.dot`` in fp32, an online softmax in base 2 (scale folded with log2 e),
and the fp32 output accumulator. No score matrix touches memory. Key mass
(``_summary_attention_mass_kernel``, when asked): one program per (BLOCK_N keys, b,
KV head) recomputes the scores of the G heads' query blocks that see its keys, normalises
them with the saved lse and sums the columns in registers into a (B, Hkv, S) fp32 partial;
the launcher sums it over the KV heads (fixed order: deterministic, no atomics).

Decode / small Lq (``_summary_attention_splitkv_kernel``, flash-decoding; chosen by
:func:`use_splitkv`: Lq <= 16 and no key mass): grid (key splits, B * Hkv * row blocks).
The G query heads of one KV head are packed into one program's rows (row r = g * Lq + i,
row blocks of <= 32), so each K/V tile of the group is read once, not G times; S is split
into ranges of a multiple of BLOCK_N keys (:func:`splitkv_splits`: ~4 waves of programs,
>= 256 keys per split). Each program writes an fp32 partial normalised by its own sum and
its lse; a row whose split holds no key it may see (the causal tail) writes 0 / -inf. The
shared merge kernel (:mod:`.split_kv`, also used by qformer_cross_attention) combines the
partials with their log-sum-exps into ``out`` and ``lse`` (one more launch).

Backward: ``delta = rowsum(dO * O)`` (fp32, torch, one small pass in the launcher), then
``_summary_attention_bwd_kernel`` (dK/dV): one program per (BLOCK_N keys, b, kv-head),
looping over the G query heads of that KV head and over the query blocks that can see
its keys, accumulating dK and dV in fp32 registers (no atomics: each program owns its
rows), and ``_summary_attention_bwd_dq_kernel`` (dQ): one program per (BLOCK_M, b, h)
walking the visible key blocks like the forward.

Masking: head dims 80/96 are padded to BLOCK_D = 128 (masked loads give 0, which leaves
dot products unchanged); query rows >= Lq and key columns >= S are masked on load and
store. Every query sees key 0, so no row is empty. Accumulation fp32 throughout; fp32
inputs use tl.dot's default TF32 tensor-core dots (~1e-3 relative error on GPU, like cuBLAS
with TF32 on; IEEE and 3xTF32 fp32 dots spill at head dim 128 - measured with ptxas).
Program bases (batch/head) are int64; row offsets inside one head's slice (``row * stride``)
are int32, or int64 (constexpr I64) when the launcher finds a slice of any input or output
spanning >= 2^31 elements (e.g. the output at ~600K query rows, Hq = 28, D = 128).
fp64 inputs run the reference (Triton rejects the fp64-promoted loop-carried accumulators
at compile time).
Strides of every input are honoured (k/v are views of a preallocated cache); the last
dim must be unit-stride (the launcher copies once otherwise). Output: a (B, Hq, Lq, D)
view of a contiguous (B, Lq, Hq, D) tensor. Launchers do not assert CUDA.

Default configs: :func:`fwd_config`, :func:`bwd_config`, :func:`dq_config` (by dtype and
padded head dim; every one is in COMPILE_SPECS and compiles without spills for sm_80/90).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .split_kv import finish_partial, merge_partials, online_softmax_step

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _rows(offs, I64: tl.constexpr):
    """Row indices for a ``rows * stride`` offset: int64 when the launcher found a span of
    >= 2^31 elements inside one (batch, head) slice (I64), else int32 (cheaper)."""
    if I64:
        return offs.to(tl.int64)
    else:
        return offs


@triton.jit
def _summary_attention_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    Hq, G, Lq, S, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    rows_m = _rows(offs_m, I64)
    q_ptrs = Q + b * sqb + h * sqh + rows_m[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    shift = S - Lq
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = tl.minimum(S, shift + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < S
        kt = tl.load(k_base + _rows(offs_n, I64)[None, :] * skn + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, kt)
        valid = (offs_n[None, :] <= shift + offs_m[:, None]) & nmask[None, :]
        s = tl.where(valid, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + _rows(offs_n, I64)[:, None] * svn + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    acc = acc / l_i[:, None]
    lse2 = m_i + tl.log2(l_i)
    o_ptrs = O + b * sob + h * soh + rows_m[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + (b * Hq + h) * Lq + offs_m, lse2 * 0.6931471805599453, mask=mmask)


@triton.jit
def _summary_attention_mass_kernel(
    Q, K, LSE, MASSP,
    sqb, sqh, sqm, skb, skh, skn,
    Hq, Hkv, G, Lq, S, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    # key mass of BLOCK_N keys over the G query heads of one KV head (per-program partial,
    # no atomics): walks the query blocks that can see the keys, like the dK/dV kernel
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < S
    dmask = offs_d < D
    k = tl.load(K + b * skb + hk * skh + _rows(offs_n, I64)[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    shift = S - Lq
    qk_scale = scale * 1.4426950408889634
    lo = tl.maximum(start_n - shift, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    mass = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        row_base = (b * Hq + h) * Lq
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mmask = offs_m < Lq
            q = tl.load(q_base + _rows(offs_m, I64)[:, None] * sqm + offs_d[None, :],
                        mask=mmask[:, None] & dmask[None, :], other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k))
            valid = (offs_n[None, :] <= shift + offs_m[:, None]) & nmask[None, :]
            valid = valid & mmask[:, None]
            p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            mass += tl.sum(p, 0)
    tl.store(MASSP + (b * Hkv + hk) * S + offs_n, mass, mask=nmask)


@triton.jit
def _summary_attention_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    Hq, Hkv, G, Lq, S, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < S
    dmask = offs_d < D
    kv_mask = nmask[:, None] & dmask[None, :]
    rows_n = _rows(offs_n, I64)
    k = tl.load(K + b * skb + hk * skh + rows_n[:, None] * skn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + rows_n[:, None] * svn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    shift = S - Lq
    qk_scale = scale * 1.4426950408889634
    # first query that sees key start_n: i >= start_n - shift
    lo = tl.maximum(start_n - shift, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * Hq + h) * Lq
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mmask = offs_m < Lq
            qd_mask = mmask[:, None] & dmask[None, :]
            rows_m = _rows(offs_m, I64)
            q = tl.load(q_base + rows_m[:, None] * sqm + offs_d[None, :],
                        mask=qd_mask, other=0.0)
            do = tl.load(do_base + rows_m[:, None] * sdom + offs_d[None, :],
                         mask=qd_mask, other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=mmask, other=0.0)
            s = tl.dot(q, tl.trans(k))
            valid = (offs_n[None, :] <= shift + offs_m[:, None]) & nmask[None, :]
            valid = valid & mmask[:, None]
            p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)  # (M, N)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    out_off = (b * Hkv + hk) * S * D + (rows_n[:, None] * D + offs_d[None, :])
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _summary_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    Hq, G, Lq, S, D, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    qd_mask = mmask[:, None] & dmask[None, :]
    rows_m = _rows(offs_m, I64)
    q = tl.load(Q + b * sqb + h * sqh + rows_m[:, None] * sqm + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows_m[:, None] * sdom + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    row_base = (b * Hq + h) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=mmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=mmask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    shift = S - Lq
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = tl.minimum(S, shift + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < S
        kv_mask = nmask[:, None] & dmask[None, :]
        rows_n = _rows(offs_n, I64)
        k = tl.load(k_base + rows_n[:, None] * skn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_base + rows_n[:, None] * svn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))
        dp = tl.dot(do, tl.trans(v))
        valid = (offs_n[None, :] <= shift + offs_m[:, None]) & nmask[None, :]
        p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq_off = (b * Hq + h) * Lq * D + (rows_m[:, None] * D + offs_d[None, :])
    tl.store(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _summary_attention_splitkv_kernel(
    Q, K, V, OP, LSEP,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    Hq, Hkv, G, Lq, S, D, keys_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    # grid (splits, B * Hkv * row blocks); rows r = g * Lq + i of one KV group (G heads)
    pid_s = tl.program_id(0)
    pid = tl.program_id(1)
    n_rb = tl.cdiv(G * Lq, BLOCK_M)
    rb = pid % n_rb
    bhk = pid // n_rb
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_r < G * Lq
    gi = offs_r // Lq
    qi = offs_r % Lq
    h = hk * G + gi  # int64 (B, Hq) head of each row
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + _rows(qi, I64)[:, None] * sqm
                + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    shift = S - Lq
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, S)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        rows_n = _rows(offs_n, I64)
        kt = tl.load(k_base + rows_n[None, :] * skn + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, kt)
        valid = (offs_n[None, :] <= shift + qi[:, None]) & nmask[None, :]
        s = tl.where(valid, s * qk_scale, float("-inf"))
        vt = tl.load(v_base + rows_n[:, None] * svn + offs_d[None, :],
                     mask=nmask[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(s, vt, m_i, l_i, acc)
    o, lse = finish_partial(acc, m_i, l_i)
    # partial rows ordered (split, b, h, i): the layout merge_partials reads
    nbh = (tl.num_programs(1) // n_rb).to(tl.int64) * G  # B * Hq
    row = (pid_s * nbh + b * Hq + h) * Lq + qi
    tl.store(OP + row[:, None] * D + offs_d[None, :], o, mask=rmask[:, None] & dmask[None, :])
    tl.store(LSEP + row, lse, mask=rmask)


# --------------------------------------------------------------------------- configs
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# Prefill tiles. Defaults per (dtype, padded head dim): 64 -> Dh 64; 128 -> Dh 80, 96, 128
# (padded, so one compiled variant serves all three); int64 row offsets (I64) keep the
# smaller tiles that leave room for 64-bit offsets. AUTOTUNE SPACES (fp16/bf16, I64 off):
# every entry compiles for sm_80 and sm_90 with zero spills at BLOCK_D 128 (the largest
# register footprint; tier 2 compiles every entry). Dropped because they spill there
# (ptxas -v, spill-store bytes sm_80/sm_90): fwd 64x128 w4 (752/608), 64x128 w8 (0/16),
# 128x32 w4 (212/120), 128x64 w4 (860/572), 128x64 w8 (0/4), 128x128 w4 (28258/2584);
# dQ 64x32 w4 (28/0), 64x64 w4 (36/0), 128x32 w4/w8, 128x64 w4/w8; dK/dV 32x64 w4
# (128/240), 64x64 w4 (152/384), and every BLOCK_N 128 tile (64x128, 32x128, 16x128 at 4
# and 8 warps: 320 to 24752 bytes). So BLOCK_M reaches 128 (forward) but BLOCK_N stops at
# 64 in every kernel; stages 2-4 add shared memory, not registers, on these tiles.
FWD_SPACE = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2),
    (64, 64, 8, 3), (64, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3),
]
DQ_SPACE = [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 3),
            (32, 64, 4, 3), (32, 64, 8, 4)]
BWD_SPACE = [(32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3)]


# At BLOCK_D 64 (head dim 64) two dQ entries spill on sm_80 (8 warps: ptxas caps them at 128
# registers; 16/16 B spill st/ld): the space there leaves them out.
_SPILL_D64 = {"dq": {(32, 64, 8, 2), (32, 64, 8, 4)}}


def space(name: str, block_d: int) -> list[tuple[int, int, int, int]]:
    """Autotune space of kernel ``name`` ("fwd" / "bwd" / "dq") at padded head dim BLOCK_D."""
    full = {"fwd": FWD_SPACE, "bwd": BWD_SPACE, "dq": DQ_SPACE}[name]
    drop = _SPILL_D64.get(name, set()) if block_d <= 64 else set()
    return [c for c in full if c not in drop]


def _cfg(t: tuple[int, int, int, int]) -> dict:
    return {"BLOCK_M": t[0], "BLOCK_N": t[1], "num_warps": t[2], "num_stages": t[3]}


def fwd_config(dtype: torch.dtype, block_d: int, i64: bool = False) -> dict:
    # chosen with ptxas -v on sm_80/sm_90: the largest tiles without spills
    if dtype == torch.float32 and block_d > 64:
        # int64 row offsets (I64) cost registers: fp32 at head dim 128 spills at BLOCK_N 32
        return {"BLOCK_M": 32, "BLOCK_N": 16 if i64 else 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32 or (block_d > 64 and i64):
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    if block_d > 64:
        return _cfg((64, 64, 8, 2))  # in FWD_SPACE
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def bwd_config(dtype: torch.dtype, block_d: int, i64: bool = False) -> dict:
    if dtype == torch.float32:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if block_d > 64:
        if i64:
            return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
        return _cfg((32, 64, 8, 2))  # in BWD_SPACE
    return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}


def mass_config(dtype: torch.dtype, block_d: int) -> dict:
    if dtype == torch.float32 or block_d > 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def dq_config(dtype: torch.dtype, block_d: int, i64: bool = False) -> dict:
    if dtype == torch.float32 or (block_d > 64 and i64):
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    if block_d > 64:
        return _cfg((64, 64, 8, 2))  # in DQ_SPACE
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def use_autotune(q: torch.Tensor, i64: bool) -> bool:
    """Autotune the prefill kernels over the spaces above: only on CUDA, only when
    ``LVLM_FAST_AUTOTUNE=1``, only fp16/bf16 with int32 rows (the spaces were checked for
    those). Tuned once per (kernel, head dim, GQA group, dtypes) on the first call's shapes
    (timing every config costs ~len(space) extra runs of that call); otherwise the
    heuristic defaults above run (no timing, no warm-up)."""
    return (os.environ.get("LVLM_FAST_AUTOTUNE") == "1" and q.is_cuda and not i64
            and q.dtype in (torch.float16, torch.bfloat16))


_TUNED: dict[str, object] = {}


def autotuned(name: str, block_d: int = 128):
    """The ``triton.autotune`` wrapper of kernel ``name`` over its :func:`space` at BLOCK_D
    ``block_d`` (built once per pair)."""
    if (name, block_d) not in _TUNED:
        fn = {"fwd": _summary_attention_fwd_kernel, "bwd": _summary_attention_bwd_kernel,
              "dq": _summary_attention_bwd_dq_kernel}[name]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in space(name, block_d)]
        _TUNED[name, block_d] = triton.autotune(configs=configs, key=["D", "G"])(fn)
    return _TUNED[name, block_d]


# Split-KV (flash-decoding) path: Lq <= SPLITKV_MAX_LQ and no key mass. The G query heads
# of a KV group share one program's rows (G * Lq rows, in row blocks of <= 32), so each
# K/V tile is read once per group; S is split so that ~SPLITKV_TARGET_PROGRAMS programs run
# (>= SPLITKV_MIN_KEYS keys each: fewer, longer splits below that), then one merge launch.
SPLITKV_MAX_LQ = 16
SPLITKV_TARGET_PROGRAMS = 528  # 4 waves on 132 SMs (H100); also caps the partial buffer
SPLITKV_MIN_KEYS = 256


def splitkv_config(dtype: torch.dtype, rows: int, block_d: int = 128) -> dict:
    # ptxas -v sm_80/sm_90 (tier 2), the largest tiles without spills incl. int64 rows:
    # 64-row blocks spill at every tried BLOCK_N (4 or 8 warps), so row blocks are <= 32
    # (G * Lq > 32 takes several row blocks, each reading the group's K/V once); 32-row
    # blocks spill at BLOCK_N 64 on sm_90, and at 8 warps with head dim 64 on sm_80 (ptxas
    # caps that one at 128 registers), hence BLOCK_N 32 and 4 warps there.
    # fp32 at head dim 64 with int64 rows spilled at 8 warps too (sm_80: 128-register cap,
    # 16/16 B at 32 rows), hence 4 warps there (<= 235 registers, no spills).
    bm = min(32, max(16, triton.next_power_of_2(rows)))
    if dtype == torch.float32:
        return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4 if block_d <= 64 else 8,
                "num_stages": 1}
    if bm == 16:
        return {"BLOCK_M": bm, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": bm, "BLOCK_N": 32, "num_warps": 4 if block_d <= 64 else 8,
            "num_stages": 2}


def splitkv_splits(s: int, programs: int, block_n: int) -> tuple[int, int]:
    """(number of splits, keys per split) for ``programs`` (b, group, row block) programs:
    every split holds >= 1 key; keys per split is a multiple of BLOCK_N."""
    want = max(1, min(triton.cdiv(SPLITKV_TARGET_PROGRAMS, programs),
                      triton.cdiv(s, SPLITKV_MIN_KEYS)))
    per = triton.cdiv(triton.cdiv(s, want), block_n) * block_n
    return triton.cdiv(s, per), per


def use_splitkv(lq: int, return_key_mass: bool) -> bool:
    return lq <= SPLITKV_MAX_LQ and not return_key_mass


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


INT32_SPAN = 2**31  # row offsets are int32 below this span (a module constant: tests lower it)


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """True when ``row * stride`` inside one (batch, head) slice of any tensor can reach
    2^31 elements: e.g. the output (a view of (B, Lq, Hq, D), row stride Hq * D) at ~600K
    query rows with Hq = 28, D = 128. The kernels then index rows in int64."""
    for t in tensors:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:],
                                                            strict=True) if n > 0)
        if span >= INT32_SPAN:
            return True
    return False


# --------------------------------------------------------------------------- launchers
def summary_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, return_key_mass: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.dtype == torch.float64:
        # Triton's fp64 dot promotes the loop-carried fp32 m_i / acc to fp64, which it
        # rejects at compile time (the interpreter does not): fp64 runs the reference.
        from lvlm_fast.ops.summary_attention import reference_fwd

        return reference_fwd(q, k, v, scale, return_key_mass)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty((b, lq, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    mass = torch.empty((0,), dtype=torch.float32, device=q.device)
    i64 = _needs_i64(q, k, v, out)
    if use_splitkv(lq, return_key_mass):
        g = hq // hkv
        cfg = splitkv_config(q.dtype, g * lq, _block_d(d))
        n_rb = triton.cdiv(g * lq, cfg["BLOCK_M"])
        nsplit, per = splitkv_splits(s, b * hkv * n_rb, cfg["BLOCK_N"])
        o_part = torch.empty((nsplit, b, hq, lq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((nsplit, b, hq, lq), dtype=torch.float32, device=q.device)
        _summary_attention_splitkv_kernel[(nsplit, b * hkv * n_rb)](
            q, k, v, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            hq, hkv, g, lq, s, d, per, float(scale),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d), I64=i64,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        lse = merge_partials(o_part, lse_part, out)
        return out, lse, mass
    args = (q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            hq, hq // hkv, lq, s, d, float(scale))
    if use_autotune(q, i64):
        autotuned("fwd", _block_d(d))[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * hq)](
            *args, BLOCK_D=_block_d(d), I64=i64)
    else:
        cfg = fwd_config(q.dtype, _block_d(d), i64)
        _summary_attention_fwd_kernel[(triton.cdiv(lq, cfg["BLOCK_M"]), b * hq)](
            *args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d),
            I64=i64, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if return_key_mass:
        # per-(b, KV head) partials (B, Hkv, S) fp32, summed over the KV heads in a fixed
        # order: deterministic (no atomics)
        mcfg = mass_config(q.dtype, _block_d(d))
        mass_part = torch.empty((b, hkv, s), dtype=torch.float32, device=q.device)
        _summary_attention_mass_kernel[(triton.cdiv(s, mcfg["BLOCK_N"]), b * hkv)](
            q, k, lse, mass_part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            hq, hkv, hq // hkv, lq, s, d, float(scale),
            BLOCK_M=mcfg["BLOCK_M"], BLOCK_N=mcfg["BLOCK_N"], BLOCK_D=_block_d(d), I64=i64,
            num_warps=mcfg["num_warps"], num_stages=mcfg["num_stages"],
        )  # fmt: skip
        mass = mass_part.sum(1)
    return out, lse, mass


def summary_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if q.dtype == torch.float64:  # see summary_attention_fwd
        from lvlm_fast.ops.summary_attention import reference_bwd

        return reference_bwd(grad_out, q, k, v, out, lse, scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = _unit_last(grad_out.to(q.dtype))
    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    lse = lse.float().contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, Hq, Lq) fp32
    dq = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, s, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, s, d), dtype=v.dtype, device=v.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    i64 = _needs_i64(q, k, v, do, dq, dk, dv)
    bargs = (q, k, v, do, lse, delta, dk, dv, *strides, hq, hkv, g, lq, s, d, float(scale))
    qargs = (q, k, v, do, lse, delta, dq, *strides, hq, g, lq, s, d, float(scale))
    if use_autotune(q, i64):  # dK/dV and dQ write their outputs (no accumulation): re-runnable
        autotuned("bwd", _block_d(d))[lambda m: (triton.cdiv(s, m["BLOCK_N"]), b * hkv)](
            *bargs, BLOCK_D=_block_d(d), I64=i64)
        autotuned("dq", _block_d(d))[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * hq)](
            *qargs, BLOCK_D=_block_d(d), I64=i64)
        return dq, dk, dv
    cfg = bwd_config(q.dtype, _block_d(d), i64)
    _summary_attention_bwd_kernel[(triton.cdiv(s, cfg["BLOCK_N"]), b * hkv)](
        *bargs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d), I64=i64,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    cfg = dq_config(q.dtype, _block_d(d), i64)
    _summary_attention_bwd_dq_kernel[(triton.cdiv(lq, cfg["BLOCK_M"]), b * hq)](
        *qargs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(d), I64=i64,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, dk, dv


# --------------------------------------------------------------------------- compile specs
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
       torch.float64: "fp64"}


def _specs(dtypes=(torch.bfloat16, torch.float16, torch.float32), i64s=(False, True)) -> list[dict]:
    """fwd (with and without key mass), dK/dV and dQ at the launcher's default configs, for
    head dims 64 and 128, with int32 row offsets (I64 = False, the usual launch) and, at
    128, int64 ones (I64 = True, a slice spanning >= 2^31 elements) - both must compile
    without spills. fp64 is not here: the launchers route it to the reference (see
    :func:`summary_attention_fwd`); ``_specs((torch.float64,))`` builds the specs that
    show why (tests/tier2)."""
    specs = []
    for dtype in dtypes:
        t = "*" + _TY[dtype]
        cfg_dtype = torch.float32 if dtype == torch.float64 else dtype
        # 80/96 pad to 128 (the op takes head dims 64/80/96/128 only: BLOCK_D 64 or 128);
        # int32 and int64 row offsets at both
        for d, i64 in [(d, i) for d in (64, 128) for i in i64s]:
            bd = _block_d(d)
            tag = f"{_TY[dtype]}_d{d}{'_i64' if i64 else ''}"
            cfg = fwd_config(cfg_dtype, bd, i64)
            sig = {n: t for n in ("Q", "K", "V", "O")}
            sig["LSE"] = "*fp32"
            # batch strides of a long cache can pass 2^31 (the JIT then passes i64)
            sig.update({n: "i64" if n.endswith("b") else "i32"
                        for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn",
                                  "svb", "svh", "svn", "sob", "soh", "som")})
            sig.update({"Hq": "i32", "G": "i32", "Lq": "i32", "S": "i32", "D": "i32",
                        "scale": "fp32"})
            cx = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd, "I64": i64}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"fwd_{tag}", "fn": _summary_attention_fwd_kernel,
                          "signature": sig, "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
            cfg = mass_config(cfg_dtype, bd)
            sig = {"Q": t, "K": t, "LSE": "*fp32", "MASSP": "*fp32"}
            sig.update({n: "i64" if n.endswith("b") else "i32"
                        for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn")})
            sig.update({n: "i32" for n in ("Hq", "Hkv", "G", "Lq", "S", "D")})
            sig["scale"] = "fp32"
            cx = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd, "I64": i64}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"mass_{tag}", "fn": _summary_attention_mass_kernel,
                          "signature": sig, "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
            strides = {n: "i64" if n.endswith("b") else "i32"
                       for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn",
                                 "svb", "svh", "svn", "sdob", "sdoh", "sdom")}
            cfg = bwd_config(cfg_dtype, bd, i64)
            sig = {n: t for n in ("Q", "K", "V", "DO")}
            sig.update({"LSE": "*fp32", "DELTA": "*fp32", "DK": t, "DV": t})
            sig.update(strides)
            sig.update({"Hq": "i32", "Hkv": "i32", "G": "i32", "Lq": "i32", "S": "i32",
                        "D": "i32", "scale": "fp32"})
            cx = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd,
                  "I64": i64}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"bwd_{tag}", "fn": _summary_attention_bwd_kernel,
                          "signature": sig, "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
            cfg = dq_config(cfg_dtype, bd, i64)
            sig = {n: t for n in ("Q", "K", "V", "DO")}
            sig.update({"LSE": "*fp32", "DELTA": "*fp32", "DQ": t})
            sig.update(strides)
            sig.update({"Hq": "i32", "G": "i32", "Lq": "i32", "S": "i32", "D": "i32",
                        "scale": "fp32"})
            cx = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd,
                  "I64": i64}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"bwd_dq_{tag}",
                          "fn": _summary_attention_bwd_dq_kernel, "signature": sig,
                          "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
    return specs


def _splitkv_specs(dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[dict]:
    """The split-KV (decode) kernel at its configs: row blocks of 16 (G * Lq <= 16: 7B
    decode) and 32 (the largest), head dims 64 and 128 (80/96 pad to 128), int32 rows, and
    int64 rows at 128."""
    specs = []
    for dtype in dtypes:
        t = "*" + _TY[dtype]
        for d, rows, i64 in ((64, 16, False), (128, 16, False), (64, 32, False),
                             (128, 32, False), (128, 16, True), (128, 32, True),
                             (64, 16, True), (64, 32, True)):
            cfg = splitkv_config(dtype, rows, _block_d(d))
            sig = {n: t for n in ("Q", "K", "V")}
            sig.update({"OP": "*fp32", "LSEP": "*fp32"})
            sig.update({n: "i64" if n.endswith("b") else "i32"
                        for n in ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")})
            sig.update({n: "i32" for n in ("Hq", "Hkv", "G", "Lq", "S", "D", "keys_per_split")})
            sig["scale"] = "fp32"
            cx = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": _block_d(d),
                  "I64": i64}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"splitkv_{_TY[dtype]}_d{d}_m{rows}{'_i64' if i64 else ''}",
                          "fn": _summary_attention_splitkv_kernel, "signature": sig,
                          "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
    return specs


def _space_specs() -> list[dict]:
    """Every autotune config (FWD_SPACE / BWD_SPACE / DQ_SPACE) where :func:`use_autotune`
    can pick it: bf16 and fp16, BLOCK_D 64 and 128 (every head dim the op takes), int32
    rows."""
    base = {sp["name"]: sp for sp in _specs((torch.bfloat16, torch.float16), (False,))}
    specs = []
    for ty, d in ((ty, d) for ty in ("bf16", "fp16") for d in (128, 64)):
        for kind, name in (("fwd", f"fwd_{ty}_d{d}"), ("bwd", f"bwd_{ty}_d{d}"),
                           ("dq", f"bwd_dq_{ty}_d{d}")):
            for m, n, w, st in space(kind, d):
                sp = base[name]
                specs.append({**sp, "name": f"space_{kind}_m{m}_n{n}_w{w}_s{st}_{ty}_d{d}",
                              "constexprs": {**sp["constexprs"], "BLOCK_M": m, "BLOCK_N": n},
                              "num_warps": w, "num_stages": st})
    return specs


COMPILE_SPECS: list[dict] = _specs() + _splitkv_specs() + _space_specs()
