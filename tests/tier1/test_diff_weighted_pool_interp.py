"""Tier 1: diff_weighted_pool Triton launchers (forward and backward) in the interpreter vs
the reference (autograd in float64 on the same rounded inputs). fp32 and fp16 only."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import diff_weighted_pool as K

from lvlm_fast.ops.diff_weighted_pool import reference_fwd
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_pool

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _close(name, got, want, dtype, tol=None):
    """max |got - want| <= tol * max|want| + tol * 1e-2: relative to the tensor's scale, with
    an absolute floor for tensors whose true value is ~0 (e.g. every score gradient at P=1)."""
    tol = TOL[dtype] if tol is None else tol
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale + tol * 1e-2, f"{name}: max err {err:.3g}, scale {scale:.3g}"


def _check(dtype, x, query, ref_bank=None, ref_index=None, rel=None, red=None, tau=0.5,
           return_weights=True, grad_out=None, seed=0):
    """Run the launchers and compare every output and gradient to the reference."""
    gen = torch.Generator().manual_seed(seed)
    cast = lambda t: None if t is None else t.to(dtype)
    x, query, ref_bank, rel, red = (cast(t) for t in (x, query, ref_bank, rel, red))
    tau_t = torch.tensor(tau, dtype=torch.float32)
    out, weights, lse = K.diff_weighted_pool_fwd(x, query, ref_bank, ref_index, rel, red, tau_t,
                                                 return_weights)
    n, p, d = x.shape
    if grad_out is None:
        grad_out = torch.randn(n, d, generator=gen).to(dtype)
    grads = K.diff_weighted_pool_bwd(grad_out, x, query, ref_bank, ref_index, rel, red, tau_t,
                                     out, lse)

    leaves = [None if t is None else t.detach().double().requires_grad_(True)
              for t in (x, query, ref_bank, rel, red)]
    ltau = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    lx, lq, lbank, lrel, lred = leaves
    o_ref, w_ref = ref_pool(lx, lq, lbank, ref_index, rel=lrel, red=lred, tau=ltau,
                            return_weights=True)
    with torch.no_grad():
        _, _, lse_ref = reference_fwd(lx, lq, lbank, ref_index, lrel, lred, ltau, False)
    names = ("x", "query", "ref_bank", "rel", "red", "tau")
    present = [(k, t) for k, t in zip(names, (*leaves, ltau), strict=True) if t is not None]
    got = torch.autograd.grad(o_ref, [t for _, t in present], grad_out.double(),
                              allow_unused=True)
    g_ref = {k: torch.zeros_like(t) if g is None else g
             for (k, t), g in zip(present, got, strict=True)}

    assert out.dtype == dtype and out.shape == (n, d)
    _close("out", out, o_ref, dtype)
    assert lse.dtype == torch.float32 and lse.shape == (n,)
    _close("lse", lse, lse_ref.to(torch.float64), dtype)
    if return_weights:
        assert weights.dtype == dtype and weights.shape == (n, p)
        _close("weights", weights, w_ref, dtype)
    else:
        assert weights.shape == (0,)

    gx, gq, gbank, grel, gred, gtau = grads
    assert gx.dtype == dtype and gq.dtype == dtype and gq.shape == query.shape
    _close("grad_x", gx, g_ref["x"], dtype)
    _close("grad_query", gq, g_ref["query"], dtype)
    for name, got, given in (("ref_bank", gbank, ref_bank), ("rel", grel, rel),
                             ("red", gred, red)):
        if given is None:
            assert got.shape == (0,), name
        else:
            assert got.dtype == dtype, name
            _close(f"grad_{name}", got, g_ref[name], dtype)
    assert gtau.dtype == torch.float32 and gtau.dim() == 0
    # grad_tau is a sum with cancellation (sum_p ds = 0) and uses delta = g.out with the
    # output rounded to x's dtype (as flash-attention backwards do): looser in fp16.
    _close("grad_tau", gtau, g_ref["tau"], dtype, tol=2e-2 if dtype == torch.float16 else None)
    return grads


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


DTYPES = [torch.float32, torch.float16]


# --------------------------------------------------------------------------- interpretation
def test_kernels_are_interpreted(launched):
    for fn in (K._diff_weighted_pool_fwd_kernel, K._diff_weighted_pool_bwd_kernel,
               K._diff_weighted_pool_bwd_query_kernel):
        assert_interpreted(fn)
    x, q = _rand(2, 5, 8), _rand(2, 8, seed=1)  # per-frame query: all three kernels run
    _check(torch.float32, x, q, _rand(1, 5, 8, seed=2), torch.tensor([0, -1]))
    assert [f.fn.__name__ for f in launched] == [
        "_diff_weighted_pool_fwd_kernel", "_diff_weighted_pool_bwd_kernel",
        "_diff_weighted_pool_bwd_query_kernel"]
    assert all(isinstance(f, type(K._diff_weighted_pool_fwd_kernel)) for f in launched)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_shared_query_with_minus_one(dtype):
    x = _rand(3, 13, 20)
    _check(dtype, x, _rand(20, seed=1), _rand(2, 13, 20, seed=2), torch.tensor([1, -1, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_grid_729_patches_head_dim_80(dtype):
    # 27x27 = 729 patches: many full BLOCK_P blocks and a ragged tail; D = 80 pads to 128.
    x = _rand(2, 729, 80)
    _check(dtype, x, _rand(1, 80, seed=1), _rand(2, 729, 80, seed=2),
           torch.tensor([1, 0], dtype=torch.int32), tau=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_frame_query_unsorted_refs_d96(dtype):
    # Unsorted ref_index revisits bank rows: grad_ref_bank is flushed (load+add+store)
    # more than once per row; -1 frames in between must not break a run.
    x = _rand(6, 49, 96)
    idx = torch.tensor([2, -1, 2, 0, 2, 0], dtype=torch.int64)
    _check(dtype, x, _rand(6, 96, seed=1), _rand(3, 49, 96, seed=2), idx, tau=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_frame_one_patch(dtype):
    x = _rand(1, 1, 80)
    grads = _check(dtype, x, _rand(80, seed=1), _rand(1, 1, 80, seed=2), torch.tensor([0]))
    # One patch: weight 1, out = x, no gradient reaches the scores.
    # (Not exactly 0: g.X and g.out are summed in different orders.)
    assert grads[1].abs().max() < 1e-4 and grads[2].abs().max() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_reference_bank(dtype):
    x = _rand(2, 30, 24)
    _check(dtype, x, _rand(24, seed=1), return_weights=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_separate_rel_and_red(dtype):
    n, p = 3, 37
    x, rel, red = _rand(n, p, 80), _rand(n, p, 48, seed=1), _rand(n, p, 72, seed=2)
    _check(dtype, x, _rand(48, seed=3), _rand(2, p, 72, seed=4), torch.tensor([0, 1, -1]),
           rel=rel, red=red, tau=0.25)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_frame", [False, True])
def test_wide_values_split_by_channels(launched, monkeypatch, dtype, per_frame):
    """Values wider than one launch (Qwen3-VL ViLAMP: 16,384 = main + 3 DeepStack levels,
    rel / red 4,096) run as launches over channel chunks: outputs and every gradient ==
    the reference. MAX_BLOCK_D / SPLIT_D are lowered so D = 100 splits into 16 + 16 + ...
    + 4 channels (a ragged last chunk), with split P too (N = 2)."""
    monkeypatch.setattr(K, "MAX_BLOCK_D", 64)
    monkeypatch.setattr(K, "SPLIT_D", 16)
    n, p = 2, 21
    x, rel, red = _rand(n, p, 100), _rand(n, p, 24, seed=1), _rand(n, p, 24, seed=2)
    q = _rand(n if per_frame else 1, 24, seed=3)
    _check(dtype, x, q, _rand(2, p, 24, seed=4), torch.tensor([1, -1]), rel=rel, red=red,
           tau=0.3)
    fwd = [f for f in launched if f.fn.__name__ == "_diff_weighted_pool_fwd_kernel"]
    assert len(fwd) == 7  # ceil(100 / 16) chunks, one forward launch each
    _check(dtype, x, q, None, None, rel=rel, tau=0.3, return_weights=False)  # no bank


def test_wide_values_read_by_the_weights_are_refused(monkeypatch):
    monkeypatch.setattr(K, "MAX_BLOCK_D", 64)
    x, q = _rand(2, 5, 100), _rand(1, 100, seed=1)
    with pytest.raises(ValueError, match="pass rel"):
        K.diff_weighted_pool_fwd(x, q, None, None, None, None, torch.tensor(0.5), False)
    with pytest.raises(ValueError, match="pass rel"):  # B = X still reads the values
        K.diff_weighted_pool_fwd(x, _rand(1, 8, seed=2), _rand(1, 5, 100), torch.tensor([0, 0]),
                                 _rand(2, 5, 8), None, torch.tensor(0.5), False)


@pytest.mark.parametrize("which", ["rel", "red"])
def test_only_one_of_rel_red(which):
    n, p, d = 2, 19, 40
    x, other = _rand(n, p, d), _rand(n, p, 24, seed=1)
    qd = 24 if which == "rel" else d
    bd = 24 if which == "red" else d
    _check(torch.float32, x, _rand(1, qd, seed=2), _rand(2, p, bd, seed=3),
           torch.tensor([1, 0]), **{which: other})


def test_strided_inputs():
    # Leading dims with padded strides (read through strides); a non-unit channel stride
    # (copied by the launcher); a non-contiguous grad_out.
    n, p, d = 3, 21, 40
    big = _rand(n + 1, p + 5, d + 8)
    x = big[1:, 2 : p + 2, :d]
    bank = _rand(2, d, p, seed=1).transpose(1, 2)  # channel stride != 1
    q = _rand(2, d, seed=2)[:, ::1][0]
    g = _rand(d, n, seed=3).t()
    assert x.stride() != x.contiguous().stride() and bank.stride(-1) != 1
    _check(torch.float32, x, q, bank, torch.tensor([1, 1, 0]), grad_out=g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_expanded_ref_index(dtype):
    # issue 9.5: a strided ref_index (idx[::2]) was read as if contiguous, so frames took
    # the wrong bank rows; the launcher now passes its stride (forward and backward).
    n, p, d = 4, 13, 24
    x, bank, q = _rand(n, p, d), _rand(3, p, d, seed=1), _rand(d, seed=2)
    idx = torch.tensor([2, 0, -1, 1, 0, 2, 1, 0])[::2]  # [2, -1, 0, 1]: stride 2
    assert idx.stride(0) == 2 and not torch.equal(idx, torch.tensor([2, 0, -1, 1]))
    _check(dtype, x, q, bank, idx)
    _check(dtype, x, q, bank, torch.tensor([1], dtype=torch.int32).expand(n))  # stride 0
    # the per-frame query and grad_out given as broadcast (stride-0) views
    _check(dtype, x, _rand(1, d, seed=3).expand(n, d), bank, idx,
           grad_out=_rand(1, d, seed=4).expand(n, d).to(dtype))


def test_zero_and_tiny_vectors_give_finite_results():
    x = _rand(2, 9, 16)
    x[0, 3] = 0.0  # zero patch: cosines 0
    x[1, 5] = 1e-10  # |a| below eps: the clamp is constant, the norm term must be dropped
    bank = _rand(1, 9, 16, seed=1)
    bank[0, 2] = 0.0
    bank[0, 4] = 3e-10
    _check(torch.float32, x, _rand(16, seed=2), bank, torch.tensor([0, 0]))
    _check(torch.float32, x, torch.zeros(16), bank, torch.tensor([0, -1]))  # zero query
    _check(torch.float32, x, _rand(2, 16, seed=3) * 1e-10, bank, torch.tensor([-1, 0]))


def test_small_tau_and_equal_scores():
    x = torch.ones(2, 11, 8)  # all-equal scores: uniform weights
    out, w, _ = K.diff_weighted_pool_fwd(x, torch.ones(8), None, None, None, None,
                                         torch.tensor(0.01), True)
    assert torch.allclose(w, torch.full_like(w, 1 / 11)) and torch.allclose(out, x[:, 0])
    _check(torch.float32, _rand(2, 11, 8), _rand(8, seed=1), _rand(1, 11, 8, seed=2),
           torch.tensor([0, 0]), tau=0.05)


def test_grad_ref_bank_unreferenced_rows_are_zero():
    x = _rand(4, 7, 12)
    grads = _check(torch.float32, x, _rand(12, seed=1), _rand(4, 7, 12, seed=2),
                   torch.tensor([3, 3, -1, 1]))
    assert torch.all(grads[2][0] == 0) and torch.all(grads[2][2] == 0)
    assert grads[2][3].abs().sum() > 0 and grads[2][1].abs().sum() > 0


def test_tau_tensor_dtype_and_no_weights():
    x = _rand(2, 6, 8)
    out64, _, _ = K.diff_weighted_pool_fwd(x, _rand(8, seed=1), None, None, None, None,
                                           torch.tensor(0.5, dtype=torch.float64), False)
    out32, w, _ = K.diff_weighted_pool_fwd(x, _rand(8, seed=1), None, None, None, None,
                                           torch.tensor(0.5), False)
    assert w.shape == (0,) and torch.equal(out64, out32)


# --------------------------------------------------------------------------- issue 14.2.5
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_n_splits_patches_and_merges(launched, dtype):
    # N = 3 frames of P = 203 patches: the forward splits P over 4 programs per frame (a
    # ragged last split) and merges the partials with their lse; == the reference
    g = torch.Generator().manual_seed(11)
    n, p, d = 3, 203, 40
    assert K.p_splits(n, p, K.fwd_config(64, False, False, True, p)[0], False)[0] == 4
    assert K.p_splits(n, p, 2, True) == (1, p)  # weights need the final lse in-kernel
    assert K.p_splits(300, p, 2, False) == (1, p)  # N fills the GPU
    x = torch.randn(n, p, d, generator=g)
    query = torch.randn(d, generator=g)
    bank = torch.randn(2, p, d, generator=g)
    idx = torch.tensor([-1, 0, 1])
    _check(dtype, x, query, bank, idx, return_weights=False)
    names = [f.fn.__name__ for f in launched]
    assert names[:2] == ["_diff_weighted_pool_fwd_kernel", "_lse_merge_kernel"], names
