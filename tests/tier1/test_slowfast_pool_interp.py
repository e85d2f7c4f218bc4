"""Tier 1: slowfast_pool Triton launchers (forward and backward) in the interpreter vs the
schema-shaped reference (lvlm_fast.ops.slowfast_pool.reference_fwd / reference_bwd, which
tier 0 checks against autograd through the spec). fp32 and fp16 only; small shapes with
non-powers of two (27x27 grid, D = 80 and 19, ragged D blocks), T = 1, non-contiguous x."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import slowfast_pool as K

from lvlm_fast.ops.slowfast_pool import reference_bwd, reference_fwd

TOL = {torch.float32: 2e-6, torch.float16: 2e-3}


def _close(name, got, want, dtype):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g}"


def _check(x, idx, sep, sk, mode, fg, ff, order, dtype, launched):
    x = x.to(dtype)
    sep = sep.to(dtype) if sep is not None else None
    idx = torch.tensor(idx, dtype=torch.long)
    out, am = K.slowfast_pool_fwd(x, idx, sep, sk, mode, fg, ff, order, True)
    want, want_am = reference_fwd(x, idx, sep, sk, mode, fg, ff, order, True)
    _close("out", out, want, dtype)
    if mode == "max":
        assert torch.equal(am, want_am), "arg-max (first max in row-major order) differs"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    gx, gs = K.slowfast_pool_bwd(g, am, idx, list(x.shape), sep is not None, sk, mode, fg, ff,
                                 order)
    wgx, wgs = reference_bwd(g, want_am, idx, list(x.shape), sep is not None, sk, mode, fg, ff,
                             order)
    _close("grad_x", gx, wgx, dtype)
    if sep is not None:
        _close("grad_separator", gs, wgs, dtype)
    assert {type(f) for f in launched}, "no kernel was launched"
    for fn in launched:
        assert_interpreted(fn)
    names = {f.fn.__name__ for f in launched}
    assert names == {"_slowfast_pool_fwd_kernel", "_slowfast_pool_bwd_kernel"}, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_all_options(dtype, launched):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, 19, generator=gen)
    sep = torch.randn(19, generator=gen)
    _check(x, [0, 3], sep, (2, 2), "avg", (4, 3), "all", "slow_fast", dtype, launched)
    launched.clear()
    # released 1-D pairwise max, non-slow fast frames, interleaved, rounded values (ties)
    _check(x.round(), [1, 2], sep, (1, 2), "max", (3, 4), "non_slow", "interleaved", dtype,
           launched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_27x27_grid_d80(dtype, launched):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 27, 27, 80, generator=gen)
    # 3x3 max windows on 27x27, overlapping 4x4 fast bins; 80 channels -> a ragged D block
    _check(x.round(), [1], None, (3, 3), "max", (4, 4), "all", "slow_fast", dtype, launched)


def test_one_frame_non_contiguous(launched):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 10, 4, 24, generator=gen)
    x = base.transpose(1, 2)[..., ::2]  # (1, 4, 10, 12): transposed grid, channel stride 2
    assert not x.is_contiguous()
    sep = torch.randn(12, generator=gen)
    _check(x, [0], sep, (2, 5), "avg", (3, 4), "all", "interleaved", torch.float32, launched)


def test_no_slow_frames(launched):
    x = torch.randn(3, 5, 5, 16)
    _check(x, [], torch.randn(16), (1, 1), "max", (2, 3), "all", "slow_fast", torch.float32,
           launched)


def test_expanded_and_strided_inputs(launched):
    # issue 9.5 audit: frames broadcast over T (stride 0), a strided slow_index and a
    # strided separator are read through their strides (or copied by the launcher)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 6, 16, generator=gen).expand(3, 6, 6, 16)
    assert x.stride(0) == 0
    idx = torch.tensor([0, 9, 2, 9])[::2]  # [0, 2], stride 2
    sep = torch.randn(32, generator=gen)[::2]
    x = x.to(torch.float32)
    out, am = K.slowfast_pool_fwd(x, idx, sep, (2, 2), "max", (2, 3), "all", "slow_fast", True)
    want, want_am = reference_fwd(x.contiguous(), idx.contiguous(), sep.contiguous(), (2, 2),
                                  "max", (2, 3), "all", "slow_fast", True)
    _close("out", out, want, torch.float32)
    assert torch.equal(am, want_am)
    g = torch.randn(1, 16, generator=gen).expand(out.shape[0], 16)  # broadcast grad_out
    gx, gs = K.slowfast_pool_bwd(g, am, idx, list(x.shape), True, (2, 2), "max", (2, 3), "all",
                                 "slow_fast")
    wgx, wgs = reference_bwd(g.contiguous(), want_am, idx.contiguous(), list(x.shape), True,
                             (2, 2), "max", (2, 3), "all", "slow_fast")
    _close("grad_x", gx, wgx, torch.float32)
    _close("grad_separator", gs, wgs, torch.float32)
