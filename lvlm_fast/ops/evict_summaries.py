"""``evict_summaries``: Video-XL's KV eviction after a window, in place, one kernel.

After a window has been appended to a preallocated (B, H, C, D) key/value buffer at rows
``[src, src + n_window)``, its summary slots sit at the fixed stride of the interleave
rule: slot i is a summary iff ``i % (r+1) == r - c`` (c = remainder carried from earlier
windows), i.e. rows ``src + first + m*stride`` with ``first = r - c``, ``stride = r + 1``.
The op moves summary m to row ``dst + m`` (right after the retained summaries) and
re-rotates its key by ``delta_m = (dst + m) - (src + first + m*stride) + pos_delta`` RoPE
positions (HF rotate_half convention, angle = delta * inv_freq in fp32), so that with
positions equal to buffer rows (pos_delta = 0) the j-th summary sits at ``sink + j``,
as the released model (which re-rotates a pre-RoPE cache every call) expects. Values are
moved unrotated. Rows past the moved ones are left as they are (stale, beyond the
cache's length).

Race freedom: we require ``dst <= src + first`` so every destination row is at or before
its source row; then destination m can only coincide with the source of some m' <= m.
Both kernels process summaries in increasing m (C++: sequentially per (b, h); Triton: one
program per (b, h), blocks of rows in order, loads of a block complete before a barrier,
stores after it), so a row is always read before it is overwritten. Ratio 1 and 2 (where
sources and destinations interleave) are tested.

Not differentiable (an inference-time cache edit). Layers: C++ ``csrc/evict_summaries.cpp``
(CPU) and Triton ``kernels/evict_summaries.py`` (CUDA).
"""

from __future__ import annotations

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::evict_summaries"

torch.library.define(
    OP,
    "(Tensor(a!) key, Tensor(b!) value, Tensor inv_freq, int src, int first, int stride, "
    "int count, int dst, int pos_delta) -> ()",
)


OP_LAYERS = "lvlm_fast::evict_summaries_layers"

torch.library.define(
    OP_LAYERS,
    "(Tensor(a!)[] keys, Tensor(b!)[] values, Tensor inv_freq, int src, int first, int stride, "
    "int count, int dst, int pos_delta) -> ()",
)


@torch.library.register_fake(OP)
def _fake(key, value, inv_freq, src, first, stride, count, dst, pos_delta):
    return None


@torch.library.register_fake(OP_LAYERS)
def _fake_layers(keys, values, inv_freq, src, first, stride, count, dst, pos_delta):
    return None


@torch.library.impl(OP_LAYERS, "CUDA")
def _cuda_layers(keys, values, inv_freq, src, first, stride, count, dst, pos_delta):
    from lvlm_fast.kernels.evict_summaries import evict_summaries_layers_fwd

    evict_summaries_layers_fwd(list(keys), list(values), inv_freq, src, first, stride, count,
                               dst, pos_delta)


@torch.library.impl(OP_LAYERS, "CPU")
def _cpu_layers(keys, values, inv_freq, src, first, stride, count, dst, pos_delta):
    # CPU: the per-layer C++ kernel per layer (no launch cost to save on CPU)
    for k, val in zip(keys, values, strict=True):
        torch.ops.lvlm_fast.evict_summaries(k, val, inv_freq, src, first, stride, count, dst,
                                            pos_delta)


@torch.library.impl(OP, "CUDA")
def _cuda(key, value, inv_freq, src, first, stride, count, dst, pos_delta):
    from lvlm_fast.kernels.evict_summaries import evict_summaries_fwd

    evict_summaries_fwd(key, value, inv_freq, src, first, stride, count, dst, pos_delta)


def reference_impl(key, value, inv_freq, src, first, stride, count, dst, pos_delta):
    """CPU fallback only if the C++ build is missing."""
    from lvlm_fast.reference.videoxl import evict_summaries

    evict_summaries(key, value, inv_freq, src, first, stride, count, dst, pos_delta)


CPU_FALLBACKS = {"evict_summaries": reference_impl}


def evict_summaries(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window_start: int,
    ratio: int,
    carry: int,
    count: int,
    dst: int,
    inv_freq: torch.Tensor,
    pos_delta: int = 0,
) -> None:
    """Move a window's ``count`` summary rows to ``dst, dst+1, ...`` in place (see module doc).

    Args:
        key, value: (B, H, C, D) preallocated buffers (last dim unit-stride), D even.
        window_start: row of the window's slot 0.
        ratio: r >= 1 raw tokens per summary; carry: remainder c in [0, r) carried in.
        count: summaries in the window (``(n_raw + c) // r``).
        dst: destination row of summary 0 (``dst <= window_start + r - c``).
        inv_freq: (D/2,) RoPE inverse frequencies (``1 / theta^(2i/D)``).
        pos_delta: extra position shift added to every delta (0 when positions = rows).
    """
    first, stride = _check(key, value, window_start=window_start, ratio=ratio, carry=carry,
                           count=count, dst=dst, inv_freq=inv_freq, pos_delta=pos_delta)
    if count == 0:
        return
    torch.ops.lvlm_fast.evict_summaries(
        key, value, inv_freq, window_start, first, stride, count, dst, pos_delta
    )


def evict_summaries_layers(
    keys: list[torch.Tensor] | tuple[torch.Tensor, ...],
    values: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    window_start: int,
    ratio: int,
    carry: int,
    count: int,
    dst: int,
    inv_freq: torch.Tensor,
    pos_delta: int = 0,
) -> None:
    """:func:`evict_summaries` on every layer at once: one validation and, on CUDA, ONE
    kernel launch for all layers (grid (B * H, L)) instead of one per layer.

    Args:
        keys, values: per-layer (B, H, C, D) buffers, all of one shape, strides, dtype and
            device (a model's cache layers); the other arguments as in
            :func:`evict_summaries`, shared by every layer.
    """
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)):
        raise TypeError("keys and values must be lists of (B, H, C, D) tensors")
    if len(keys) != len(values) or not keys:
        raise ValueError(f"keys and values must be non-empty lists of one length, got "
                         f"{len(keys)} and {len(values)}")
    k0, v0 = keys[0], values[0]
    first, stride = _check(k0, v0, window_start=window_start, ratio=ratio, carry=carry,
                           count=count, dst=dst, inv_freq=inv_freq, pos_delta=pos_delta)
    for i, (k, val) in enumerate(zip(keys, values, strict=True)):
        for name, t, t0 in (("keys", k, k0), ("values", val, v0)):
            if not isinstance(t, torch.Tensor) or t.shape != t0.shape \
                    or t.stride() != t0.stride() or t.dtype != t0.dtype \
                    or t.device != t0.device:
                raise ValueError(f"{name}[{i}] must match {name}[0] in shape "
                                 f"{tuple(t0.shape)}, strides, dtype and device")
    if count == 0:
        return
    torch.ops.lvlm_fast.evict_summaries_layers(
        list(keys), list(values), inv_freq, window_start, first, stride, count, dst, pos_delta
    )


def _check(key, value, *, window_start, ratio, carry, count, dst, inv_freq, pos_delta):
    """The public checks; returns (first, stride) of the interleave rule."""
    v.check_tensor("key", key, 4)
    v.check_tensor("value", value, 4)
    if value.shape != key.shape:
        raise ValueError(
            f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    v.check_same("device", "key", key, value=value, inv_freq=inv_freq)
    v.check_same("dtype", "key", key, value=value)
    cap = key.shape[2]
    v.check_rope_kv(key, value, inv_freq)
    v.check_int("window_start", window_start, 0)
    v.check_int("ratio", ratio, 1)
    v.check_int("carry", carry, 0)
    v.check_int("count", count, 0)
    v.check_int("dst", dst, 0)
    v.check_int("pos_delta", pos_delta)
    if carry >= ratio:
        raise ValueError(f"carry must be in [0, ratio = {ratio}), got {carry}")
    first, stride = ratio - carry, ratio + 1
    if count == 0:
        return first, stride
    last_src = window_start + first + (count - 1) * stride
    if last_src >= cap:
        raise ValueError(
            f"count: summary {count - 1} would be read from row {last_src}, past the buffer's "
            f"capacity key.shape[2] = {cap}"
        )
    if dst > window_start + first:
        raise ValueError(
            f"dst must be <= window_start + ratio - carry = {window_start + first} (moves go "
            f"towards the front, which keeps the in-place move race-free), got {dst}"
        )
    return first, stride
