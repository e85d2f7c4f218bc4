"""``summary_attention``: Video-XL window attention over a preallocated KV buffer.

Math (spec: :mod:`lvlm_fast.reference.summary_attention`)::

    out[b,h,i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h//G,j]) v[b,h//G,j],  j <= S-Lq+i

with ``G = Hq / Hkv`` (grouped-query attention) and the causal rule aligned bottom-right
(the window's queries are the last Lq rows of the S-row buffer ``[sink; summaries; window]``).

Definitions:

* ``k``/``v`` are usually slices ``buf[:, :, :S]`` of a preallocated cache buffer: their
  strides are honoured and the cache is never concatenated or copied (a last dim that is
  not unit-stride is the one exception: copied once). ``q`` may be copied (it is small).
* Output layout: a (B, Hq, Lq, D) view of a contiguous (B, Lq, Hq, D) tensor, so
  ``out.transpose(1, 2)`` is contiguous (what transformers' attention functions return).
* ``lse`` (B, Hq, Lq) fp32 (fp64 for fp64 inputs): natural-log sum-exp of the scaled
  scores (saved for backward).
* ``key_mass`` (B, S) fp32 when ``return_key_mass`` (else an empty tensor): the softmax
  probability each key received, summed over the window's queries and all query heads.
  Not differentiable.
* Accumulation fp32 (fp64 for fp64 inputs); output in q's dtype. Every query sees key 0,
  so no row is fully masked. fp64 inputs on CUDA run the plain-PyTorch reference (Triton
  rejects the fp64 kernels at compile time).

Layers: C++ ``csrc/summary_attention.cpp`` (CPU; builds on torch's fused flash SDPA for
CPU called on views: the visible-to-all part and the causal square part, merged with their
log-sum-exps) and Triton ``kernels/summary_attention.py`` (CUDA, flash-style) implement
``torch.ops.lvlm_fast.summary_attention`` and ``summary_attention_backward``.
"""

from __future__ import annotations

import math

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::summary_attention"
BWD = "lvlm_fast::summary_attention_backward"

HEAD_DIMS = (64, 80, 96, 128)

torch.library.define(
    OP,
    "(Tensor q, Tensor k, Tensor v, float scale, bool return_key_mass) -> "
    "(Tensor out, Tensor lse, Tensor key_mass)",
)
torch.library.define(
    BWD,
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> "
    "(Tensor grad_q, Tensor grad_k, Tensor grad_v)",
)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(OP)
def _fake_fwd(q, k, v, scale, return_key_mass):
    b, hq, lq, d = q.shape
    s = k.shape[2]
    out = q.new_empty((b, lq, hq, d)).transpose(1, 2)
    lse = q.new_empty((b, hq, lq), dtype=_acc(q))
    mass = q.new_empty((b, s) if return_key_mass else (0,), dtype=torch.float32)
    return out, lse, mass


@torch.library.register_fake(BWD)
def _fake_bwd(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --------------------------------------------------------------------------- CUDA (Triton)
@torch.library.impl(OP, "CUDA")
def _cuda_fwd(q, k, v, scale, return_key_mass):
    from lvlm_fast.kernels.summary_attention import summary_attention_fwd

    return summary_attention_fwd(q, k, v, scale, return_key_mass)


@torch.library.impl(BWD, "CUDA")
def _cuda_bwd(grad_out, q, k, v, out, lse, scale):
    from lvlm_fast.kernels.summary_attention import summary_attention_bwd

    return summary_attention_bwd(grad_out, q, k, v, out, lse, scale)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_mass):
    # lse and key_mass are for the backward / eviction policies: no gradient through them.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = torch.ops.lvlm_fast.summary_attention_backward(
        grad_out, q, k, v, out, lse, ctx.scale
    )
    return dq, dk, dv, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- CPU fallback
def reference_fwd(q, k, v, scale, return_key_mass):
    """Schema-shaped reference, used as the CPU kernel only if the C++ build is missing."""
    from lvlm_fast.reference.summary_attention import bottom_right_mask

    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    acc = _acc(q)
    kr = k.to(acc).repeat_interleave(g, 1)
    vr = v.to(acc).repeat_interleave(g, 1)
    sc = (q.to(acc) @ kr.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~bottom_right_mask(lq, k.shape[2], q.device), float("-inf"))
    lse = torch.logsumexp(sc, -1)
    p = torch.exp(sc - lse[..., None])
    o = (p @ vr).to(q.dtype)
    out = q.new_empty((b, lq, hq, d)).transpose(1, 2)
    out.copy_(o)
    mass = p.sum((1, 2)).float() if return_key_mass else q.new_empty((0,), dtype=torch.float32)
    return out, lse.to(acc), mass


def reference_bwd(grad_out, q, k, v, out, lse, scale):
    """Backward by autograd through :func:`reference_fwd` (CPU fallback only)."""
    lq, lk, lv = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        o, _, _ = reference_fwd(lq, lk, lv, scale, False)
        dq, dk, dv = torch.autograd.grad(o, (lq, lk, lv), grad_out)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


CPU_FALLBACKS = {
    "summary_attention": reference_fwd,
    "summary_attention_backward": reference_bwd,
}


# --------------------------------------------------------------------------- public API
def _validate(q, k, val):
    v.check_tensor("q", q, 4)
    v.check_tensor("k", k, 4)
    v.check_tensor("v", val, 4)
    b, hq, lq, d = q.shape
    if b < 1 or lq < 1:
        raise ValueError(f"q must be (B, Hq, Lq, Dh) with B, Lq >= 1, got shape {tuple(q.shape)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"q.shape[3] (head dim) must be one of {HEAD_DIMS}, got {d}")
    v.check_size("k", k, 0, b, "q.shape[0] (batch)")
    v.check_size("k", k, 3, d, "q.shape[3] (head dim)")
    hkv, s = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"k.shape[1] (KV heads) must divide q.shape[1] (query heads) = {hq}, got {hkv} "
            "(grouped-query attention needs Hq to be a multiple of Hkv)"
        )
    if val.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(val.shape)}")
    if s < lq:
        raise ValueError(
            f"k.shape[2] (S cached keys incl. the window) must be >= q.shape[2] (Lq = {lq}), "
            f"got {s}: the window's own keys must be in the buffer"
        )
    v.check_same("device", "q", q, k=k, v=val)
    v.check_same("dtype", "q", q, k=k, v=val)


def summary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Window attention over ``[sink; retained summaries; window]`` (bottom-right causal, GQA).

    Args:
        q: (B, Hq, Lq, Dh) window queries, Dh in {64, 80, 96, 128}.
        k, v: (B, Hkv, S, Dh), S >= Lq, Hq % Hkv == 0; typically views of a preallocated
            buffer (never copied).
        scale: score scale, default 1/sqrt(Dh).
        return_key_mass: also return key_mass (B, S) fp32 (not differentiable).

    Returns ``out`` (B, Hq, Lq, Dh) in q's dtype (see module doc for its layout), or
    ``(out, key_mass)``.
    """
    _validate(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    out, _, mass = torch.ops.lvlm_fast.summary_attention(q, k, v, float(scale), return_key_mass)
    return (out, mass) if return_key_mass else out
