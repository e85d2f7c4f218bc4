"""Triton kernels for ``slowfast_pool`` (SlowFast-LLaVA dual-stream pooling).

Spec: :mod:`lvlm_fast.reference.slowfast_pool`; definitions (tie rule, token order,
separator) in :mod:`lvlm_fast.ops.slowfast_pool`.

Forward (``_slowfast_pool_fwd_kernel``): one program per (frame, BLOCK_D channel block).
It walks the frame's H patch rows; each row is loaded as KW tiles of (SW_P, BLOCK_D)
(tile ``kk`` holds columns ``sw*KW + kk``), so every patch element is read exactly once,
and from that one load it updates
  - the slow window accumulator (SW_P, BLOCK_D) of the current band of KH rows (sum, or
    running max + window-local arg-max; first max in row-major order wins, first NaN
    wins), stored when the band ends (only if the frame is slow: masked store), and
  - the fast column-bin sums (FW_P, BLOCK_D) of the row (a masked sum per bin), folded
    at the end of the row into the fast accumulator (FH_P, FW_P, BLOCK_D) of every row
    bin containing the row; stored (divided by the bin sizes) after the last row.
Frame -> output row maps (slow / fast / separator row, slow rank) are int64 (T,) vectors
built by the launcher with torch ops (no host sync). The separator is written by the
(frame, block) programs whose frame owns a separator slot.

Backward (``_slowfast_pool_bwd_kernel``): same grid. The frame's fast gradients are loaded
once (FH_P, FW_P, BLOCK_D) and pre-divided by the bin sizes; per row they are summed over
the row bins containing it, then each KW tile gets its slow gradient (even share, or the
upstream gradient where the saved arg-max equals its window position) plus its column
bins' fast gradient, and is stored once. No atomics: each program owns its grad_x tile.
The separator gradient (a sum of at most T rows) is done by torch in the launcher.

Masking: padded window columns (sw >= SW) and channels (d >= D) load 0 and are never
stored; padded fast bins (i >= FH, j >= FW) are never stored. Accumulation is fp32; output
in x's dtype. Offsets are int64 (frame stride x T and output row x D can pass 2^31).
Strides of x's three leading dims are passed; the channel dim must be unit-stride (the
launcher copies once otherwise). Launchers take the op's arguments, return its tuple and
do not assert CUDA (tier 1 runs them on CPU tensors with TRITON_INTERPRET=1).

Compile coverage (issue 14): the pooling geometry (H, W, slow kernel, fast grid) is
compiled in, so every geometry is its own kernel and the space is unbounded. Tier 2 checks
``SETTINGS`` (below: both presets on the 24x24, 14x14 and 16x16 token grids of the shipped
families, 2x2 avg + 4x4 on 24x24, 3x3 avg / max on the raw 27x27 SigLIP grid) x bf16 / fp16
/ fp32 x every launch flag (separator, arg-max), fp64 at two settings; BLOCK_D is 64 for
every D >= 64, so the channel width does not change the code. Other geometries are NOT
checked: the same tiling (SW_P x BLOCK_D window tiles, FH_P x FW_P x BLOCK_D fast
accumulator) bounds their registers only for padded sizes no larger than the checked ones
(SW_P <= 16, FH_P * FW_P <= 64), and ptxas showed flag-dependent spills even there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lvlm_fast.ops.slowfast_pool import frame_slots, num_tokens


# --------------------------------------------------------------------------- kernels
@triton.jit
def _slowfast_pool_fwd_kernel(
    x_ptr, out_ptr, arg_ptr, sep_ptr,
    slow_row_ptr, fast_row_ptr, sep_row_ptr, rank_ptr,
    D, stride_xt, stride_xh, stride_xw,
    H: tl.constexpr, W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SW: tl.constexpr, SW_P: tl.constexpr,
    FH: tl.constexpr, FW: tl.constexpr, FH_P: tl.constexpr, FW_P: tl.constexpr,
    IS_MAX: tl.constexpr, NEED_ARGMAX: tl.constexpr, HAS_SEP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    slow_row = tl.load(slow_row_ptr + t)
    fast_row = tl.load(fast_row_ptr + t)
    sw = tl.arange(0, SW_P)
    swmask = sw < SW
    fi = tl.arange(0, FH_P)
    fj = tl.arange(0, FW_P)
    # frame flags as vectors (a 0-d bool in a mask broadcast trips the interpreter)
    is_slow = (tl.zeros((SW_P,), dtype=tl.int64) + slow_row) >= 0
    is_fast = (tl.zeros((FW_P,), dtype=tl.int64) + fast_row) >= 0
    # adaptive bins (torch): [floor(i*H/FH), ceil((i+1)*H/FH))
    r_lo = (fi * H) // FH
    r_hi = ((fi + 1) * H + FH - 1) // FH

    x_frame = x_ptr + t.to(tl.int64) * stride_xt
    d2 = offs_d[None, :]
    tile_mask = swmask[:, None] & dmask[None, :]

    fast_acc = tl.zeros((FH_P, FW_P, BLOCK_D), dtype=tl.float32)
    s_acc = tl.zeros((SW_P, BLOCK_D), dtype=tl.float32)
    s_arg = tl.zeros((SW_P, BLOCK_D), dtype=tl.int32)
    for h in range(H):
        dh = h % KH
        row_ptr = x_frame + tl.cast(h, tl.int64) * tl.cast(stride_xh, tl.int64)
        colsum = tl.zeros((FW_P, BLOCK_D), dtype=tl.float32)
        for kk in tl.static_range(KW):
            w = sw * KW + kk
            w_off = w.to(tl.int64)[:, None] * tl.cast(stride_xw, tl.int64)
            xt = tl.load(row_ptr + w_off + d2, mask=tile_mask, other=0.0).to(tl.float32)
            k_loc = dh * KW + kk
            if IS_MAX:
                take = (xt > s_acc) | ((xt != xt) & (s_acc == s_acc)) | (k_loc == 0)
                s_acc = tl.where(take, xt, s_acc)
                s_arg = tl.where(take, k_loc, s_arg)
            else:
                s_acc = tl.where(k_loc == 0, xt, s_acc + xt)
            for j in tl.static_range(FW):
                in_bin = (w >= (j * W) // FW) & (w < ((j + 1) * W + FW - 1) // FW)
                part = tl.sum(tl.where(in_bin[:, None], xt, 0.0), axis=0)
                colsum += tl.where(fj[:, None] == j, part[None, :], 0.0)
        in_rows = (h >= r_lo) & (h < r_hi)
        fast_acc += tl.where(in_rows[:, None, None], colsum[None, :, :], 0.0)
        if dh == KH - 1:
            srow = slow_row + (h // KH) * SW + sw
            smask = tile_mask & is_slow[:, None]
            val = s_acc if IS_MAX else s_acc * (1.0 / (KH * KW))
            tl.store(out_ptr + srow.to(tl.int64)[:, None] * D + d2,
                     val.to(out_ptr.dtype.element_ty), mask=smask)
            if NEED_ARGMAX:
                rank = tl.load(rank_ptr + t)
                arow = rank * (SW * (H // KH)) + (h // KH) * SW + sw
                tl.store(arg_ptr + arow.to(tl.int64)[:, None] * D + d2, s_arg, mask=smask)

    c_lo = (fj * W) // FW
    c_hi = ((fj + 1) * W + FW - 1) // FW
    cnt = (r_hi - r_lo)[:, None] * (c_hi - c_lo)[None, :]
    cnt = tl.maximum(cnt, 1).to(tl.float32)
    frow = fast_row + fi[:, None] * FW + fj[None, :]
    fmask = (fi[:, None] < FH) & (fj[None, :] < FW) & is_fast[None, :]
    tl.store(out_ptr + frow.to(tl.int64)[:, :, None] * D + offs_d[None, None, :],
             (fast_acc / cnt[:, :, None]).to(out_ptr.dtype.element_ty),
             mask=fmask[:, :, None] & dmask[None, None, :])
    if HAS_SEP:
        sep_row = tl.load(sep_row_ptr + t)
        sep = tl.load(sep_ptr + offs_d, mask=dmask, other=0.0)
        sep_ok = (tl.zeros((BLOCK_D,), dtype=tl.int64) + sep_row) >= 0
        tl.store(out_ptr + sep_row.to(tl.int64) * D + offs_d, sep, mask=dmask & sep_ok)


@triton.jit
def _slowfast_pool_bwd_kernel(
    g_ptr, arg_ptr, gx_ptr,
    slow_row_ptr, fast_row_ptr, rank_ptr,
    D,
    H: tl.constexpr, W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SW: tl.constexpr, SW_P: tl.constexpr,
    FH: tl.constexpr, FW: tl.constexpr, FH_P: tl.constexpr, FW_P: tl.constexpr,
    IS_MAX: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    slow_row = tl.load(slow_row_ptr + t)
    fast_row = tl.load(fast_row_ptr + t)
    sw = tl.arange(0, SW_P)
    swmask = sw < SW
    fi = tl.arange(0, FH_P)
    fj = tl.arange(0, FW_P)
    # frame flags as vectors (a 0-d bool in a mask broadcast trips the interpreter)
    is_slow = (tl.zeros((SW_P,), dtype=tl.int64) + slow_row) >= 0
    is_fast = (tl.zeros((FW_P,), dtype=tl.int64) + fast_row) >= 0
    r_lo = (fi * H) // FH
    r_hi = ((fi + 1) * H + FH - 1) // FH
    c_lo = (fj * W) // FW
    c_hi = ((fj + 1) * W + FW - 1) // FW
    cnt = tl.maximum((r_hi - r_lo)[:, None] * (c_hi - c_lo)[None, :], 1).to(tl.float32)
    d2 = offs_d[None, :]
    tile_mask = swmask[:, None] & dmask[None, :]

    frow = fast_row + fi[:, None] * FW + fj[None, :]
    fmask = (fi[:, None] < FH) & (fj[None, :] < FW) & is_fast[None, :]
    gf = tl.load(g_ptr + frow.to(tl.int64)[:, :, None] * D + offs_d[None, None, :],
                 mask=fmask[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)
    gf = gf / cnt[:, :, None]

    rank = tl.load(rank_ptr + t)
    gx_frame = gx_ptr + t.to(tl.int64) * (H * W) * D
    for h in range(H):
        dh = h % KH
        in_rows = (h >= r_lo) & (h < r_hi)
        grow = tl.sum(tl.where(in_rows[:, None, None], gf, 0.0), axis=0)  # (FW_P, BLOCK_D)
        srow = slow_row + (h // KH) * SW + sw
        smask = tile_mask & is_slow[:, None]
        gs = tl.load(g_ptr + srow.to(tl.int64)[:, None] * D + d2, mask=smask,
                     other=0.0).to(tl.float32)
        if IS_MAX:
            arow = rank * (SW * (H // KH)) + (h // KH) * SW + sw
            am = tl.load(arg_ptr + arow.to(tl.int64)[:, None] * D + d2, mask=smask, other=-1)
        for kk in tl.static_range(KW):
            w = sw * KW + kk
            if IS_MAX:  # noqa: SIM108 - constexpr branch, keeps `am` out of the avg variant
                val = tl.where(am == dh * KW + kk, gs, 0.0)
            else:
                val = gs * (1.0 / (KH * KW))
            for j in tl.static_range(FW):
                in_bin = (w >= (j * W) // FW) & (w < ((j + 1) * W + FW - 1) // FW)
                gj = tl.sum(tl.where(fj[:, None] == j, grow, 0.0), axis=0)
                val += tl.where(in_bin[:, None], gj[None, :], 0.0)
            off = (h * W + w).to(tl.int64)[:, None] * D + d2
            tl.store(gx_frame + off, val.to(gx_ptr.dtype.element_ty), mask=tile_mask)


# --------------------------------------------------------------------------- launch config
def fwd_config(d: int, geo: dict, is_max: bool, need_argmax: bool = True,
               has_sep: bool = True) -> tuple[int, int]:
    """(BLOCK_D, num_warps). Live fp32 tiles: the fast accumulator (FH_P*FW_P x BLOCK_D),
    the slow accumulator (+ int32 arg-max), a row tile and the column sums. BLOCK_D = 64 at
    4 warps keeps them in registers (<= 128/thread, no spills on sm_80/sm_90, see
    COMPILE_SPECS) and gives T x D/64 programs; max pooling over wide windows (KW >= 3,
    e.g. 3x3 on 27x27) and fast grids above 4x4 (padded accumulators) get 8 warps."""
    block_d, nw = bwd_config(d, geo, is_max)
    if is_max:
        # ptxas (sm_80 / sm_90) spills 4-8 B at low register counts (64-80/thread) in max
        # mode for some flag combinations (tier 2): 1x2 max on 16x16 at 4 warps (fp16, no
        # arg-max, sm_90): 8 warps there; 3x3 max on 27x27 spills at 8 warps with the
        # arg-max and no separator (bf16, sm_80), at 4 warps with both (fp16/bf16, sm_90),
        # at 16 warps with neither (sm_90): 4 warps for arg-max without separator, else 8.
        wide = geo["KW"] * geo["SW_P"] >= 48
        nw = 4 if wide and need_argmax and not has_sep else 8
    return block_d, nw


def bwd_config(d: int, geo: dict, is_max: bool) -> tuple[int, int]:
    block_d = max(16, min(64, triton.next_power_of_2(d)))
    heavy = (is_max and geo["KW"] * geo["SW_P"] >= 48) or geo["FH_P"] * geo["FW_P"] > 16
    return block_d, 8 if heavy else 4


def _geometry(x_shape, slow_kernel, fast_grid) -> dict:
    _, h, w, _ = (int(n) for n in x_shape)
    kh, kw = int(slow_kernel[0]), int(slow_kernel[1])
    fh, fw = int(fast_grid[0]), int(fast_grid[1])
    sw = w // kw
    return dict(H=h, W=w, KH=kh, KW=kw, SW=sw, SW_P=triton.next_power_of_2(sw), FH=fh, FW=fw,
                FH_P=triton.next_power_of_2(fh), FW_P=triton.next_power_of_2(fw))


# --------------------------------------------------------------------------- launchers
def slowfast_pool_fwd(x, slow_index, separator, slow_kernel, slow_mode, fast_grid, fast_frames,
                      order, need_argmax):
    """Launcher with the registered op's arguments; returns (out, argmax)."""
    if x.stride(-1) != 1:
        x = x.contiguous()  # the one documented copy: channel dim must be unit-stride
    t, h, w, d = x.shape
    geo = _geometry(x.shape, slow_kernel, fast_grid)
    ns = slow_index.shape[0]
    s = (h // geo["KH"]) * geo["SW"]
    f = geo["FH"] * geo["FW"]
    has_sep = separator is not None
    rows = num_tokens(t, ns, h, w, slow_kernel, fast_grid, fast_frames, order, has_sep)
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    is_max = slow_mode == "max"
    want_arg = is_max and bool(need_argmax)
    argmax = torch.empty((ns * s, d) if want_arg else (0,), dtype=torch.int32, device=x.device)
    slow_row, fast_row, sep_row, rank = frame_slots(slow_index, t, s, f, has_sep, fast_frames,
                                                    order)
    sep = separator.contiguous() if has_sep else out  # dummy pointer when unused
    block_d, nw = fwd_config(d, geo, is_max, want_arg, has_sep)
    grid = (t, triton.cdiv(d, block_d))
    _slowfast_pool_fwd_kernel[grid](
        x, out, argmax if want_arg else out, sep, slow_row, fast_row, sep_row, rank,
        d, x.stride(0), x.stride(1), x.stride(2),
        IS_MAX=is_max, NEED_ARGMAX=want_arg, HAS_SEP=has_sep, BLOCK_D=block_d,
        num_warps=nw, num_stages=1, **geo,
    )
    return out, argmax


def slowfast_pool_bwd(grad_out, argmax, slow_index, x_shape, has_separator, slow_kernel,
                      slow_mode, fast_grid, fast_frames, order):
    """Launcher with the registered backward op's arguments; returns (grad_x, grad_sep)."""
    g = grad_out.contiguous()
    t, h, w, d = (int(n) for n in x_shape)
    geo = _geometry(x_shape, slow_kernel, fast_grid)
    s = (h // geo["KH"]) * geo["SW"]
    f = geo["FH"] * geo["FW"]
    is_max = slow_mode == "max"
    if is_max and slow_index.shape[0] and tuple(argmax.shape) != (slow_index.shape[0] * s, d):
        raise RuntimeError("slowfast_pool_backward: max mode needs the (Ns*S, D) int32 arg-max "
                           "saved by the forward (need_argmax=True)")
    slow_row, fast_row, sep_row, rank = frame_slots(slow_index, t, s, f, has_separator,
                                                    fast_frames, order)
    gx = torch.empty((t, h, w, d), dtype=g.dtype, device=g.device)
    block_d, nw = bwd_config(d, geo, is_max)
    grid = (t, triton.cdiv(d, block_d))
    am = argmax.contiguous() if is_max and argmax.numel() else g  # dummy pointer when unused
    _slowfast_pool_bwd_kernel[grid](
        g, am, gx, slow_row, fast_row, rank, d,
        IS_MAX=is_max and argmax.numel() > 0, BLOCK_D=block_d, num_warps=nw, num_stages=1,
        **geo,
    )
    if has_separator:  # slot rows are static: one (slow_fast) or one per frame (interleaved)
        rows_ = sep_row[:1] if order == "slow_fast" else sep_row
        grad_sep = g.index_select(0, rows_).float().sum(0).to(g.dtype)
    else:
        grad_sep = g.new_empty((0,))
    return gx, grad_sep


def _as_fp64(spec: dict) -> dict:
    """The same launch with fp64 data pointers (fp32 scratch unchanged): fp64 inputs reach
    this kernel on CUDA, so it must compile for them too (tier 2, issue 9.4)."""
    sig = {k: "*fp64" if v == "*bf16" else v for k, v in spec["signature"].items()}
    return {**spec, "signature": sig, "name": spec["name"].replace("bf16", "fp64")}


# --------------------------------------------------------------------------- tier-2 specs
# Geometries compiled (H x W, slow kernel, mode, fast grid): the presets (sf_llava: (1, 2)
# max + 4x4; sf_llava_1_5: (2, 2) avg + 6x6) on the shipped families' token grids at their
# usual frame sizes: 24x24 (the presets' own grid), 14x14 (LLaVA-OneVision's pooled
# ceil(27 / 2), Qwen3-VL / Qwen3.5 at 448x448), 16x16 (Qwen2.5-VL at 448x448); plus the
# default 2x2 avg + 4x4 and the raw 27x27 SigLIP grid with 3x3 kernels. Every launch flag
# (HAS_SEP; NEED_ARGMAX in max mode) at each. BLOCK_D is 64 for every D >= 64 (D is a
# runtime argument), so D 1152 / 4096 / 16384 compile the same code (16-divisible D).
# Unchecked: other grids (frame sizes), slow kernels and fast grids - each is its own
# compile (H, W, KH, KW, FH, FW are constexprs) - and D < 64 (BLOCK_D 16 / 32).
SETTINGS = [  # (tag, grid, slow_kernel, mode, fast_grid)
    ("24_1x2max_4x4", (24, 24), (1, 2), "max", (4, 4)),
    ("24_2x2avg_4x4", (24, 24), (2, 2), "avg", (4, 4)),
    ("24_2x2avg_6x6", (24, 24), (2, 2), "avg", (6, 6)),
    ("27_3x3avg_4x4", (27, 27), (3, 3), "avg", (4, 4)),
    ("27_3x3max_4x4", (27, 27), (3, 3), "max", (4, 4)),
    ("14_1x2max_4x4", (14, 14), (1, 2), "max", (4, 4)),
    ("14_2x2avg_6x6", (14, 14), (2, 2), "avg", (6, 6)),
    ("16_1x2max_4x4", (16, 16), (1, 2), "max", (4, 4)),
    ("16_2x2avg_6x6", (16, 16), (2, 2), "avg", (6, 6)),
]


def _specs() -> list[dict]:
    specs = []
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for d in (1152, 4096):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            p = "*" + ty[dt]
            for tag, (h, w), sk, mode, fg in SETTINGS[:5] if d == 4096 else SETTINGS:
                geo = _geometry((1, h, w, d), sk, fg)
                is_max = mode == "max"
                sig = dict(x_ptr=p, out_ptr=p, arg_ptr="*i32", sep_ptr=p, slow_row_ptr="*i64",
                           fast_row_ptr="*i64", sep_row_ptr="*i64", rank_ptr="*i64", D="i32",
                           stride_xt="i64", stride_xh="i32", stride_xw="i32")
                # without NEED_ARGMAX the launcher passes out as arg_ptr (x's dtype)
                flags = [(sep, arg) for sep in (True, False)
                         for arg in ((True, False) if is_max else (False,))]
                if d == 4096:  # same compiled code as D 1152: the original entries only
                    flags = [(True, is_max)]
                for sep, arg in flags:
                    bd, nw = fwd_config(d, geo, is_max, arg, sep)
                    ce = dict(geo, IS_MAX=is_max, NEED_ARGMAX=arg, HAS_SEP=sep, BLOCK_D=bd)
                    sig_f = {**sig, "arg_ptr": "*i32" if arg else p,
                             **{k: "constexpr" for k in ce}}
                    div16 = [k for k, v in sig_f.items() if v.startswith("*")
                             or k in ("D", "stride_xt", "stride_xh", "stride_xw")]
                    flag = ("" if sep else "_nosep") + ("_noarg" if is_max and not arg else "")
                    specs.append({"name": f"sfp_fwd_D{d}_{ty[dt]}_{tag}{flag}",
                                  "fn": _slowfast_pool_fwd_kernel, "signature": sig_f,
                                  "constexprs": ce, "num_warps": nw, "num_stages": 1,
                                  "divisible_by_16": div16})
                bd, nw = bwd_config(d, geo, is_max)
                # IS_MAX needs the saved arg-max (int32); avg mode, or max with no slow
                # frame, passes grad_out (x's dtype) as the unused arg_ptr
                for use_arg in (True, False) if is_max and d == 1152 else (is_max,):
                    ce = dict(geo, IS_MAX=use_arg, BLOCK_D=bd)
                    sig = dict(g_ptr=p, arg_ptr="*i32" if use_arg else p, gx_ptr=p,
                               slow_row_ptr="*i64", fast_row_ptr="*i64", rank_ptr="*i64",
                               D="i32")
                    sig.update({k: "constexpr" for k in ce})
                    div16 = [k for k, v in sig.items() if v.startswith("*") or k == "D"]
                    flag = "_noslow" if is_max and not use_arg else ""
                    specs.append({"name": f"sfp_bwd_D{d}_{ty[dt]}_{tag}{flag}",
                                  "fn": _slowfast_pool_bwd_kernel, "signature": sig,
                                  "constexprs": ce, "num_warps": nw, "num_stages": 1,
                                  "divisible_by_16": div16})
    # fp64 inputs run these kernels (fp32 accumulation): the max and avg settings at D 1152
    specs += [_as_fp64(s) for s in specs if s["name"].startswith("sfp_")
              and s["name"].endswith(("D1152_bf16_24_1x2max_4x4", "D1152_bf16_24_2x2avg_4x4"))]
    return specs


COMPILE_SPECS: list[dict] = _specs()
