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

Masking: key rows >= the split's end (or N) and channels >= E / Dh are masked on load
(zeros leave the dots unchanged) and key columns get -inf before the softmax; query rows
>= Lq are masked on store. Every split holds >= 1 key, so no row is empty. Accumulation
fp32; fp32 inputs use tl.dot's default TF32 (~1e-3 relative error on GPU).
Frame row offsets are int64 (T*S*E can pass 2^31); the last dim of frames must be
unit-stride and the weights contiguous (the launcher copies once otherwise). The backward
is recompute-based in torch (``lvlm_fast.ops.qformer_cross_attention.chunked_backward``).
Default config: :func:`fwd_config` (in COMPILE_SPECS; compiles without spills sm_80/90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_kv import finish_partial, merge_partials, online_softmax_step


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
    offs_e = tl.arange(0, BLOCK_E)
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
        f_row = t * sft + s_ * sfs
        p_row = t * spt
        k = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            ce = e0 + offs_e
            emask = ce < E
            xm = nmask[:, None] & emask[None, :]
            x = tl.load(f_base + f_row[:, None] + ce[None, :], mask=xm, other=0.0)
            pe = tl.load(P + p_row[:, None] + ce[None, :], mask=xm, other=0.0)
            x = (x.to(tl.float32) + pe.to(tl.float32)).to(q.dtype)
            wm = emask[:, None] & dmask[None, :]
            wkt = tl.load(WK + ch[None, :] * swk + ce[:, None], mask=wm, other=0.0)
            wvt = tl.load(WV + ch[None, :] * swv + ce[:, None], mask=wm, other=0.0)
            k += tl.dot(x, wkt)
            v += tl.dot(x, wvt)
        k = k + bk[None, :]
        v = v + bv[None, :]
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc)
    acc, lse = finish_partial(acc, m_i, l_i)
    base = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * Lq
    tl.store(OP + (base + offs_m[:, None]) * D + offs_d[None, :], acc,
             mask=mmask[:, None] & dmask[None, :])
    tl.store(LSEP + base + offs_m, lse, mask=mmask)


# --------------------------------------------------------------------------- configs
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def fwd_config(dtype: torch.dtype, block_m: int, block_d: int) -> dict:
    # chosen with ptxas -v on sm_80/sm_90 (tests/tier2): the largest tiles without spills.
    # K and V (BLOCK_N x BLOCK_D fp32 each), the output accumulator and the 64-bit pointer
    # tiles of X and of both weight slices live in registers, hence 8 warps and small tiles.
    big = block_d > 64 or block_m > 32
    if dtype == torch.float32:
        bn = 16 if big else 32
        return {"BLOCK_N": bn, "BLOCK_E": 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_N": 32, "BLOCK_E": 16 if big else 32, "num_warps": 8, "num_stages": 1}


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
    b, lq, c = q.shape
    _, t, s, e = frames.shape
    d = c // num_heads
    q = q if q.stride(2) == 1 else q.contiguous()
    frames = frames if frames.stride(3) == 1 else frames.contiguous()
    pos = pos if pos.stride(1) == 1 else pos.contiguous()
    wk, wv, bk, bv = wk.contiguous(), wv.contiguous(), bk.contiguous(), bv.contiguous()
    n = t * s
    bm, bd = _pow2(lq), _pow2(d)
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


# --------------------------------------------------------------------------- compile specs
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _specs() -> list[dict]:
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = "*" + _TY[dtype]
        # video (32 queries) / audio (8 -> BLOCK_M 16) at Dh 64, and the 64-query / Dh 128 max
        for bm, bd in ((32, 64), (16, 64), (64, 128)):
            cfg = fwd_config(dtype, bm, bd)
            sig = {n: t for n in ("Q", "F", "P", "WK", "BK", "WV", "BV")}
            sig.update({"OP": "*fp32", "LSEP": "*fp32"})
            sig.update({n: "i64" for n in ("sqb", "sfb", "sft")})
            sig.update({n: "i32" for n in ("sqm", "sfs", "spt", "swk", "swv")})
            sig.update({n: "i32" for n in ("H", "Lq", "S", "E", "D", "N", "keys_per_split")})
            sig["scale"] = "fp32"
            cx = {"BLOCK_M": bm, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd,
                  "BLOCK_E": cfg["BLOCK_E"]}
            sig.update({n: "constexpr" for n in cx})
            specs.append({"name": f"fwd_{_TY[dtype]}_m{bm}_d{bd}",
                          "fn": _qformer_xattn_fwd_kernel, "signature": sig, "constexprs": cx,
                          "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
