"""Triton kernel for ``kv_compact`` (budgeted KV compaction, in place, scores fused).

Spec: :func:`lvlm_fast.reference.kv_compact.kv_compact`; definitions and the race-freedom
argument in :mod:`lvlm_fast.ops.kv_compact`.

``_kv_compact_fwd_kernel``: ONE launch, one program per (layer, batch, KV head); the
length ``n`` is read on device (clamped to [0, C]), so nothing syncs with the host and
every shape is static. Phases, separated by ``tl.debug_barrier()`` (a phase's global
writes are read by other threads of the same program in the next one):

  1. TaR table (if TaR): ``M[j] = mean_f K^[n - r + f P + j]`` (L2-normalised recent keys,
     eps 1e-9) for patch j < P, in tiles (BLOCK_P, D_P), written to an fp32 workspace
     (L*B*H, P, D).
  2. Scores: all C rows in tiles of BLOCK rows; middle rows [p, n - r) get TaR =
     ``-K^_i . M[j(i)]`` (one read of the key, one gather of M) and VaN = ``||V_i||``
     (or the caller-given score); others 0. Written to ``score`` (2, L, B, H, C) fp32.
  3. Selection (only if n > budget, else every valid row is kept): a 32-step radix
     select (binary search over the 2^32 int32 keys) finds the k1-th largest primary key
     among the middle rows (order-preserving float -> int32 map; NaN -> -inf, -0 -> +0),
     then one in-order pass with a running tie count keeps rows above the threshold
     plus the EARLIEST ties (``keep`` written). The same for the secondary score over
     the not-yet-kept middle rows with k - k1 slots (``keep`` re-read and updated).
     Tiles of SEL_BLOCK rows.
  4. Move: rows [p, n) in tiles of BLOCK, in increasing order; dest = p + running count
     of kept rows (exclusive cumsum in the tile). A tile loads its moving keys (two half
     tiles for rotate_half) and values, re-rotates keys by ``delta = dest - row`` (fp32
     angles, only the first ``rotary_pairs`` frequency pairs; sin/cos by :func:`_sincos`,
     max abs error 2.5e-7 for |angle| <= 2e4, since libdevice's huge-argument path made
     the kernel spill), then a barrier, then stores.
     dest <= row, so no later tile reads a row an earlier tile wrote, and within a tile
     the barrier orders every load before any store: race-free in place.
  Program 0 also writes ``new_length = min(n, budget)``.

Masking: rows outside [0, C) / the phase's range, columns >= D (D_P = next power of two,
80 -> 128), >= D/2 for half tiles, >= Dv for values. Accumulation fp32. The (l, b, h)
base offsets are int64; row offsets inside one head's slice are int32 (launcher-checked).
Default config: BLOCK = 16, BLOCK_P = 32, SEL_BLOCK = 512, 8 warps, 1 stage (0 spills on
sm_80 and sm_90 for every spec below, head dim 256 included (max 194 registers, tar bf16
sm_90); BLOCK = 32 or 4 warps spill on sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sort_key(x):
    """fp32 -> int32 whose signed order is the float order; NaN -> key(-inf), -0 -> key(+0)."""
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _count_ge(sp, kp, lo, hi, thr, USE_KEEP: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """#candidates in rows [lo, hi) with key >= thr (an int32 scalar)."""
    cnt = tl.sum(tl.zeros([SEL_BLOCK], tl.int32), axis=0)  # typed 0-d zero
    for i0 in range(lo, hi, SEL_BLOCK):
        rows = i0 + tl.arange(0, SEL_BLOCK)
        m = rows < hi
        if USE_KEEP:
            m = m & (tl.load(kp + rows, mask=m, other=1).to(tl.int32) == 0)
        key = _sort_key(tl.load(sp + rows, mask=m, other=0.0))
        cnt += tl.sum((m & (key >= thr)).to(tl.int32), axis=0)
    return cnt


@triton.jit
def _kth_largest(sp, kp, lo, hi, k, USE_KEEP: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """(T, take): T = key of the k-th largest candidate in rows [lo, hi) (candidates: every
    row, or rows with keep == 0 if USE_KEEP); take = k - #candidates with key > T.
    Binary search on the int32 key range: the largest T with #(key >= T) >= k, 32 steps
    (the bounds are int64 scalars; the per-row keys stay int32)."""
    t_lo = tl.full([], -2147483648, tl.int64)
    t_hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (t_lo + t_hi + 1) >> 1
        ok = _count_ge(sp, kp, lo, hi, mid.to(tl.int32), USE_KEEP, SEL_BLOCK) >= k
        t_lo = tl.where(ok, mid, t_lo)
        t_hi = tl.where(ok, t_hi, mid - 1)
    thr = t_lo.to(tl.int32)
    # #(key > thr) = #(key >= thr + 1); thr = INT32_MAX (only reached when k = 0) is kept
    # from wrapping: no float maps to it (NaN was folded into -inf), so #(key >= it) = 0
    thr1 = tl.minimum(t_lo + 1, 2147483647).to(tl.int32)
    gt = _count_ge(sp, kp, lo, hi, thr1, USE_KEEP, SEL_BLOCK)
    return thr, k - gt


@triton.jit
def _mark_selected(sp, kp, lo, hi, thr, take, USE_KEEP: tl.constexpr,
                   SEL_BLOCK: tl.constexpr):
    """keep[i] = 1 for candidates with key > thr and the first ``take`` with key == thr."""
    offs = tl.arange(0, SEL_BLOCK)
    ties = tl.sum(tl.zeros([SEL_BLOCK], tl.int32), axis=0)
    for i0 in range(lo, hi, SEL_BLOCK):
        rows = i0 + offs
        m = rows < hi
        old = tl.load(kp + rows, mask=m, other=1).to(tl.int32)
        if USE_KEEP:
            m = m & (old == 0)
        key = _sort_key(tl.load(sp + rows, mask=m, other=0.0))
        tie = m & (key == thr)
        rank = ties + tl.cumsum(tie.to(tl.int32), axis=0)  # inclusive, in time order
        sel = m & ((key > thr) | (tie & (rank <= take)))
        tl.store(kp + rows, (old != 0) | sel, mask=rows < hi)
        ties += tl.sum(tie.to(tl.int32), axis=0)


@triton.jit
def _sincos(x):
    """(sin x, cos x) in fp32 without libdevice's huge-argument path (whose local array and
    registers made this kernel spill): Cody-Waite reduction by pi/2 in three parts (cephes'
    split, exact products for |x| < 8192 pi/2, a few ulp beyond), then cephes' sinf/cosf
    minimax polynomials on [-pi/4, pi/4] and the quadrant swap. Plain arithmetic, so the
    interpreter runs the same code the GPU does."""
    q = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - q * 1.5703125
    r = r - q * 4.837512969970703125e-4
    r = r - q * 7.549789954891882e-8
    z = r * r
    sn = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    cs = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3
                                                              + z * 2.443315711809948e-5))
    j = q.to(tl.int32) & 3
    s_out = tl.where(j == 0, sn, tl.where(j == 1, cs, tl.where(j == 2, -sn, -cs)))
    c_out = tl.where(j == 0, cs, tl.where(j == 1, -sn, tl.where(j == 2, -cs, sn)))
    return s_out, c_out


@triton.jit
def _kv_compact_fwd_kernel(
    K, V, LEN, INV_FREQ, EXT, SCORE, KEEP, NEWLEN, MWS,
    skl, skb, skh, skn, svl, svb, svh, svn, sel, seb, seh, sen,
    B, H, C, budget, prefix, recent, tpf, primary_slots, rotary_pairs,
    D: tl.constexpr, D_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    DV: tl.constexpr, DV_P: tl.constexpr, HAS_EXT: tl.constexpr, HAS_TAR: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, SEL_BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    l = (pid // (B * H)).to(tl.int64)
    b = ((pid // H) % B).to(tl.int64)
    h = (pid % H).to(tl.int64)
    kb = K + l * skl + b * skb + h * skh
    vb = V + l * svl + b * svb + h * svh
    plane = pid.to(tl.int64) * C  # this head's row 0 in the (L*B*H, C) score/keep planes
    n = tl.minimum(tl.maximum(tl.load(LEN), 0), C).to(tl.int32)  # clamp in int64 first
    lo = prefix
    hi = n - recent
    compress = n > budget
    k = budget - prefix - recent
    k1 = tl.minimum(primary_slots, k)
    num_heads = tl.num_programs(0).to(tl.int64)
    sp0 = SCORE + plane  # primary plane of this head
    sp1 = SCORE + num_heads * C + plane  # secondary plane
    kp = KEEP + plane
    # column offsets are rebuilt inside each phase so they are not live across the others

    # ---- 1. TaR table M[j] (fp32 workspace of this head)
    offs_d = tl.arange(0, D_P)
    dmask = offs_d < D
    if HAS_TAR:
        mw = MWS + pid.to(tl.int64) * tpf * D
        frames = recent // tpf
        offs_p = tl.arange(0, BLOCK_P)
        p_end = tl.where(hi > lo, tpf, 0)
        for j0 in range(0, p_end, BLOCK_P):
            j = j0 + offs_p
            jm = j < tpf
            tm = jm[:, None] & dmask[None, :]
            acc = tl.zeros((BLOCK_P, D_P), dtype=tl.float32)
            for f in range(frames):
                rows = hi + f * tpf + j
                x = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=tm,
                            other=0.0).to(tl.float32)
                nrm = tl.sqrt(tl.sum(x * x, axis=1))
                acc += x / tl.maximum(nrm, 1e-9)[:, None]
            tl.store(mw + j[:, None] * D + offs_d[None, :], acc / frames, mask=tm)
        tl.debug_barrier()

    # ---- 2. scores of every row (0 outside the middle)
    offs_r = tl.arange(0, BLOCK)
    offs_v = tl.arange(0, DV_P)
    vmask = offs_v < DV
    for r0 in range(0, C, BLOCK):
        rows = r0 + offs_r
        mid = (rows >= lo) & (rows < hi)
        if HAS_EXT:
            prim = tl.load(EXT + l * sel + b * seb + h * seh + rows * sen, mask=mid,
                           other=0.0).to(tl.float32)
            sec = tl.zeros((BLOCK,), dtype=tl.float32)
        else:
            if HAS_TAR:
                tm = mid[:, None] & dmask[None, :]
                x = tl.load(kb + rows[:, None] * skn + offs_d[None, :], mask=tm,
                            other=0.0).to(tl.float32)
                nrm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-9)
                j = tpf - 1 - ((hi - 1 - rows) % tpf)
                j = tl.where(mid, j, 0)
                mrow = tl.load(mw + j[:, None] * D + offs_d[None, :], mask=tm, other=0.0)
                prim = -tl.sum(x * mrow, axis=1) / nrm
            else:
                prim = tl.zeros((BLOCK,), dtype=tl.float32)
            vm = mid[:, None] & vmask[None, :]
            y = tl.load(vb + rows[:, None] * svn + offs_v[None, :], mask=vm,
                        other=0.0).to(tl.float32)
            sec = tl.sqrt(tl.sum(y * y, axis=1))
        rmask = rows < C
        tl.store(sp0 + rows, tl.where(mid, prim, 0.0), mask=rmask)
        tl.store(sp1 + rows, tl.where(mid, sec, 0.0), mask=rmask)
        # keep: every valid row, minus the middle when compressing (selected below)
        tl.store(kp + rows, (rows < n) & ~(compress & mid), mask=rmask)
    tl.debug_barrier()

    # ---- 3. selection (empty ranges when not compressing)
    s_hi = tl.where(compress, hi, lo)
    thr, take = _kth_largest(sp0, kp, lo, s_hi, k1, False, SEL_BLOCK)
    _mark_selected(sp0, kp, lo, s_hi, thr, take, False, SEL_BLOCK)
    tl.debug_barrier()
    thr, take = _kth_largest(sp1, kp, lo, s_hi, k - k1, True, SEL_BLOCK)
    _mark_selected(sp1, kp, lo, s_hi, thr, take, True, SEL_BLOCK)
    tl.debug_barrier()

    # ---- 4. move kept rows to the front, in order (race-free, see module doc)
    offs_r = tl.arange(0, BLOCK)
    offs_v = tl.arange(0, DV_P)
    vmask = offs_v < DV
    offs_i = tl.arange(0, HALF_P)
    imask = offs_i < HALF
    inv = tl.load(INV_FREQ + offs_i, mask=imask, other=0.0).to(tl.float32)
    inv = tl.where(offs_i < rotary_pairs, inv, 0.0)  # M-RoPE: spatial pairs do not rotate
    m_lo = tl.minimum(prefix, n)
    m_hi = tl.where(compress, n, m_lo)  # nothing moves when everything fits
    dest0 = m_lo
    for r0 in range(m_lo, m_hi, BLOCK):
        rows = r0 + offs_r
        rm = rows < m_hi
        kept = tl.load(kp + rows, mask=rm, other=0).to(tl.int32)
        dest = dest0 + tl.cumsum(kept, axis=0) - kept
        mv = rm & (kept != 0) & (dest != rows)
        tm = mv[:, None] & imask[None, :]
        ks = kb + rows[:, None] * skn + offs_i[None, :]
        x1 = tl.load(ks, mask=tm, other=0.0).to(tl.float32)
        x2 = tl.load(ks + HALF, mask=tm, other=0.0).to(tl.float32)
        vt = mv[:, None] & vmask[None, :]
        yv = tl.load(vb + rows[:, None] * svn + offs_v[None, :], mask=vt, other=0.0)
        ang = (dest - rows).to(tl.float32)[:, None] * inv[None, :]
        sn, c = _sincos(ang)
        y1 = x1 * c - x2 * sn
        y2 = x2 * c + x1 * sn
        tl.debug_barrier()  # every source row of this tile is read before any write
        kd = kb + dest[:, None] * skn + offs_i[None, :]
        tl.store(kd, y1.to(K.dtype.element_ty), mask=tm)
        tl.store(kd + HALF, y2.to(K.dtype.element_ty), mask=tm)
        tl.store(vb + dest[:, None] * svn + offs_v[None, :], yv, mask=vt)
        tl.debug_barrier()
        dest0 += tl.sum(kept, axis=0)
    tl.store(NEWLEN, tl.minimum(n, budget).to(tl.int64), mask=pid == 0)


DEFAULT_CONFIG = {"BLOCK": 16, "BLOCK_P": 32, "SEL_BLOCK": 512, "num_warps": 8,
                  "num_stages": 1}


def kv_compact_fwd(
    key: torch.Tensor, value: torch.Tensor, length: torch.Tensor, inv_freq: torch.Tensor,
    scores: torch.Tensor | None, budget: int, prefix: int, recent: int,
    tokens_per_frame: int, primary_slots: int, rotary_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the kernel once for every (layer, batch, head); returns (new_length, keep,
    score). Does not assert CUDA (the tier-1 tests run it in the interpreter on CPU)."""
    nl, b, h, c, d = key.shape
    dv = value.shape[4]
    for name, t, w in (("key", key, d), ("value", value, dv)):
        if (c - 1) * t.stride(3) + w >= 2**31:
            raise ValueError(f"{name}: one head's slice spans >= 2^31 elements")
    dev = key.device
    keep = torch.empty((nl, b, h, c), dtype=torch.bool, device=dev)
    score = torch.empty((2, nl, b, h, c), dtype=torch.float32, device=dev)
    new_length = torch.empty((), dtype=torch.int64, device=dev)
    has_tar = scores is None and tokens_per_frame > 0 and recent >= tokens_per_frame
    tpf = tokens_per_frame if has_tar else 1
    mws = torch.empty((nl * b * h * tpf * d) if has_tar else 1, dtype=torch.float32,
                      device=dev)
    ext = scores if scores is not None else score  # dummy pointer when unused
    es = scores.stride() if scores is not None else (0, 0, 0, 0)
    inv = inv_freq.to(device=dev, dtype=torch.float32).contiguous()
    cfg = DEFAULT_CONFIG
    _kv_compact_fwd_kernel[(nl * b * h,)](
        key, value, length.reshape(1), inv, ext, score, keep, new_length.reshape(1), mws,
        key.stride(0), key.stride(1), key.stride(2), key.stride(3),
        value.stride(0), value.stride(1), value.stride(2), value.stride(3),
        es[0], es[1], es[2], es[3],
        b, h, c, budget, prefix, recent, tpf, primary_slots, rotary_pairs,
        D=d, D_P=triton.next_power_of_2(d), HALF=d // 2,
        HALF_P=triton.next_power_of_2(d // 2), DV=dv, DV_P=triton.next_power_of_2(dv),
        HAS_EXT=scores is not None, HAS_TAR=has_tar,
        BLOCK=cfg["BLOCK"], BLOCK_P=cfg["BLOCK_P"], SEL_BLOCK=cfg["SEL_BLOCK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return new_length, keep, score


# Head dims compiled (D = Dv): 16 and 64 (tiny configs), 80 (padded), 128 (Qwen2.5-VL-7B,
# Qwen3-VL-8B, LLaVA-OV-7B, Video-XL, Video-LLaMA), 256 (Qwen3.5-9B full-attention layers).
# Other head dims, and Dv != D (the op allows it, no shipped model has it), compile other
# constexprs and are not checked. Rotary
# variants (full, M-RoPE blocked / interleaved, partial, none) differ only in the runtime
# ``rotary_pairs`` and inv_freq, not in constexprs. fp64 caches reach the kernel on CUDA.
# Modes: tar (TaR + VaN), ext (caller scores), van (tar_ratio 0: VaN only).
HEAD_DIMS = (16, 64, 80, 128, 256)


def _specs() -> list[dict]:
    specs = []
    for ty in ("bf16", "fp16", "fp32", "fp64"):
        for d in HEAD_DIMS:
            for mode in ("tar", "ext", "van"):
                sig = {"K": "*" + ty, "V": "*" + ty, "LEN": "*i64", "INV_FREQ": "*fp32",
                       "EXT": "*fp32", "SCORE": "*fp32", "KEEP": "*i1", "NEWLEN": "*i64",
                       "MWS": "*fp32",
                       "skl": "i64", "skb": "i64", "skh": "i64", "skn": "i32",
                       "svl": "i64", "svb": "i64", "svh": "i64", "svn": "i32",
                       "sel": "i64", "seb": "i64", "seh": "i64", "sen": "i32",
                       "B": "i32", "H": "i32", "C": "i32", "budget": "i32", "prefix": "i32",
                       "recent": "i32", "tpf": "i32", "primary_slots": "i32",
                       "rotary_pairs": "i32",
                       "D": "constexpr", "D_P": "constexpr", "HALF": "constexpr",
                       "HALF_P": "constexpr", "DV": "constexpr", "DV_P": "constexpr",
                       "HAS_EXT": "constexpr", "HAS_TAR": "constexpr", "BLOCK": "constexpr",
                       "BLOCK_P": "constexpr", "SEL_BLOCK": "constexpr"}
                cx = {"D": d, "D_P": triton.next_power_of_2(d), "HALF": d // 2,
                      "HALF_P": triton.next_power_of_2(d // 2), "DV": d,
                      "DV_P": triton.next_power_of_2(d), "HAS_EXT": mode == "ext",
                      "HAS_TAR": mode == "tar", "BLOCK": DEFAULT_CONFIG["BLOCK"],
                      "BLOCK_P": DEFAULT_CONFIG["BLOCK_P"],
                      "SEL_BLOCK": DEFAULT_CONFIG["SEL_BLOCK"]}
                specs.append({"name": f"kv_compact_{mode}_{ty}_d{d}",
                              "fn": _kv_compact_fwd_kernel, "signature": sig,
                              "constexprs": cx, "num_warps": DEFAULT_CONFIG["num_warps"],
                              "num_stages": DEFAULT_CONFIG["num_stages"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
