"""``qformer_cross_attention``: fixed queries over a stream of frame tokens, K/V fused.

Math (spec: :mod:`lvlm_fast.reference.qformer_cross_attention`)::

    X[t, s] = F[t, s] + p[t];   K = X Wk^T + bk;   V = X Wv^T + bv
    out[:, h] = softmax_j(scale * q[:, h] . K[j, h]) V[j, h]        (heads of Dh = C / H)
    lse[h]    = logsumexp_j(scale * q[:, h] . K[j, h])

It is the cross-attention of Video-LLaMA's Video/Audio Q-Former (``lvlm_fast.nn.qformer``):
Lq = 32 (video) or 8 (audio) already-projected queries, frames (T, S = 32 tokens, E = 768)
for video or (T clips, S = 1, E = 1024) for audio.

Definitions:

* The K/V projection and the per-frame position row are computed tile by tile inside the
  kernel: no (T*S, C) K/V tensor and no (Lq, T*S) score matrix is ever materialised;
  memory is constant in T (CPU: chunks of ~4,096 keys; GPU: BLOCK_N-key tiles in registers).
* **Streaming: a partial/merge pair.** ``qformer_cross_attention(..., return_lse=True)``
  on one chunk of frames returns ``(out, lse)``; :func:`merge` combines two chunks'
  results exactly (log-sum-exp weights, the scores have no mask and no position term so
  key order does not matter). Both are differentiable, so a module can stream chunk by
  chunk and still train: the op's backward takes the gradient of ``lse`` too.
  Pass ``pos`` rows of the chunk's *global* frame indices.
* ``out`` (B, Lq, C) in q's dtype, heads concatenated (BERT layout); ``lse`` (B, H, Lq)
  fp32 (fp64 for fp64 inputs), natural log. Accumulation fp32 (fp64 for fp64).
* All inputs share one dtype and device. T >= 1 (a chunk with no frames has no result;
  start a merge from the first chunk).

Where it runs:

* CPU: C++ ``csrc/qformer_cross_attention.cpp``, forward and backward (ATen GEMMs on
  chunk tiles of ~4,096 keys, online softmax; the backward recomputes K, V, P per chunk).
* CUDA: Triton ``kernels/qformer_cross_attention.py``, forward and backward. Forward:
  split-KV flash kernel with the projection fused, partials merged by lse. Backward:
  ``_qformer_cross_attention_bwd_kernel`` per chunk of frames (K, V, P rebuilt in
  registers; dQ partials reduced in a fixed order; dK | dV to chunk-sized scratch), then
  cuBLAS GEMMs on that chunk for dframes, dpos, dWk, dbk, dWv, dbv.
* fp64 on CUDA, and CPU without the C++ build: the chunked torch paths below
  (:func:`chunked_forward`, :func:`chunked_backward`; memory constant in T too).
"""

from __future__ import annotations

import math

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::qformer_cross_attention"
BWD = "lvlm_fast::qformer_cross_attention_backward"

MAX_QUERIES = 64
MAX_HEAD_DIM = 128
CHUNK_KEYS = 4096  # keys per recompute chunk of the torch paths

torch.library.define(
    OP,
    "(Tensor q, Tensor frames, Tensor pos, Tensor wk, Tensor bk, Tensor wv, Tensor bv, "
    "int num_heads, float scale) -> (Tensor out, Tensor lse)",
)
torch.library.define(
    BWD,
    "(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor frames, Tensor pos, Tensor wk, "
    "Tensor bk, Tensor wv, Tensor bv, Tensor out, Tensor lse, int num_heads, float scale) -> "
    "(Tensor grad_q, Tensor grad_frames, Tensor grad_pos, Tensor grad_wk, Tensor grad_bk, "
    "Tensor grad_wv, Tensor grad_bv)",
)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(OP)
def _fake_fwd(q, frames, pos, wk, bk, wv, bv, num_heads, scale):
    b, lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, num_heads, lq), dtype=_acc(q))


@torch.library.register_fake(BWD)
def _fake_bwd(grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out, lse, num_heads, scale):
    return tuple(t.new_empty(t.shape) for t in (q, frames, pos, wk, bk, wv, bv))


# --------------------------------------------------------------------------- torch paths
def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(B, n, C) -> (B, H, n, Dh)."""
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def _chunk_kv(frames, pos, wk, bk, wv, bv, t0, t1, h, acc):
    b, e = frames.shape[0], frames.shape[3]
    x = (frames[:, t0:t1].to(acc) + pos[t0:t1].to(acc)[None, :, None]).reshape(b, -1, e)
    k = torch.addmm(bk.to(acc), x.reshape(-1, e), wk.to(acc).T).reshape(b, -1, wk.shape[0])
    vv = torch.addmm(bv.to(acc), x.reshape(-1, e), wv.to(acc).T).reshape(b, -1, wv.shape[0])
    return x, _heads(k, h), _heads(vv, h)


def _chunk(frames: torch.Tensor) -> int:
    return max(1, CHUNK_KEYS // max(1, frames.shape[0] * frames.shape[2]))


def chunked_forward(q, frames, pos, wk, bk, wv, bv, num_heads, scale):
    """Forward in torch ops, frames in chunks with an online softmax (CPU fallback when the
    C++ build is missing; fp64 on CUDA)."""
    acc = _acc(q)
    b, lq, c = q.shape
    qh = _heads(q.to(acc), num_heads) * scale
    m = torch.full((b, num_heads, lq, 1), float("-inf"), dtype=acc, device=q.device)
    l_ = torch.zeros_like(m)
    o = torch.zeros_like(qh)
    ct, t = _chunk(frames), frames.shape[1]
    for t0 in range(0, t, ct):
        _, kh, vh = _chunk_kv(frames, pos, wk, bk, wv, bv, t0, min(t, t0 + ct), num_heads, acc)
        s = qh @ kh.transpose(-1, -2)
        mn = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - mn)
        alpha = torch.exp(m - mn)
        l_ = l_ * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + p @ vh
        m = mn
    out = (o / l_).transpose(1, 2).reshape(b, lq, c).to(q.dtype)
    return out, (m + torch.log(l_)).squeeze(-1)


def chunked_backward(grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out, lse, num_heads,
                     scale):  # fmt: skip
    """Recompute-based backward in torch ops (CPU fallback when the C++ build is missing;
    fp64 on CUDA, which Triton's kernels reject): per chunk of frames, K, V and
    P = exp(scale q.K - lse) are recomputed; nothing T*S*C-sized is kept."""
    acc = _acc(q)
    b, lq, c = q.shape
    e = frames.shape[3]
    qs = _heads(q.to(acc), num_heads) * scale
    goh = _heads(grad_out.to(acc), num_heads)
    delta = (goh * _heads(out.to(acc), num_heads)).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)[..., None]
    lse_ = lse.to(acc)[..., None]
    dq = torch.zeros_like(qs)
    dwk = torch.zeros(wk.shape, dtype=acc, device=q.device)
    dwv = torch.zeros_like(dwk)
    dbk = torch.zeros(c, dtype=acc, device=q.device)
    dbv = torch.zeros_like(dbk)
    dframes = torch.empty(frames.shape, dtype=frames.dtype, device=frames.device)
    dpos = torch.empty(pos.shape, dtype=pos.dtype, device=pos.device)
    ct, t = _chunk(frames), frames.shape[1]
    for t0 in range(0, t, ct):
        t1 = min(t, t0 + ct)
        x, kh, vh = _chunk_kv(frames, pos, wk, bk, wv, bv, t0, t1, num_heads, acc)
        p = torch.exp(qs @ kh.transpose(-1, -2) - lse_)
        dvh = p.transpose(-1, -2) @ goh
        ds = p * (goh @ vh.transpose(-1, -2) - delta)
        dq += ds @ kh
        dk = (ds.transpose(-1, -2) @ qs).transpose(1, 2).reshape(-1, c)
        dv = dvh.transpose(1, 2).reshape(-1, c)
        x2 = x.reshape(-1, e)
        dx = torch.addmm(dk @ wk.to(acc), dv, wv.to(acc))
        dwk += dk.T @ x2
        dwv += dv.T @ x2
        dbk += dk.sum(0)
        dbv += dv.sum(0)
        dx4 = dx.reshape(b, t1 - t0, frames.shape[2], e)
        dframes[:, t0:t1] = dx4
        dpos[t0:t1] = dx4.sum((0, 2))
    dq = (dq * scale).transpose(1, 2).reshape(b, lq, c).to(q.dtype)
    return (dq, dframes, dpos, dwk.to(wk.dtype), dbk.to(bk.dtype), dwv.to(wv.dtype),
            dbv.to(bv.dtype))


CPU_FALLBACKS = {
    "qformer_cross_attention": chunked_forward,
    "qformer_cross_attention_backward": chunked_backward,
}


# --------------------------------------------------------------------------- CUDA
@torch.library.impl(OP, "CUDA")
def _cuda_fwd(q, frames, pos, wk, bk, wv, bv, num_heads, scale):
    from lvlm_fast.kernels.qformer_cross_attention import qformer_cross_attention_fwd

    return qformer_cross_attention_fwd(q, frames, pos, wk, bk, wv, bv, num_heads, scale)


@torch.library.impl(BWD, "CUDA")
def _cuda_bwd(grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out, lse, num_heads, scale):
    from lvlm_fast.kernels.qformer_cross_attention import qformer_cross_attention_bwd

    return qformer_cross_attention_bwd(grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out,
                                       lse, num_heads, scale)  # fmt: skip


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, frames, pos, wk, bk, wv, bv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, frames, pos, wk, bk, wv, bv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, frames, pos, wk, bk, wv, bv, out, lse = ctx.saved_tensors
    if grad_out is None and grad_lse is None:
        return (None,) * 9
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = torch.ops.lvlm_fast.qformer_cross_attention_backward(
        grad_out, grad_lse, q, frames, pos, wk, bk, wv, bv, out, lse, ctx.num_heads, ctx.scale
    )
    return (*grads, None, None)


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API
def _validate(q, frames, pos, wk, bk, wv, bv, num_heads):
    v.check_tensor("q", q, 3)
    v.check_tensor("frames", frames, 4)
    v.check_tensor("pos", pos, 2)
    for name, t in (("wk", wk), ("wv", wv)):
        v.check_tensor(name, t, 2)
    for name, t in (("bk", bk), ("bv", bv)):
        v.check_tensor(name, t, 1)
    b, lq, c = q.shape
    if b < 1 or not 1 <= lq <= MAX_QUERIES or c < 1:
        raise ValueError(
            f"q must be (B, Lq, C) with B >= 1 and 1 <= Lq <= {MAX_QUERIES} queries, "
            f"got shape {tuple(q.shape)}"
        )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise TypeError(f"num_heads must be a positive int, got {num_heads!r}")
    if c % num_heads != 0 or c // num_heads > MAX_HEAD_DIM:
        raise ValueError(
            f"num_heads ({num_heads}) must divide q.shape[2] (C = {c}) into heads of at most "
            f"{MAX_HEAD_DIM} channels"
        )
    _, t, s, e = frames.shape
    if t < 1 or s < 1 or e < 1:
        raise ValueError(
            f"frames must be (B, T, S, E) with T, S, E >= 1, got shape {tuple(frames.shape)}"
        )
    v.check_size("frames", frames, 0, b, "q.shape[0] (batch)")
    if tuple(pos.shape) != (t, e):
        raise ValueError(
            f"pos must be (T, E) = ({t}, {e}) (one position row per frame of this chunk), "
            f"got shape {tuple(pos.shape)}"
        )
    for name, w in (("wk", wk), ("wv", wv)):
        if tuple(w.shape) != (c, e):
            raise ValueError(
                f"{name} must be (C, E) = ({c}, {e}) (q's width x frames' width), "
                f"got shape {tuple(w.shape)}"
            )
    for name, bias in (("bk", bk), ("bv", bv)):
        if tuple(bias.shape) != (c,):
            raise ValueError(f"{name} must be (C,) = ({c},), got shape {tuple(bias.shape)}")
    v.check_same("device", "q", q, frames=frames, pos=pos, wk=wk, bk=bk, wv=wv, bv=bv)
    v.check_same("dtype", "q", q, frames=frames, pos=pos, wk=wk, bk=bk, wv=wv, bv=bv)


def qformer_cross_attention(
    q: torch.Tensor,
    frames: torch.Tensor,
    pos: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head cross-attention of fixed queries over frame tokens, K/V projection fused.

    Args:
        q: (B, Lq, C) already-projected queries, 1 <= Lq <= 64; or (Lq, C) unbatched.
        frames: (B, T, S, E) frame tokens (T >= 1 frames of S tokens); (T, S, E) unbatched.
        pos: (T, E) position row of each frame, added to all its tokens before the
            projection (pass the rows of the chunk's global frame indices when streaming).
        wk, wv: (C, E) key/value projection weights (``nn.Linear`` layout); bk, bv: (C,).
        num_heads: H, dividing C into heads of Dh = C / H <= 128.
        scale: score scale, default 1/sqrt(Dh).
        return_lse: also return lse (B, H, Lq), for :func:`merge` (streaming).

    Returns ``out`` (B, Lq, C) in q's dtype, or ``(out, lse)``.
    """
    unbatched = isinstance(q, torch.Tensor) and q.dim() == 2
    if unbatched:
        v.check_tensor("frames", frames, 3)
        q, frames = q.unsqueeze(0), frames.unsqueeze(0)
    _validate(q, frames, pos, wk, bk, wv, bv, num_heads)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2] // num_heads)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    out, lse = torch.ops.lvlm_fast.qformer_cross_attention(
        q, frames, pos, wk, bk, wv, bv, num_heads, float(scale)
    )
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine two partial results of :func:`qformer_cross_attention` over disjoint
    chunks of frames: ``out`` (B, Lq, C) / ``lse`` (B, H, Lq) (or unbatched (Lq, C) /
    (H, Lq)). Differentiable (plain torch ops). The merged ``out`` is in out_a's dtype:
    for fp16/bf16 streams keep partials in fp32 (run the op on fp32 q) to avoid rounding
    at every merge."""
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        v.check_tensor(name, t, (2, 3))
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"out_b/lse_b must have out_a/lse_a's shapes {tuple(out_a.shape)}/"
            f"{tuple(lse_a.shape)}, got {tuple(out_b.shape)}/{tuple(lse_b.shape)}"
        )
    unbatched = out_a.dim() == 2
    if unbatched:
        out_a, lse_a, out_b, lse_b = (t.unsqueeze(0) for t in (out_a, lse_a, out_b, lse_b))
    if out_a.dim() != 3 or lse_a.dim() != 3 or lse_a.shape[2] != out_a.shape[1] or (
        out_a.shape[2] % lse_a.shape[1] != 0
    ):
        raise ValueError(
            f"lse_a must be (B, H, Lq) for out_a (B, Lq, C = H * Dh), got "
            f"{tuple(lse_a.shape)} and {tuple(out_a.shape)}"
        )
    from lvlm_fast.reference.qformer_cross_attention import merge as _merge

    out, lse = _merge(out_a, lse_a, out_b, lse_b)
    return (out[0], lse[0]) if unbatched else (out, lse)
