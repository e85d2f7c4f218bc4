"""Triton kernel for ``evict_summaries`` (Video-XL KV eviction, in place).

Spec: :func:`lvlm_fast.reference.videoxl.evict_summaries`; definitions and the race-freedom
argument in :mod:`lvlm_fast.ops.evict_summaries`.

``_evict_summaries_fwd_kernel``: one program per (batch, head). It walks the summaries in
blocks of BLOCK_M rows, in increasing order. Per block it loads the source key rows as
two half tiles (BLOCK_M, HALF_P) (rotate_half pairs i and i + D/2) and the value rows,
rotates the keys in fp32 by ``delta_m * inv_freq`` (delta_m computed from m), then a
``tl.debug_barrier()`` makes every thread's loads complete before any thread stores the
block's destination rows. Destinations never pass their sources (dst <= src + first),
so a later block never reads a row an earlier block wrote, and within a block the
barrier orders reads before writes: race-free without staging buffers. Programs of
different (b, h) touch disjoint memory.

Masking: rows m >= count and columns i >= D/2 (HALF_P is D/2 rounded up to a power of
two: 40 -> 64 for head dim 80) are masked. Angles and rotation in fp32; stores in the
buffer's dtype. The (b, h) base offset is int64; row offsets inside a head's slice are
int32 (launcher-checked). Launcher does not assert CUDA.
All layers in one launch (``evict_summaries_layers``, LAYERS): grid (B * H, L); the
layers' buffers are separate tensors of one shape / strides / dtype, so the program for
layer l adds LAYER_OFF[l] (int64 element offsets of its key and value buffers from layer
0's, a (L, 2) device tensor built once per set of buffers) to layer 0's pointers.
Default config: BLOCK_M = 16, 4 warps, 1 stage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _evict_summaries_fwd_kernel(
    K, V, INV_FREQ, LAYER_OFF,
    skb, skh, skn, svb, svh, svn,
    H, src, first, stride, count, dst, pos_delta,
    HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_M: tl.constexpr, LAYERS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    if LAYERS:  # layer l's buffers sit LAYER_OFF[l] = (k, v) elements from layer 0's
        layer = tl.program_id(1)
        kb += tl.load(LAYER_OFF + 2 * layer)
        vb += tl.load(LAYER_OFF + 2 * layer + 1)
    offs_i = tl.arange(0, HALF_P)
    imask = offs_i < HALF
    inv = tl.load(INV_FREQ + offs_i, mask=imask, other=0.0).to(tl.float32)
    for m0 in range(0, count, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mmask = m < count
        srow = src + first + m * stride
        drow = dst + m
        delta = (drow - srow + pos_delta).to(tl.float32)
        ang = delta[:, None] * inv[None, :]
        c = tl.cos(ang)
        sn = tl.sin(ang)
        tmask = mmask[:, None] & imask[None, :]
        ks = kb + srow[:, None] * skn + offs_i[None, :]
        x1 = tl.load(ks, mask=tmask, other=0.0).to(tl.float32)
        x2 = tl.load(ks + HALF, mask=tmask, other=0.0).to(tl.float32)
        vs = vb + srow[:, None] * svn + offs_i[None, :]
        v1 = tl.load(vs, mask=tmask, other=0.0)
        v2 = tl.load(vs + HALF, mask=tmask, other=0.0)
        y1 = x1 * c - x2 * sn
        y2 = x2 * c + x1 * sn
        tl.debug_barrier()  # every source row of this block is read before any write
        kd = kb + drow[:, None] * skn + offs_i[None, :]
        tl.store(kd, y1.to(K.dtype.element_ty), mask=tmask)
        tl.store(kd + HALF, y2.to(K.dtype.element_ty), mask=tmask)
        vd = vb + drow[:, None] * svn + offs_i[None, :]
        tl.store(vd, v1, mask=tmask)
        tl.store(vd + HALF, v2, mask=tmask)
        tl.debug_barrier()


DEFAULT_CONFIG = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}


def _check_buffer(name: str, t: torch.Tensor) -> None:
    cap, d = t.shape[2], t.shape[3]
    # the buffers are edited in place, so a strided last dim cannot be copied away: the
    # raw op (which skips the public checks) must refuse it rather than misread rows
    if t.stride(3) != 1 and d > 1:
        raise ValueError(f"{name} must have a unit-stride last dim (edited in place), "
                         f"got strides {tuple(t.stride())}")
    if (cap - 1) * t.stride(2) + d >= 2**31:
        raise ValueError(f"{name}: one head's slice spans >= 2^31 elements")


_OFFSETS: dict[tuple, torch.Tensor] = {}  # layer offsets by (device, pointers): pure function


def _layer_offsets(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """(L, 2) int64 element offsets of every layer's key / value buffer from layer 0's, on
    the buffers' device. Built once per set of buffers (the cache keeps its buffers across
    windows), so no host-to-device copy per window."""
    isz = keys[0].element_size()
    ptrs = tuple((k.data_ptr(), v.data_ptr()) for k, v in zip(keys, values, strict=True))
    key = (str(keys[0].device), isz, ptrs)
    off = _OFFSETS.get(key)
    if off is None:
        k0, v0 = ptrs[0]
        rows = []
        for kp, vp in ptrs:
            if (kp - k0) % isz or (vp - v0) % isz:
                raise ValueError("layer buffers are not element-aligned to each other")
            rows.append(((kp - k0) // isz, (vp - v0) // isz))
        off = torch.tensor(rows, dtype=torch.int64).to(keys[0].device)
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        _OFFSETS[key] = off
    return off


def evict_summaries_fwd(
    key: torch.Tensor, value: torch.Tensor, inv_freq: torch.Tensor,
    src: int, first: int, stride: int, count: int, dst: int, pos_delta: int,
) -> None:  # fmt: skip
    if count == 0:
        return
    b, h, _, d = key.shape
    _check_buffer("key", key)
    _check_buffer("value", value)
    half = d // 2
    inv = inv_freq.to(device=key.device, dtype=torch.float32).contiguous()
    cfg = DEFAULT_CONFIG
    _evict_summaries_fwd_kernel[(b * h,)](
        key, value, inv, inv, key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        h, src, first, stride, count, dst, pos_delta,
        HALF=half, HALF_P=triton.next_power_of_2(half), BLOCK_M=cfg["BLOCK_M"], LAYERS=False,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


def evict_summaries_layers_fwd(
    keys: list[torch.Tensor], values: list[torch.Tensor], inv_freq: torch.Tensor,
    src: int, first: int, stride: int, count: int, dst: int, pos_delta: int,
) -> None:  # fmt: skip
    """Every layer in ONE launch, grid (B * H, L): the layers' buffers share shape, strides
    and dtype (checked); layer l is addressed as layer 0's pointer + an element offset."""
    if count == 0 or not keys:
        return
    k0, v0 = keys[0], values[0]
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        for name, t, t0 in (("keys", k, k0), ("values", v, v0)):
            if t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype \
                    or t.device != t0.device:
                raise ValueError(f"{name}[{i}] differs from {name}[0] in shape, strides, dtype "
                                 "or device (one launch needs identical layer buffers)")
    _check_buffer("keys[0]", k0)
    _check_buffer("values[0]", v0)
    b, h, _, d = k0.shape
    off = _layer_offsets(keys, values)
    inv = inv_freq.to(device=k0.device, dtype=torch.float32).contiguous()
    cfg = DEFAULT_CONFIG
    _evict_summaries_fwd_kernel[(b * h, len(keys))](
        k0, v0, inv, off, k0.stride(0), k0.stride(1), k0.stride(2),
        v0.stride(0), v0.stride(1), v0.stride(2),
        h, src, first, stride, count, dst, pos_delta,
        HALF=d // 2, HALF_P=triton.next_power_of_2(d // 2), BLOCK_M=cfg["BLOCK_M"], LAYERS=True,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip


# Head dims compiled: 16 (tiny-videoxl's Qwen2), 64, 80 (padded to HALF_P 64), 96, 128
# (Video-XL's Qwen2-7B and every shipped 7-8B model), 256 (Qwen3.5-9B full attention).
# Other head dims compile other HALF / HALF_P constexprs and are not checked.
HEAD_DIMS = (16, 64, 80, 96, 128, 256)


def _specs() -> list[dict]:
    specs = []
    # every dtype (fp64 buffers run the kernel too, rotation in fp32) x HEAD_DIMS
    cases = [(t, d) for t in ("bf16", "fp16", "fp32", "fp64") for d in HEAD_DIMS]
    for ty, d in cases:
        base = {"K": "*" + ty, "V": "*" + ty, "INV_FREQ": "*fp32", "LAYER_OFF": "*i64",
               "skb": "i64", "skh": "i32", "skn": "i32", "svb": "i64", "svh": "i32",
               "svn": "i32", "H": "i32", "src": "i32", "first": "i32", "stride": "i32",
               "count": "i32", "dst": "i32", "pos_delta": "i32",
               "HALF": "constexpr", "HALF_P": "constexpr", "BLOCK_M": "constexpr",
               "LAYERS": "constexpr"}
        for layers in (False, True):
            # without LAYERS the launcher passes inv_freq (fp32) as the unused LAYER_OFF
            sig = {**base, "LAYER_OFF": "*i64" if layers else "*fp32"}
            cx = {"HALF": d // 2, "HALF_P": triton.next_power_of_2(d // 2),
                  "BLOCK_M": DEFAULT_CONFIG["BLOCK_M"], "LAYERS": layers}
            specs.append({"name": f"evict_{ty}_d{d}{'_layers' if layers else ''}",
                          "fn": _evict_summaries_fwd_kernel, "signature": sig,
                          "constexprs": cx, "num_warps": DEFAULT_CONFIG["num_warps"],
                          "num_stages": DEFAULT_CONFIG["num_stages"]})
    return specs


COMPILE_SPECS: list[dict] = _specs()
