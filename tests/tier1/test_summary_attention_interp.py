"""Tier 1: summary_attention Triton kernels (fwd with key mass, dK/dV, dQ) in the
interpreter, on CPU tensors, vs the reference. fp32 and fp16; head dim 80, GQA,
non-power-of-two lengths, strided cache views, Lq = 1."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import summary_attention as kern

from lvlm_fast.reference import summary_attention as ref

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _inputs(b, hq, hkv, lq, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kbuf = torch.randn(b, hkv, s + 9, d, generator=g).to(dtype)
    vbuf = torch.randn(b, hkv, s + 9, d, generator=g).to(dtype)
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype).transpose(1, 2)
    return q, kbuf[:, :, :s], vbuf[:, :, :s]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "s", "d"), [
    (1, 4, 2, 37, 101, 80), (2, 2, 1, 1, 29, 64), (1, 3, 3, 70, 70, 96),
])  # fmt: skip
def test_forward_backward(launched, dtype, b, hq, hkv, lq, s, d):
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype)
    scale = 1 / math.sqrt(d)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, scale, True)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    r, rmass = ref(qq, kk, vv, return_key_mass=True)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=1e-4, rtol=1e-4)
    assert out.transpose(1, 2).is_contiguous()
    go = torch.randn(r.shape, dtype=torch.float64)
    r.backward(go)
    dq, dk, dv = kern.summary_attention_bwd(go.to(dtype), q, k, v, out, lse, scale)
    for a, e in ((dq, qq.grad), (dk, kk.grad), (dv, vv.grad)):
        torch.testing.assert_close(a.double(), e, atol=tol * 4, rtol=tol * 4)
    names = {f.fn.__name__ for f in launched}
    assert names == {"_summary_attention_fwd_kernel", "_summary_attention_bwd_kernel",
                     "_summary_attention_bwd_dq_kernel"}
    for f in launched:
        assert_interpreted(f)


def test_no_mass_leaves_empty(launched):
    q, k, v = _inputs(1, 2, 2, 5, 9, 64, torch.float32)
    out, _, mass = kern.summary_attention_fwd(q, k, v, 0.125, False)
    assert mass.numel() == 0
    torch.testing.assert_close(out, ref(q, k, v, scale=0.125), atol=2e-5, rtol=2e-5)
