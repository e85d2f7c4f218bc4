"""Triton kernel for ``qformer_cross_attention`` (Video-LLaMA Q-Former cross-attention with
the K/V projection and the per-frame position row fused; split-KV, small Lq).

Spec: :mod:`lvlm_fast.reference.qformer_cross_attention`; definitions in
:mod:`lvlm_fast.ops.qformer_cross_attention`. Keys are the N = T*S frame tokens, flat index
``j = t*S + s``; ``X[j] = F[b, t, s] + p[t]``, ``K = X Wk^T + bk``, ``V = X Wv^T + bv``.

Forward (``_qformer_xattn_fwd_kernel``): one program per (key split, b, head). Lq <= 64
queries are few, so the keys are split across programs (split-KV) to fill the GPU. The
program keeps its head's Q tile (BLOCK_M, BLOCK_D) in registers and walks its key range
in tiles of BLOCK_N keys. For each tile it builds K and V *in registers*: a loop over the
encoder width in BLOCK_E slices loads X (BLOCK_N, BLOCK_E) = frames + pos (added in fp32,
cast to the input dtype for the tensor-core dot) and the head's weight slices
(BLOCK_E, BLOCK_D), accumulating K and V in fp32 with ``tl.dot``; then adds the bias,
computes scores with ``tl.dot``, and runs an online softmax in base 2 (scale folded with
log2 e) with an fp32 output accumulator. No K/V row and no score ever touches memory: the
program writes one partial (BLOCK_M, Dh) output and its lse (fp32) per split. The
launcher merges the splits with their log-sum-exps ((splits, B, H, Lq, Dh) fp32: the split
count is capped, so memory is constant in T) in one launch of the merge kernel shared with
summary_attention's decode path (:mod:`.split_kv`, which also holds the online-softmax step).
Each head re-reads the frame tile (H times in all, mostly from L2); the projection FLOPs
(4 N E C) dominate, as in the unfused GEMM.

Backward (``_qformer_cross_attention_bwd_kernel``, launcher
:func:`qformer_cross_attention_bwd`): the frames are walked in chunks of
``BWD_CHUNK_KEYS`` keys (one launch each, no host sync). Per chunk, one program per (key
split, b, head, query block) rebuilds each BLOCK_N-key tile's K and V exactly as the
forward does (same :func:`_kv_tile`), recomputes P = exp(scale q.K - lse) from the saved
lse, and computes dV = P^T dO, dS = P (dO V^T - delta) with delta = rowsum(dO O) - dlse
(the grad of lse is honoured), dK = scale dS^T q and dQ += scale dS K. dK | dV go to a
chunk-sized scratch (keys, 2C) in the input dtype; dQ is one fp32 partial per program,
summed over the splits in a fixed order (no atomics). The weight and frame gradients are
then GEMMs on that chunk: dX = [dK | dV] [Wk; Wv] (= dframes of the chunk; dpos[t] =
sum over batch and tokens), [dWk; dWv] += [dK | dV]^T X with X = F + p rebuilt for the
chunk, [dbk; dbv] += column sums. Those are large, dense GEMMs (keys x 2C x E) that cuBLAS
runs at tensor-core roofline; fusing them would need a cross-head (dX) or cross-program
(dW) reduction inside the kernel for no saved traffic. Memory is constant in T besides
dframes itself: scratch, X and dX are chunk-sized, dW/db/dQ accumulators fp32. Per-chunk
dW products are rounded once to the input dtype before the fp32 sum across chunks.

Masking: key rows >= the split's end (or N) and channels >= E / Dh are masked on load
(zeros leave the dots unchanged) and key columns get -inf before the softmax (the
backward zeroes P there and on query rows >= Lq); query rows >= Lq are masked on store.
Every split holds >= 1 key, so no row is empty. Accumulation fp32; fp32 inputs use
tl.dot's default TF32 (~1e-3 relative error on GPU). fp64 inputs run the chunked torch
paths of :mod:`lvlm_fast.ops.qformer_cross_attention` (Triton rejects these kernels' fp64
dots at compile time: tests/tier2/test_qformer_cross_attention_fp64.py).
Frame row offsets are int64 (T*S*E can pass 2^31); the last dim of frames must be
unit-stride and the weights contiguous (the launchers copy once otherwise).
Default configs: :func:`fwd_config`, :func:`bwd_config`, :func:`bwd_block_m` (all in
COMPILE_SPECS; they compile without spills for sm_80/90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_kv import finish_partial, merge_partials, online_softmax_step


@triton.jit
def _kv_tile(f_rows, p_rows, WK, WV, nmask, ch, dmask, bk, bv, swk, swv, E,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    """K, V (BLOCK_N, BLOCK_D) fp32 of one key tile and one head, built in registers:
    ``f_rows`` / ``p_rows`` are the tile's frame-row / position-row pointers (BLOCK_N,),
    ``ch`` the head's channels. Loop over E in BLOCK_E slices: X = F + p added in fp32 and
    cast to the input dtype (the dtype of the tensor-core dot; torch's ``frames + pos`` in
    that dtype rounds identically), times the head's weight slices, fp32 accumulation;
    masked rows/channels load 0. Shared by the forward and the backward."""
    offs_e = tl.arange(0, BLOCK_E)
    k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ce = e0 + offs_e
        emask = ce < E
        xm = nmask[:, None] & emask[None, :]
        x = tl.load(f_rows[:, None] + ce[None, :], mask=xm, other=0.0)
        pe = tl.load(p_rows[:, None] + ce[None, :], mask=xm, other=0.0)
        x = (x.to(tl.float32) + pe.to(tl.float32)).to(WK.dtype.element_ty)
        wm = emask[:, None] & dmask[None, :]
        wkt = tl.load(WK + ch[None, :] * swk + ce[:, None], mask=wm, other=0.0)
        wvt = tl.load(WV + ch[None, :] * swv + ce[:, None], mask=wm, other=0.0)
        k += tl.dot(x, wkt)
        v += tl.dot(x, wvt)
    return k + bk[None, :], v + bv[None, :]


@triton.jit
def _qformer_xattn_fwd_kernel(
    Q, F, P, WK, BK, WV, BV, OP, LSEP,
    sqb, sqm, sfb, sft, sfs, spt, swk, swv,
    H, Lq, S, E, D, N, keys_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    ch = h * D + offs_d  # this head's channels in C
    q = tl.load(Q + b * sqb + offs_m[:, None] * sqm + ch[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    bk = tl.load(BK + ch, mask=dmask, other=0.0).to(tl.float32)
    bv = tl.load(BV + ch, mask=dmask, other=0.0).to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N)
    f_base = F + b * sfb
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        t = (offs_n // S).to(tl.int64)
        s_ = (offs_n % S).to(tl.int64)
        k, v = _kv_tile(f_base + t * sft + s_ * sfs, P + t * spt, WK, WV, nmask, ch, dmask,
                        bk, bv, swk, swv, E, BLOCK_N, BLOCK_D, BLOCK_E)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc)
    acc, lse = finish_partial(acc, m_i, l_i)
    base = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * Lq
    tl.store(OP + (base + offs_m[:, None]) * D + offs_d[None, :], acc,
             mask=mmask[:, None] & dmask[None, :])
    tl.store(LSEP + base + offs_m, lse, mask=mmask)


@triton.jit
def _qformer_cross_attention_bwd_kernel(
    Q, F, P, WK, BK, WV, BV, DO, LSE, DELTA, DKV, DQP,
    sqb, sqm, sfb, sft, sfs, spt, swk, swv, sdob, sdom,
    H, Lq, S, E, D, N, C, keys_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Backward of one chunk of frames (N = chunk frames * S keys); see the module docstring.

    One program per (key split, b, head, query block), walking its split in BLOCK_N-key
    tiles against its query block (all Lq queries in one block, except Lq > 32 at Dh > 64:
    two blocks, see :func:`bwd_block_m`). Per tile: K, V rebuilt by :func:`_kv_tile`,
    P = exp2(s * scale * log2 e - lse * log2 e) from the saved lse, dV = P^T dO,
    dS = P * (dO V^T - delta) with delta = rowsum(dO * O) - grad_lse (host side),
    dK = scale dS^T Q; dK | dV are stored to the chunk scratch DKV (B*N, 2C) in the input
    dtype, row b*N + j, columns [h*Dh, +Dh) and C + [h*Dh, +Dh), one (B*N, 2C) slice per
    query block (the launcher sums the slices in a fixed order); dQ += dS K in fp32
    registers, written once per program as a partial to DQP (splits, B, H, Lq, Dh) fp32
    (reduced by the launcher in a fixed order: no atomics). Masking: keys >= the split's
    end and channels >= Dh / E load 0, P is zeroed there and on query rows >= Lq (their
    q, dO, lse, delta load 0). All dots accumulate in fp32."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    qm = mmask[:, None] & dmask[None, :]
    DKV += pid_m.to(tl.int64) * (tl.num_programs(1) // H) * N * (2 * C)  # query block's slice
    ch = h * D + offs_d
    q = tl.load(Q + b * sqb + offs_m[:, None] * sqm + ch[None, :], mask=qm, other=0.0)
    do = tl.load(DO + b * sdob + offs_m[:, None] * sdom + ch[None, :], mask=qm, other=0.0)
    row = pid_bh.to(tl.int64) * Lq + offs_m  # (b, h, i) rows of LSE / DELTA (B, H, Lq)
    lse2 = tl.load(LSE + row, mask=mmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=mmask, other=0.0)
    bk = tl.load(BK + ch, mask=dmask, other=0.0).to(tl.float32)
    bv = tl.load(BV + ch, mask=dmask, other=0.0).to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N)
    f_base = F + b * sfb
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        t = (offs_n // S).to(tl.int64)
        s_ = (offs_n % S).to(tl.int64)
        k, v = _kv_tile(f_base + t * sft + s_ * sfs, P + t * spt, WK, WV, nmask, ch, dmask,
                        bk, bv, swk, swv, E, BLOCK_N, BLOCK_D, BLOCK_E)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mmask[:, None] & nmask[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(q.dtype)), do)  # (BLOCK_N, BLOCK_D)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_M, BLOCK_N)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk = tl.dot(tl.trans(ds), q) * scale
        dq += tl.dot(ds, k)
        kv_row = (b * N + offs_n) * (2 * C)
        km = nmask[:, None] & dmask[None, :]
        out_ty = DKV.dtype.element_ty
        tl.store(DKV + kv_row[:, None] + ch[None, :], dk.to(out_ty), mask=km)
        tl.store(DKV + kv_row[:, None] + C + ch[None, :], dv.to(out_ty), mask=km)
    base = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * Lq
    tl.store(DQP + (base + offs_m[:, None]) * D + offs_d[None, :], dq * scale, mask=qm)


# --------------------------------------------------------------------------- configs
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def block_d(d: int) -> int:
    """BLOCK_D for head dim ``d`` (<= MAX_HEAD_DIM 128): 64 or 128. Head dims below 64 pad
    to 64 (masked channels load as 0: the dots and the output are unchanged): BLOCK_D 16 and
    32 spilled at every tried tiling (ptxas sm_80/sm_90, 8 warps: 8-40 B spill stores at the
    128-register cap, e.g. fwd bf16 BLOCK_M 32 / BLOCK_D 16, bwd BLOCK_M 64 / BLOCK_D 32; 4
    warps: 4-108 B, e.g. bwd BLOCK_M 32 / BLOCK_D 32), while BLOCK_D 64 compiles clean."""
    return _pow2(d, 64)


def fwd_config(dtype: torch.dtype, block_m: int, block_d: int) -> dict:
    # chosen with ptxas -v on sm_80/sm_90 (tests/tier2): the largest tiles without spills.
    # K and V (BLOCK_N x BLOCK_D fp32 each), the output accumulator and the 64-bit pointer
    # tiles of X and of both weight slices live in registers, hence 8 warps and small tiles.
    big = block_d > 64 or block_m > 32
    if dtype == torch.float32:
        bn = 16 if big else 32
        return {"BLOCK_N": bn, "BLOCK_E": 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_N": 32, "BLOCK_E": 16 if big else 32, "num_warps": 8, "num_stages": 1}


def bwd_block_m(lq: int, block_d: int, dtype: torch.dtype) -> int:
    """Query rows per backward program: all Lq in one block, but at most 32 for Dh > 64 or
    fp32 inputs (a 64 x 128 query block, or 64 x 64 in fp32, spills on sm_90 at any tiling,
    tests/tier2): Lq > 32 then runs two query blocks, each rebuilding K/V and writing its
    own dK | dV slice."""
    return min(_pow2(lq), 32 if block_d > 64 or dtype == torch.float32 else 64)


def bwd_config(dtype: torch.dtype, block_m: int, block_d: int) -> dict:
    # chosen with ptxas -v on sm_80/sm_90 (tests/tier2): on top of the forward's K/V build
    # the program keeps its Q, dO block (input dtype) and dQ accumulator (fp32), and the
    # (BLOCK_M, BLOCK_N) P / dP / dS tiles.
    big = block_d > 64 or block_m > 32
    if dtype == torch.float32:
        return {"BLOCK_N": 16 if big else 32, "BLOCK_E": 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_N": 16 if big else 32, "BLOCK_E": 16 if big else 32, "num_warps": 8,
            "num_stages": 1}


TARGET_PROGRAMS = 512  # ~4 waves on 132 SMs; also caps the partial buffer (splits)
MIN_KEYS_PER_SPLIT = 256


def _splits(n: int, bh: int, block_n: int) -> tuple[int, int]:
    """(number of splits, keys per split): every split holds >= 1 key."""
    want = max(1, min(triton.cdiv(TARGET_PROGRAMS, bh), triton.cdiv(n, MIN_KEYS_PER_SPLIT)))
    per = triton.cdiv(triton.cdiv(n, want), block_n) * block_n
    return triton.cdiv(n, per), per


# --------------------------------------------------------------------------- launcher
def qformer_cross_attention_fwd(
    q: torch.Tensor, frames: torch.Tensor, pos: torch.Tensor, wk: torch.Tensor,
    bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor, num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    if q.dtype == torch.float64:
        # Triton's fp64 dots promote the loop-carried fp32 accumulators, which it rejects at
        # compile time (tests/tier2): fp64 runs the chunked torch forward (fp64 accumulation).
        from lvlm_fast.ops.qformer_cross_attention import chunked_forward

        return chunked_forward(q, frames, pos, wk, bk, wv, bv, num_heads, scale)
    b, lq, c = q.shape
    _, t, s, e = frames.shape
    d = c // num_heads
    q = q if q.stride(2) == 1 else q.contiguous()
    frames = frames if frames.stride(3) == 1 else frames.contiguous()
    pos = pos if pos.stride(1) == 1 else pos.contiguous()
    wk, wv, bk, bv = wk.contiguous(), wv.contiguous(), bk.contiguous(), bv.contiguous()
    n = t * s
    bm, bd = _pow2(lq), block_d(d)
    cfg = fwd_config(q.dtype, bm, bd)
    nsplit, per = _splits(n, b * num_heads, cfg["BLOCK_N"])
    o_part = torch.empty((nsplit, b, num_heads, lq, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((nsplit, b, num_heads, lq), dtype=torch.float32, device=q.device)
    _qformer_xattn_fwd_kernel[(nsplit, b * num_heads)](
        q, frames, pos, wk, bk, wv, bv, o_part, lse_part,
        q.stride(0), q.stride(1), frames.stride(0), frames.stride(1), frames.stride(2),
        pos.stride(0), wk.stride(0), wv.stride(0),
        num_heads, lq, s, e, d, n, per, float(scale),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, BLOCK_E=cfg["BLOCK_E"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    # exact merge of the splits (small: capped split count x B x H x Lq x Dh fp32), one
    # launch of the shared split-KV merge (kernels/split_kv.py) into the (B, Lq, C) output
    out = torch.empty((b, lq, c), dtype=q.dtype, device=q.device)
    lse = merge_partials(o_part, lse_part, out.view(b, lq, num_heads, d).transpose(1, 2))
    return out, lse


BWD_CHUNK_KEYS = 16384
"""Keys (batch included) per backward chunk: its dK | dV scratch is (keys, 2C) in the input
dtype (50 MB at C = 768 in bf16), plus the chunk's X and dX (keys, E); constant in T."""


def qformer_cross_attention_bwd(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
    frames: torch.Tensor, pos: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor,
    wv: torch.Tensor, bv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    num_heads: int, scale: float,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(dq, dframes, dpos, dwk, dbk, dwv, dbv) in the inputs' dtypes; see the module
    docstring. fp64 runs the chunked torch backward (fp64 accumulation): Triton rejects
    these kernels' fp64 dots at compile time (tests/tier2)."""
    if q.dtype == torch.float64:
        from lvlm_fast.ops.qformer_cross_attention import chunked_backward

        return chunked_backward(grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out, lse,
                                num_heads, scale)  # fmt: skip
    b, lq, c = q.shape
    _, t, s, e = frames.shape
    h = num_heads
    d = c // h
    dt = q.dtype
    q = q if q.stride(2) == 1 else q.contiguous()
    frames = frames if frames.stride(3) == 1 else frames.contiguous()
    pos = pos if pos.stride(1) == 1 else pos.contiguous()
    wk, wv, bk, bv = wk.contiguous(), wv.contiguous(), bk.contiguous(), bv.contiguous()
    do = grad_out.to(dt).contiguous()
    # delta = rowsum(dO * O) - dlse per (b, h, query): (B, H, Lq) fp32, tiny
    delta = (grad_out.float() * out.float()).reshape(b, lq, h, d).sum(-1).transpose(1, 2)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta, lse = delta.contiguous(), lse.float().contiguous()
    bd = block_d(d)
    bm = bwd_block_m(lq, bd, dt)
    n_qb = triton.cdiv(lq, bm)
    cfg = bwd_config(dt, bm, bd)
    ct = max(1, BWD_CHUNK_KEYS // (b * s))  # frames per chunk
    scratch = torch.empty(n_qb * b * min(t, ct) * s * 2 * c, dtype=dt, device=q.device)
    wkv = torch.cat([wk, wv])  # (2C, E): dX = [dK | dV] [Wk; Wv]
    dq = torch.zeros((b, h, lq, d), dtype=torch.float32, device=q.device)
    dw = torch.zeros((2 * c, e), dtype=torch.float32, device=q.device)
    db = torch.zeros((2 * c,), dtype=torch.float32, device=q.device)
    dframes = torch.empty((b, t, s, e), dtype=dt, device=q.device)
    dpos = torch.empty((t, e), dtype=dt, device=q.device)
    for t0 in range(0, t, ct):  # chunks of frames (few: T*S*B / 16,384), no host sync
        t1 = min(t, t0 + ct)
        n = (t1 - t0) * s
        fc, pc = frames[:, t0:t1], pos[t0:t1]
        nsplit, per = _splits(n, b * h, cfg["BLOCK_N"])
        dq_part = torch.empty((nsplit, b, h, lq, d), dtype=torch.float32, device=q.device)
        dkv = scratch[: n_qb * b * n * 2 * c].view(n_qb, b * n, 2 * c)
        _qformer_cross_attention_bwd_kernel[(nsplit, b * h, n_qb)](
            q, fc, pc, wk, bk, wv, bv, do, lse, delta, dkv, dq_part,
            q.stride(0), q.stride(1), fc.stride(0), fc.stride(1), fc.stride(2),
            pc.stride(0), wk.stride(0), wv.stride(0), do.stride(0), do.stride(1),
            h, lq, s, e, d, n, c, per, float(scale),
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, BLOCK_E=cfg["BLOCK_E"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        dq += dq_part.sum(0)  # fixed-order reduction of the per-program partials
        dkv = dkv[0] if n_qb == 1 else dkv.sum(0, dtype=torch.float32).to(dt)
        # the chunk's weight / frame gradients: GEMMs on chunk-sized tiles (cuBLAS)
        x = (fc + pc[:, None]).reshape(b * n, e)  # = the kernel's X (fp32 add, one rounding)
        dx = (dkv @ wkv).view(b, t1 - t0, s, e)
        dframes[:, t0:t1] = dx
        dpos[t0:t1] = dx.sum((0, 2), dtype=torch.float32).to(dt)
        dw += (dkv.T @ x).float()
        db += dkv.sum(0, dtype=torch.float32)
    dq = dq.transpose(1, 2).reshape(b, lq, c).to(dt)
    return (dq, dframes, dpos, dw[:c].to(dt), db[:c].to(dt), dw[c:].to(dt), db[c:].to(dt))


# --------------------------------------------------------------------------- compile specs
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
       torch.float64: "fp64"}


def _specs(dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> list[dict]:
    """Forward and backward at every config the launchers can pick: the op takes 1 <= Lq
    <= 64 (BLOCK_M 16 / 32 / 64; backward: the query block :func:`bwd_block_m` picks) and
    head dims <= 128 (:func:`block_d`: 64 or 128): video (32 queries) / audio (8) Q-Formers
    at Dh 64, tiny-video-llama at Dh 16 (padded to 64).
    ``_specs((torch.float64,))`` builds the fp64 specs, which tests/tier2 shows Triton
    rejects (the launchers route fp64 to the chunked torch paths)."""
    specs = []
    for dtype in dtypes:
        ty = _TY[dtype]
        cfg_dtype = torch.float32 if dtype == torch.float64 else dtype
        bds, lqs = (64, 128), (16, 32, 64)  # every BLOCK_D, BLOCK_M the op reaches
        blocks = [("fwd", _pow2(lq), bd) for bd in bds for lq in lqs]
        blocks += [("bwd", bm, bd) for bm, bd in dict.fromkeys(
            (bwd_block_m(lq, bd, cfg_dtype), bd) for bd in bds for lq in lqs)]
        for kind, bm, bd in blocks:
            cfg = (fwd_config if kind == "fwd" else bwd_config)(cfg_dtype, bm, bd)
            fwd = kind == "fwd"
            fn = _qformer_xattn_fwd_kernel if fwd else _qformer_cross_attention_bwd_kernel
            cx = {"BLOCK_M": bm, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd,
                  "BLOCK_E": cfg["BLOCK_E"]}
            ptr = {"OP": "*fp32", "LSEP": "*fp32", "LSE": "*fp32", "DELTA": "*fp32",
                   "DQP": "*fp32"}
            sig = {}
            for n in fn.arg_names:  # in the kernel's argument order
                if n in cx:
                    sig[n] = "constexpr"
                elif n in ptr:
                    sig[n] = ptr[n]
                elif n in ("Q", "F", "P", "WK", "BK", "WV", "BV", "DO", "DKV"):
                    sig[n] = "*" + ty
                elif n in ("sqb", "sfb", "sft"):  # batch / frame strides: may pass 2^31
                    sig[n] = "i64"
                else:
                    sig[n] = "fp32" if n == "scale" else "i32"
            specs.append({"name": f"{kind}_{ty}_m{bm}_d{bd}", "fn": fn, "signature": sig,
                          "constexprs": cx, "num_warps": cfg["num_warps"],
                          "num_stages": cfg["num_stages"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
