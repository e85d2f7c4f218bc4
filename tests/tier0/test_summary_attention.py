"""Tier 0: summary_attention C++ CPU kernel vs the reference (forward, backward, key mass),
GQA / head dims / bottom-right causal / strided cache views, opcheck, gradcheck, meta,
torch.compile, no cache copy, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import summary_attention
from lvlm_fast.reference import summary_attention as ref

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(b, hq, hkv, lq, s, d, dtype=torch.float32, cap_extra=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    # k/v are slices of a larger preallocated buffer; q is in transformers' (B, L, H, D) layout
    kbuf = torch.randn(b, hkv, s + cap_extra, d, generator=g).to(dtype)
    vbuf = torch.randn(b, hkv, s + cap_extra, d, generator=g).to(dtype)
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype).transpose(1, 2)
    return q, kbuf[:, :, :s], vbuf[:, :, :s]


def test_cpu_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lvlm_fast::summary_attention", "CPU")
    from lvlm_fast import _extension

    assert "summary_attention" not in " ".join(_extension.cpu_kernel_status()["errors"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "s"), [
    (1, 4, 2, 17, 40), (2, 3, 3, 1, 9), (1, 8, 1, 33, 33), (2, 6, 2, 5, 129),
])  # fmt: skip
def test_forward_and_key_mass(dtype, d, b, hq, hkv, lq, s):
    q, k, v = _inputs(b, hq, hkv, lq, s, d, dtype)
    out, mass = summary_attention(q, k, v, return_key_mass=True)
    r, rmass = ref(q, k, v, return_key_mass=True)
    tol = TOL[dtype]
    torch.testing.assert_close(out, r, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, rmass, atol=max(tol, 1e-5) * lq, rtol=tol)
    assert out.shape == (b, hq, lq, d) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    assert mass.dtype == torch.float32
    # each query distributes mass 1 over its keys, for every head
    torch.testing.assert_close(mass.sum(1), torch.full((b,), float(hq * lq)), rtol=1e-3, atol=0)


def test_bottom_right_rule_explicitly():
    # the last query sees every key; the first query sees exactly S - Lq + 1 keys
    q, k, v = _inputs(1, 2, 1, 4, 10, 64)
    v = torch.zeros_like(v)
    v[..., 6, :] = 1.0  # key 6 = S - Lq: visible to query 0 and later; key 7 only from query 1
    out = summary_attention(q, k, v)
    assert (out[0, :, 0] > 0).all()
    v2 = torch.zeros_like(v)
    v2[..., 7, :] = 1.0
    out2 = summary_attention(q, k, v2)
    assert (out2[0, :, 0] == 0).all() and (out2[0, :, 1] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("hq", "hkv", "lq", "s", "d"), [(4, 2, 7, 19, 80), (2, 2, 9, 9, 64)])
def test_backward_matches_reference(dtype, hq, hkv, lq, s, d):
    q, k, v = _inputs(2, hq, hkv, lq, s, d, dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    rleaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    go = torch.randn(2, hq, lq, d, dtype=dtype)
    summary_attention(*leaves, scale=0.3).backward(go)
    ref(*rleaves, scale=0.3).backward(go)
    for a, r in zip(leaves, rleaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad, atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


def test_backward_through_buffer_views():
    # training through a slice of the preallocated buffer: grads land in the buffer's rows
    kbuf = torch.randn(1, 2, 30, 64, dtype=torch.float64, requires_grad=True)
    vbuf = torch.randn(1, 2, 30, 64, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 4, 5, 64, dtype=torch.float64, requires_grad=True)
    summary_attention(q, kbuf[:, :, :12], vbuf[:, :, :12]).sum().backward()
    assert kbuf.grad[:, :, 12:].abs().sum() == 0 and kbuf.grad[:, :, :12].abs().sum() > 0


def test_gradcheck_fp64():
    q, k, v = (t.detach().requires_grad_(True) for t in _inputs(1, 4, 2, 5, 11, 64,
                                                                  torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: summary_attention(a, b, c), (q, k, v))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 3), g=st.integers(1, 3), lq=st.integers(1, 40),
    extra=st.integers(0, 60), d=st.sampled_from([64, 80, 96, 128]), seed=st.integers(0, 99),
)  # fmt: skip
def test_hypothesis_forward(b, hkv, g, lq, extra, d, seed):
    q, k, v = _inputs(b, hkv * g, hkv, lq, lq + extra, d, seed=seed)
    out, mass = summary_attention(q, k, v, return_key_mass=True)
    r, rmass = ref(q, k, v, return_key_mass=True)
    torch.testing.assert_close(out, r, atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(mass, rmass, atol=1e-4, rtol=1e-4)


def test_opcheck():
    q, k, v = _inputs(1, 4, 2, 6, 13, 64)
    for mass in (False, True):
        torch.library.opcheck(torch.ops.lvlm_fast.summary_attention.default,
                              (q, k, v, 0.125, mass))
    out, lse, _ = torch.ops.lvlm_fast.summary_attention(q, k, v, 0.125, False)
    go = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lvlm_fast.summary_attention_backward.default,
                          (go, q, k, v, out, lse, 0.125))
    qg = q.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.lvlm_fast.summary_attention.default,
                          (qg, k, v, 0.125, False))


def test_meta_shapes():
    q = torch.empty(1, 28, 1530, 128, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1, 4, 4000, 128, device="meta", dtype=torch.bfloat16)
    out, mass = summary_attention(q, k, k, return_key_mass=True)
    assert out.shape == (1, 28, 1530, 128) and out.device.type == "meta"
    assert mass.shape == (1, 4000) and mass.dtype == torch.float32


def test_torch_compile_fullgraph():
    q, k, v = _inputs(1, 4, 2, 6, 13, 64)

    def f(q, k, v):
        return summary_attention(q, k, v).sum(-1) * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    qg = q.detach().clone().requires_grad_(True)
    compiled(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_cache_is_not_copied():
    # a long cache, few queries: no allocation anywhere near the cache's size
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs(1, 8, 2, 16, 8192, 64, cap_extra=0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        summary_attention(q, k, v)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < k.nbytes // 4, (biggest, k.nbytes)


def test_scale_default():
    q, k, v = _inputs(1, 2, 2, 3, 5, 96)
    torch.testing.assert_close(summary_attention(q, k, v),
                               summary_attention(q, k, v, scale=1 / math.sqrt(96)))


BAD = [
    (dict(k=torch.randn(1, 3, 10, 64)), ValueError, ["k.shape[1]", "divide"]),
    (dict(k=torch.randn(1, 2, 3, 64)), ValueError, ["k.shape[2]", "Lq"]),
    (dict(q=torch.randn(1, 4, 5, 72), k=torch.randn(1, 2, 10, 72)), ValueError, ["head dim"]),
    (dict(v=torch.randn(1, 2, 9, 64)), ValueError, ["v must have k's shape"]),
    (dict(k=torch.randn(1, 2, 10, 64, dtype=torch.float64)), TypeError, ["k has dtype"]),
    (dict(q=torch.randn(4, 5, 64)), ValueError, ["q must be 4-D"]),
    (dict(k=[1, 2]), TypeError, ["k must be a torch.Tensor"]),
    (dict(q=torch.randn(1, 4, 5, 64, dtype=torch.float16)), TypeError, ["dtype"]),
    (dict(scale=-1.0), ValueError, ["scale"]),
    (dict(k=torch.randn(2, 2, 10, 64)), ValueError, ["k.shape[0]"]),
]


@pytest.mark.parametrize(("kw", "err", "words"), BAD)
def test_bad_input(kw, err, words):
    args = dict(q=torch.randn(1, 4, 5, 64), k=torch.randn(1, 2, 10, 64),
                v=torch.randn(1, 2, 10, 64), scale=None)
    if "k" in kw and "v" not in kw and isinstance(kw["k"], torch.Tensor):
        args["v"] = kw["k"].clone()
    args.update(kw)
    with pytest.raises(err) as e:
        summary_attention(args["q"], args["k"], args["v"], scale=args["scale"])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_raw_op_bad_heads_is_a_clear_error():
    with pytest.raises(RuntimeError, match="KV heads must divide"):
        torch.ops.lvlm_fast.summary_attention(torch.randn(1, 4, 5, 64),
                                              torch.randn(1, 3, 10, 64),
                                              torch.randn(1, 3, 10, 64), 0.1, False)
