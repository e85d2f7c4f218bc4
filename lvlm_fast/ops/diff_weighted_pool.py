"""``diff_weighted_pool``: ViLAMP's differential feature merging as one fused op.

Math (see :mod:`lvlm_fast.reference.diff_weighted_pool`, the spec)::

    s[n,p] = (cos(q[n], A[n,p]) - cos(R[ref[n],p], B[n,p])) / tau
    out[n] = sum_p softmax_p(s[n,:])[p] * X[n,p]

Layers: Triton ``kernels/diff_weighted_pool.py`` (CUDA) and C++ ``csrc/diff_weighted_pool.cpp``
(CPU) implement ``torch.ops.lvlm_fast.diff_weighted_pool`` and its ``_backward``; this
module owns the schema, input validation, fake (meta) kernels and autograd.

Conventions every kernel follows (tested in tests/tier0/test_diff_weighted_pool.py):

* ``cos(a, b) = a.b / (max(|a|, 1e-8) max(|b|, 1e-8))``: a zero vector has cosine 0, and its
  gradient drops the (constant) norm term, so zero vectors give finite outputs and grads.
* NaN policy: NaN is not checked for. A NaN in frame n's ``x``/``rel``/``red`` makes
  ``out[n]`` and ``lse[n]`` NaN and no other frame; a NaN in bank row k reaches exactly the
  frames with ``ref_index == k`` (frames with -1 never read the bank). A NaN in a shared
  ``query`` or in ``tau`` reaches every frame. In the backward, gradients of shared inputs
  (query, ref_bank rows, tau) sum over frames, so a NaN frame poisons them.
* ``lse`` (N,) is float32 for every input dtype (the contract shared with the Triton path);
  the backward rebuilds ``w = exp(s - lse)`` from it, so float64 gradients are accurate to
  ~1e-7 relative (fine for gradcheck), not to float64 precision.
* Gradients come back contiguous; ``grad_tau`` is 0-d float32 (autograd casts it to tau's
  dtype); ``grad_rel``/``grad_red`` are (0,) when those inputs are None. ``rel``/``red``
  passed to the raw op get their own gradient even if they alias ``x`` (autograd sums them);
  the public function maps ``rel is x`` to None so x is read once. ``red`` without a bank is
  never read (zero gradient; the public function rejects it).
* CPU backward reductions (grad_query, grad_tau) are summed in a fixed per-thread-block
  order: bitwise deterministic for a given ``torch.get_num_threads()``. The CPU backward is
  parallel over patches (the forward over frames), so P = 1 (or N = 1) runs on one thread.
"""

from __future__ import annotations

import torch

from lvlm_fast.ops import _validate as v

OP = "lvlm_fast::diff_weighted_pool"
BWD = "lvlm_fast::diff_weighted_pool_backward"

torch.library.define(
    OP,
    "(Tensor x, Tensor query, Tensor? ref_bank, Tensor? ref_index, Tensor? rel, Tensor? red, "
    "Tensor tau, bool return_weights) -> (Tensor out, Tensor weights, Tensor lse)",
)
torch.library.define(
    BWD,
    "(Tensor grad_out, Tensor x, Tensor query, Tensor? ref_bank, Tensor? ref_index, "
    "Tensor? rel, Tensor? red, Tensor tau, Tensor out, Tensor lse) -> "
    "(Tensor grad_x, Tensor grad_query, Tensor grad_ref_bank, Tensor grad_rel, "
    "Tensor grad_red, Tensor grad_tau)",
)


# --------------------------------------------------------------------------- fake kernels
@torch.library.register_fake(OP)
def _fake_fwd(x, query, ref_bank, ref_index, rel, red, tau, return_weights):
    n, p, d = x.shape
    out = x.new_empty((n, d))
    weights = x.new_empty((n, p) if return_weights else (0,))
    lse = x.new_empty((n,), dtype=torch.float32)
    return out, weights, lse


@torch.library.register_fake(BWD)
def _fake_bwd(grad_out, x, query, ref_bank, ref_index, rel, red, tau, out, lse):
    # Real kernels return fresh contiguous gradients (whatever the inputs' strides) and
    # grad_tau as a 0-d float32, so the fake must too (empty_like would copy strides/dtype).
    def like(t):
        return x.new_empty(t.shape, dtype=t.dtype)

    return (
        like(x),
        like(query),
        like(ref_bank) if ref_bank is not None else x.new_empty((0,)),
        like(rel) if rel is not None else x.new_empty((0,)),
        like(red) if red is not None else x.new_empty((0,)),
        x.new_empty((), dtype=torch.float32),
    )


# --------------------------------------------------------------------------- CUDA (Triton)
@torch.library.impl(OP, "CUDA")
def _cuda_fwd(x, query, ref_bank, ref_index, rel, red, tau, return_weights):
    from lvlm_fast.kernels.diff_weighted_pool import diff_weighted_pool_fwd

    return diff_weighted_pool_fwd(x, query, ref_bank, ref_index, rel, red, tau, return_weights)


@torch.library.impl(BWD, "CUDA")
def _cuda_bwd(grad_out, x, query, ref_bank, ref_index, rel, red, tau, out, lse):
    from lvlm_fast.kernels.diff_weighted_pool import diff_weighted_pool_bwd

    return diff_weighted_pool_bwd(grad_out, x, query, ref_bank, ref_index, rel, red, tau, out, lse)


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, query, ref_bank, ref_index, rel, red, tau, _ = inputs
    out, _, lse = output
    ctx.save_for_backward(x, query, ref_bank, ref_index, rel, red, tau, out, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_weights, _grad_lse):
    # The weights output is for inspection: gradients through it are not propagated.
    x, query, ref_bank, ref_index, rel, red, tau, out, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    gx, gq, gbank, grel, gred, gtau = torch.ops.lvlm_fast.diff_weighted_pool_backward(
        grad_out.contiguous(), x, query, ref_bank, ref_index, rel, red, tau, out, lse
    )
    return (
        gx,
        gq,
        gbank if ref_bank is not None else None,
        None,
        grel if rel is not None else None,
        gred if red is not None else None,
        gtau.to(tau.dtype),
        None,
    )


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- CPU fallback
def reference_fwd(x, query, ref_bank, ref_index, rel, red, tau, return_weights):
    """Schema-shaped reference, used as the CPU kernel only if the C++ build is missing."""
    from lvlm_fast.reference.diff_weighted_pool import cosine

    q = query if query.dim() == 2 else query.unsqueeze(0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    score = cosine(q.unsqueeze(1), x if rel is None else rel)
    if ref_bank is not None:
        bank = ref_bank[ref_index.clamp_min(0).long()]
        red_cos = cosine(bank, x if red is None else red)
        # where, not a 0/1 product: a NaN bank row must not reach frames with ref = -1.
        score = score - torch.where((ref_index >= 0).unsqueeze(1), red_cos, 0.0)
    score = score / tau.to(acc)
    lse = torch.logsumexp(score, dim=1)
    w = torch.exp(score - lse.unsqueeze(1))
    out = torch.einsum("np,npd->nd", w, x.to(acc)).to(x.dtype)
    weights = w.to(x.dtype) if return_weights else x.new_empty((0,))
    return out, weights, lse.float()


def reference_bwd(grad_out, x, query, ref_bank, ref_index, rel, red, tau, out, lse):
    """Backward by autograd through :func:`reference_fwd` (CPU fallback only)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in (x, query, ref_bank, rel, red, tau)]
    lx, lq, lbank, lrel, lred, ltau = leaves
    with torch.enable_grad():
        o, _, _ = reference_fwd(lx, lq, lbank, ref_index, lrel, lred, ltau, False)
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(o, wrt, grad_out, allow_unused=True)
    it = iter(grads)
    res = []
    for t in leaves:
        g = next(it) if t is not None else None
        if t is None:
            res.append(x.new_empty((0,)))
        else:
            res.append(torch.zeros_like(t) if g is None else g)
    gx, gq, gbank, grel, gred, gtau = res
    return gx, gq, gbank, grel, gred, gtau.float()


CPU_FALLBACKS = {"diff_weighted_pool": reference_fwd, "diff_weighted_pool_backward": reference_bwd}


# --------------------------------------------------------------------------- public API
def _validate(x, query, ref_bank, ref_index, rel, red, tau):
    v.check_tensor("x", x, 3)
    n, p, d = x.shape
    if n == 0 or p == 0 or d == 0:
        raise ValueError(f"x must have N, P, D >= 1, got shape {tuple(x.shape)}")
    if rel is not None:
        v.check_tensor("rel", rel, 3)
        v.check_size("rel", rel, 0, n, "x.shape[0] (N frames)")
        v.check_size("rel", rel, 1, p, "x.shape[1] (P patches)")
    da = d if rel is None else rel.shape[2]
    v.check_tensor("query", query, (1, 2))
    v.check_size("query", query, -1 + query.dim(), da, "the channel dim of rel (or x)")
    if query.dim() == 2 and query.shape[0] not in (1, n):
        raise ValueError(f"query must be (Da,), (1, Da) or (N={n}, Da), got {tuple(query.shape)}")
    if (ref_bank is None) != (ref_index is None):
        raise ValueError("ref_bank and ref_index must be given together (or both None)")
    if red is not None and ref_bank is None:
        raise ValueError("red was given but ref_bank is None: there is no redundancy term")
    if ref_bank is not None:
        if red is not None:
            v.check_tensor("red", red, 3)
            v.check_size("red", red, 0, n, "x.shape[0] (N frames)")
            v.check_size("red", red, 1, p, "x.shape[1] (P patches)")
        db = d if red is None else red.shape[2]
        v.check_tensor("ref_bank", ref_bank, 3)
        if ref_bank.shape[0] < 1:
            raise ValueError(f"ref_bank must hold K >= 1 frames, got shape {tuple(ref_bank.shape)}")
        v.check_size("ref_bank", ref_bank, 1, p, "x.shape[1] (P patches)")
        v.check_size("ref_bank", ref_bank, 2, db, "the channel dim of red (or x)")
        v.check_int_tensor("ref_index", ref_index, 1)
        v.check_size("ref_index", ref_index, 0, n, "x.shape[0] (N frames)")
    v.check_same("device", "x", x, query=query, ref_bank=ref_bank, ref_index=ref_index,
                 rel=rel, red=red, tau=tau)
    v.check_same("dtype", "x", x, query=query, ref_bank=ref_bank, rel=rel, red=red)
    if tau.dim() != 0 or not tau.is_floating_point():
        raise ValueError(f"tau must be a positive float or a 0-d float tensor, got {tau!r}")
    if ref_index is not None and v.value_checks_allowed(ref_index):
        k = ref_bank.shape[0]
        lo, hi = torch.aminmax(ref_index)  # one cheap reduction; locate the culprit only on error
        if int(lo) < -1 or int(hi) >= k:
            first = int(((ref_index < -1) | (ref_index >= k)).nonzero()[0, 0])
            raise ValueError(f"ref_index values must be in [-1, {k}) (K = ref_bank.shape[0]); "
                             f"ref_index[{first}] = {int(ref_index[first])}")
    if v.value_checks_allowed(tau) and not bool(tau > 0):
        raise ValueError(f"tau must be > 0, got {float(tau)}")


def diff_weighted_pool(
    x: torch.Tensor,
    query: torch.Tensor,
    ref_bank: torch.Tensor | None = None,
    ref_index: torch.Tensor | None = None,
    *,
    rel: torch.Tensor | None = None,
    red: torch.Tensor | None = None,
    tau: float | torch.Tensor = 1.0,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differential weighted pooling of each frame's patches to one token.

    Args:
        x: values ``X`` (N, P, D), pooled by the weights.
        query: ``q``, one vector (Da,) or one per frame (N, Da).
        ref_bank: reference frames ``R`` (K, P, Db), e.g. the K keyframes; None = no
            redundancy term.
        ref_index: (N,) int, row of ``ref_bank`` each frame compares with; -1 = none.
        rel: relevance features ``A`` (N, P, Da); default ``x``.
        red: redundancy features ``B`` (N, P, Db); default ``x``.
        tau: temperature > 0, a float or a 0-d tensor (which receives a gradient).
        return_weights: also return the softmax weights (N, P) (not differentiable).

    Returns:
        ``out`` (N, D) in x's dtype, or ``(out, weights)``.

    Zero vectors give cosine 0 (no NaN); NaN in any input propagates to the frames it
    touches. Non-contiguous inputs are read through their strides where the last dim is
    unit-stride. ``ref_index`` ranges are checked eagerly on CPU and with a device-side
    assert elsewhere (no host sync).
    """
    if not isinstance(tau, torch.Tensor):
        if not isinstance(tau, (int, float)) or isinstance(tau, bool):
            raise TypeError(f"tau must be a float or a 0-d tensor, got {type(tau).__name__}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        # torch.full, not torch.tensor: the value travels as an argument of a fill kernel
        # on x's device. torch.tensor(float, device=cuda) is a host-to-device copy (and a
        # stream sync) on every call, i.e. per chunk on the parameter-free ViLAMP path.
        tau = torch.full((), float(tau), dtype=torch.float32, device=x.device if isinstance(
            x, torch.Tensor) else "cpu")
    if rel is x:
        rel = None
    if red is x:
        red = None
    _validate(x, query, ref_bank, ref_index, rel, red, tau)
    if ref_index is not None and ref_index.device.type == "cuda":
        k = ref_bank.shape[0]
        torch._assert_async(((ref_index >= -1) & (ref_index < k)).all(),
                            "ref_index values must be in [-1, ref_bank.shape[0])")
    out, weights, _ = torch.ops.lvlm_fast.diff_weighted_pool(
        x, query, ref_bank, ref_index, rel, red, tau, return_weights
    )
    return (out, weights) if return_weights else out
