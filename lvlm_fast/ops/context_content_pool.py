"""``context_content_pool``: LLaMA-VID's context token and content token(s) per frame, fused.

Math (see :mod:`lvlm_fast.reference.context_content_pool`, the spec)::

    A[n]       = softmax_p(Q[n] K[n]^T * scale)        (Lq, P)
    w[n, p]    = mean_q A[n, q, p]                      one weight per patch
    context[n] = sum_p w[n, p] X[n, p]                  (mean over queries is linear)
    content[n] = mean_p X[n, p]   (or a g x g adaptive grid average)
    out[n]     = [context[n], content[n] ...]           (N, 1 + g*g, C)

Never materialised: the (N, Lq, P) attention and the (N, Lq, C) per-query product. The
kernels work per frame (scores of one frame in per-thread scratch on CPU, P blocks with an
online softmax on GPU), average the Lq softmax rows into one weight per patch, then make
one weighted sum over X that also yields the content token(s). Saved for backward: the
per-(frame, query) logsumexp ``lse`` (N, Lq) (float32; float64 for float64 inputs);
the backward recomputes the scores per frame.

Layers: Triton ``kernels/context_content_pool.py`` (CUDA) and C++
``csrc/context_content_pool.cpp`` (CPU) implement ``torch.ops.lvlm_fast.context_content_pool``
and its ``_backward``; this module owns the schema, validation, fake kernels and autograd.
"""

from __future__ import annotations

import math

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::context_content_pool"
BWD = "lvlm_fast::context_content_pool_backward"

torch.library.define(
    OP,
    "(Tensor x, Tensor queries, Tensor? keys, float scale, int content_grid) -> "
    "(Tensor out, Tensor lse)",
)
torch.library.define(
    BWD,
    "(Tensor grad_out, Tensor x, Tensor queries, Tensor? keys, float scale, int content_grid, "
    "Tensor lse) -> (Tensor grad_x, Tensor grad_queries, Tensor grad_keys)",
)


def _lse_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(OP)
def _fake_fwd(x, queries, keys, scale, content_grid):
    n, _, c = x.shape
    lq = queries.shape[-2]
    out = x.new_empty((n, 1 + content_grid * content_grid, c))
    lse = x.new_empty((n, lq), dtype=_lse_dtype(x))
    return out, lse


@torch.library.register_fake(BWD)
def _fake_bwd(grad_out, x, queries, keys, scale, content_grid, lse):
    gk = torch.empty_like(keys) if keys is not None else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(queries), gk


# --------------------------------------------------------------------------- CUDA (Triton)
@torch.library.impl(OP, "CUDA")
def _cuda_fwd(x, queries, keys, scale, content_grid):
    from lvlm_fast.kernels.context_content_pool import context_content_pool_fwd

    return context_content_pool_fwd(x, queries, keys, scale, content_grid)


@torch.library.impl(BWD, "CUDA")
def _cuda_bwd(grad_out, x, queries, keys, scale, content_grid, lse):
    from lvlm_fast.kernels.context_content_pool import context_content_pool_bwd

    return context_content_pool_bwd(grad_out, x, queries, keys, scale, content_grid, lse)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, queries, keys, scale, content_grid = inputs
    _, lse = output
    ctx.save_for_backward(x, queries, keys, lse)
    ctx.scale = scale
    ctx.content_grid = content_grid
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    # lse is a saved statistic, not a differentiable output.
    x, queries, keys, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    gx, gq, gk = torch.ops.lvlm_fast.context_content_pool_backward(
        grad_out.contiguous(), x, queries, keys, ctx.scale, ctx.content_grid, lse
    )
    return gx, gq, (gk if keys is not None else None), None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- CPU fallback
def reference_fwd(x, queries, keys, scale, content_grid):
    """Schema-shaped reference, used as the CPU kernel only if the C++ build is missing."""
    from lvlm_fast.reference.context_content_pool import context_content_pool as ref

    acc = _lse_dtype(x)
    k = x if keys is None else keys
    q = queries if queries.dim() == 3 else queries.unsqueeze(0).expand(x.shape[0], -1, -1)
    lse = torch.logsumexp((q.to(acc) @ k.to(acc).transpose(1, 2)) * scale, dim=-1)
    return ref(x, queries, keys, scale=scale, content_grid=content_grid), lse


def reference_bwd(grad_out, x, queries, keys, scale, content_grid, lse):
    """Backward by autograd through the reference (CPU fallback only)."""
    from lvlm_fast.reference.context_content_pool import context_content_pool as ref

    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in (x, queries, keys)]
    lx, lq, lk = leaves
    with torch.enable_grad():
        o = ref(lx, lq, lk, scale=scale, content_grid=content_grid)
        wrt = [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(o, wrt, grad_out, allow_unused=True))
    gx, gq = grads[0], grads[1]
    gk = grads[2] if keys is not None else x.new_empty((0,))
    return (torch.zeros_like(x) if gx is None else gx,
            torch.zeros_like(queries) if gq is None else gq,
            torch.zeros_like(keys) if (keys is not None and gk is None) else gk)


CPU_FALLBACKS = {
    "context_content_pool": reference_fwd,
    "context_content_pool_backward": reference_bwd,
}


# --------------------------------------------------------------------------- public API
def _validate(x, queries, keys, content_grid):
    v.check_tensor("x", x, 3)
    n, p, c = x.shape
    if n == 0 or p == 0 or c == 0:
        raise ValueError(f"x must be (N, P, C) with N, P, C >= 1, got shape {tuple(x.shape)}")
    v.check_tensor("queries", queries, (2, 3))
    if queries.shape[-2] == 0:
        raise ValueError(
            f"queries must hold Lq >= 1 queries per frame, got shape {tuple(queries.shape)}")
    if queries.dim() == 3:
        v.check_size("queries", queries, 0, n, "x.shape[0] (N frames)")
    if keys is not None:
        v.check_tensor("keys", keys, 3)
        v.check_size("keys", keys, 0, n, "x.shape[0] (N frames)")
        v.check_size("keys", keys, 1, p, "x.shape[1] (P patches)")
        ck = keys.shape[2]
        if ck == 0:
            raise ValueError(f"keys must have Ck >= 1 channels, got shape {tuple(keys.shape)}")
    else:
        ck = c
    v.check_size("queries", queries, queries.dim() - 1, ck,
                 "the channel dim of keys (or x when keys is None)")
    v.check_same("device", "x", x, queries=queries, keys=keys)
    v.check_same("dtype", "x", x, queries=queries, keys=keys)
    if isinstance(content_grid, bool) or not isinstance(content_grid, int):
        raise TypeError(f"content_grid must be an int >= 1, got {type(content_grid).__name__}")
    if content_grid < 1:
        raise ValueError(f"content_grid must be >= 1, got {content_grid}")
    if content_grid > 1 and math.isqrt(p) ** 2 != p:
        raise ValueError(
            f"content_grid = {content_grid} > 1 needs x.shape[1] (P patches) to be a square "
            f"sqrt(P) x sqrt(P) grid, got P = {p}")


def default_scale(queries: torch.Tensor) -> float:
    """1/sqrt(Ck), Ck = the query/key channel width (the released code's 1/sqrt(C))."""
    return 1.0 / math.sqrt(queries.shape[-1])


def context_content_pool(
    x: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    content_grid: int = 1,
) -> torch.Tensor:
    """LLaMA-VID context + content tokens for every frame, without the (N, Lq, P) attention.

    Args:
        x: patch features ``X`` (N, P, C): the values of the attention and the content.
        queries: text queries ``Q``, shared (Lq, Ck) or one set per frame (N, Lq, Ck).
            Lq = 0 is an error (no query, no context token).
        keys: ``K`` (N, P, Ck); None = ``x`` (Ck = C). LLaMA-VID's keys are ``x W_k + b``;
            :class:`lvlm_fast.nn.ContextContentPooling` folds ``W_k`` into the queries
            instead (the bias cancels in the softmax), so it calls this with keys=None.
        scale: score multiplier (a finite float); default ``1/sqrt(Ck)``. Not differentiable.
        content_grid: g = 1: one content token (mean over patches); g > 1: g x g tokens,
            adaptive average bins over the sqrt(P) x sqrt(P) grid (P must be a square;
            bins as ``adaptive_avg_pool2d``; row-major order).

    Returns:
        (N, 1 + g*g, C) in x's dtype: per frame the context token, then the content token(s).

    P = 1 gives context = content = X[:, 0]. Non-contiguous inputs are read through their
    strides (a strided channel dim is copied once). Gradients flow to x, queries (summed
    over frames when shared) and keys; ``scale`` gets none. NaN/inf inputs propagate to
    their frames. Accumulation is fp32 (fp64 for fp64 inputs, which on CUDA run the
    reference: there is no fp64 Triton path). Working memory beyond the outputs: the CPU
    kernel's per-thread scratch (P x Lq scores, (1 + g*g) x C accumulators, Lq x Ck packed
    queries; a 64 x Ck fp32 key copy for fp16/bf16), on CUDA an (N, P) fp32 weight vector.
    """
    if scale is None:
        scale = default_scale(queries) if isinstance(queries, torch.Tensor) else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _validate(x, queries, keys, content_grid)
    if keys is x:
        keys = None
    out, _ = torch.ops.lvlm_fast.context_content_pool(
        x, queries, keys, float(scale), int(content_grid))
    return out
