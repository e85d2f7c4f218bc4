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


# --------------------------------------------------------------------------- issue 9.4 / 9.6
class _Recorder:
    """Stands in for a Triton kernel: records the launch's constexprs, launches nothing."""

    def __init__(self):
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)

        return launch


def _patch_kernels(monkeypatch):
    recs = {}
    for name in ("_summary_attention_fwd_kernel", "_summary_attention_bwd_kernel",
                 "_summary_attention_bwd_dq_kernel"):
        recs[name] = _Recorder()
        monkeypatch.setattr(kern, name, recs[name])
    return recs


def test_launcher_picks_int64_rows_at_600k_queries(monkeypatch):
    # issue 9.6: out is a (B, Hq, Lq, D) view of (B, Lq, Hq, D): its row stride is Hq * D,
    # so offs_m * stride passes 2^31 at ~600K query rows (Hq = 28, D = 128) while q, k and
    # v (contiguous per head) stay below. On the meta device (no memory, no launch) the
    # launcher must pick int64 row offsets there, and int32 at the usual sizes.
    recs = _patch_kernels(monkeypatch)
    lq = 600_000
    assert (lq - 1) * 28 * 128 + 128 >= 2**31 > lq * 128
    q = torch.empty(1, 28, lq, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 4, lq, 128, device="meta", dtype=torch.bfloat16)
    out, lse, _ = kern.summary_attention_fwd(q, k, k, 0.1, False)
    assert out.stride(2) == 28 * 128
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is True
    # a grad_out laid out like out (what autograd hands back for out's layout) likewise
    kern.summary_attention_bwd(out, q, k, k, out, lse, 0.1)
    assert recs["_summary_attention_bwd_kernel"].calls[-1]["I64"] is True
    assert recs["_summary_attention_bwd_dq_kernel"].calls[-1]["I64"] is True
    # the usual window (Lq = 1,530 queries over a 3,000-row cache): int32
    small_q = torch.empty(1, 28, 1530, 128, device="meta", dtype=torch.bfloat16)
    small_k = torch.empty(1, 4, 3000, 128, device="meta", dtype=torch.bfloat16)
    out, lse, _ = kern.summary_attention_fwd(small_q, small_k, small_k, 0.1, False)
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is False
    kern.summary_attention_bwd(small_q, small_q, small_k, small_k, out, lse, 0.1)
    assert recs["_summary_attention_bwd_kernel"].calls[-1]["I64"] is False


def test_launcher_picks_int64_for_a_huge_cache_stride(monkeypatch):
    # a k/v view into a cache whose row stride is huge (e.g. a (cap, Hkv*D) buffer viewed
    # per head): the span inside one head's slice, not the number of rows, decides
    recs = _patch_kernels(monkeypatch)
    q = torch.empty(1, 2, 4, 64, device="meta")
    kv = torch.empty(1, 2, 8, 64, device="meta").as_strided((1, 2, 8, 64), (0, 64, 2**29, 1))
    kern.summary_attention_fwd(q, kv, kv, 0.1, False)
    assert recs["_summary_attention_fwd_kernel"].calls[-1]["I64"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int64_row_path_matches_reference(monkeypatch, launched, dtype):
    # the int64 branch of every kernel, forced at a small size (the threshold lowered to 0),
    # computes what the int32 branch does
    monkeypatch.setattr(kern, "INT32_SPAN", 0)
    b, hq, hkv, lq, s, d = 1, 4, 2, 37, 101, 80
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, 0.1, True)
    qq, kk, vv = (t.double().requires_grad_(True) for t in (q, k, v))
    r, rmass = ref(qq, kk, vv, scale=0.1, return_key_mass=True)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=1e-4, rtol=1e-4)
    go = torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r.backward(go)
    grads = kern.summary_attention_bwd(go.to(dtype), q, k, v, out, lse, 0.1)
    for a, e in zip(grads, (qq.grad, kk.grad, vv.grad), strict=True):
        torch.testing.assert_close(a.double(), e, atol=tol * 4, rtol=tol * 4)
    assert launched and all(f.fn.__name__.startswith("_summary_attention") for f in launched)


def test_fp64_runs_the_reference_not_triton(monkeypatch):
    # issue 9.4: Triton rejects the fp64 kernels at compile time (the interpreter does not,
    # so this test pins the routing, and tier 2 pins the rejection): fp64 must never reach
    # a kernel, forward or backward, and must still give the reference's float64 result.
    recs = _patch_kernels(monkeypatch)
    q, k, v = _inputs(1, 4, 2, 9, 23, 64, torch.float64)
    out, lse, mass = kern.summary_attention_fwd(q, k, v, 0.125, True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.transpose(1, 2).is_contiguous()
    r, rmass = ref(q, k, v, scale=0.125, return_key_mass=True)
    torch.testing.assert_close(out, r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(mass, rmass.float())
    grads = kern.summary_attention_bwd(torch.ones_like(out), q, k, v, out, lse, 0.125)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all(g.dtype == torch.float64 for g in grads)
    assert not any(rec.calls for rec in recs.values())
