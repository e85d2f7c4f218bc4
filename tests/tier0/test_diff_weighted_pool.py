"""Tier 0: the C++ CPU kernels of ``diff_weighted_pool`` against the plain-PyTorch reference.

Truth is the reference run in float64 on the same (already rounded) input values, so the
tolerances below measure only the kernel's accumulation and output rounding.
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401  (registers the ops, loads the C++ kernels)
from lvlm_fast import _extension
from lvlm_fast.ops import diff_weighted_pool as dwp
from lvlm_fast.reference.diff_weighted_pool import diff_weighted_pool as ref_dwp

OPMOD = sys.modules["lvlm_fast.ops.diff_weighted_pool"]
FWD = torch.ops.lvlm_fast.diff_weighted_pool
BWD = torch.ops.lvlm_fast.diff_weighted_pool_backward
GRAD_NAMES = ("x", "query", "ref_bank", "rel", "red")

# (out atol/rtol, grad tolerance relative to the largest reference gradient entry)
TOL = {
    torch.float32: (dict(atol=2e-6, rtol=2e-5), 2e-5),
    # fp64 forward is exact to ~1e-15; the backward rebuilds w from the float32 lse the
    # schema saves, so fp64 gradients are good to ~1e-7 relative (documented in the op).
    torch.float64: (dict(atol=1e-12, rtol=1e-12), 2e-6),
    torch.float16: (dict(atol=3e-3, rtol=3e-3), 1e-2),
    torch.bfloat16: (dict(atol=2e-2, rtol=2e-2), 4e-2),
}


# --------------------------------------------------------------------------- helpers
def make_inputs(
    n: int,
    p: int,
    d: int,
    *,
    k: int = 3,
    dtype: torch.dtype = torch.float32,
    rel: bool = False,
    red: bool = False,
    bank: bool = True,
    query: str = "shared",
    refs: list[int] | None = None,
    seed: int = 0,
) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    da = d + 3 if rel else d  # separate A/B get their own widths (Da != Db != D)
    db = max(1, d - 2) if red else d
    if query == "shared":
        q = rnd(da)
    elif query == "shared2d":
        q = rnd(1, da)
    else:
        q = rnd(n, da)
    if refs is None:
        refs = torch.randint(-1, k, (n,), generator=g).tolist()
    return {
        "x": rnd(n, p, d),
        "query": q,
        "ref_bank": rnd(k, p, db) if bank else None,
        "ref_index": torch.tensor(refs, dtype=torch.int64) if bank else None,
        "rel": rnd(n, p, da) if rel else None,
        "red": rnd(n, p, db) if (red and bank) else None,
    }


def _leaves(inp: dict, dtype: torch.dtype | None) -> dict:
    """Detached copies that require grad (cast to dtype if given); ref_index passes through."""
    out = {}
    for name, t in inp.items():
        if t is None or name == "ref_index":
            out[name] = t
        else:
            t = t.detach()
            out[name] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_(True)
    return out


def run_fused(inp: dict, tau: float, *, seed: int = 1):
    """Forward + backward through the public op; returns out, {name: grad}."""
    leaves = _leaves(inp, None)
    tau_t = torch.tensor(tau, dtype=torch.float32, requires_grad=True)
    out = dwp(**leaves, tau=tau_t)
    gout = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names] + [tau_t], gout.to(out.dtype))
    return out, dict(zip([*names, "tau"], grads, strict=True)), gout


def run_reference(inp: dict, tau: float, gout: torch.Tensor):
    leaves = _leaves(inp, torch.float64)
    tau_t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    out = ref_dwp(**leaves, tau=tau_t)
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names] + [tau_t], gout)
    return out, dict(zip([*names, "tau"], grads, strict=True))


def check_against_reference(inp: dict, tau: float, dtype: torch.dtype) -> None:
    out_tol, gtol = TOL[dtype]
    out, grads, gout = run_fused(inp, tau)
    # the reference sees the same rounded upstream gradient the kernel saw
    exp, exp_grads = run_reference(inp, tau, gout.to(dtype).double())
    assert out.dtype == dtype and out.shape == exp.shape
    torch.testing.assert_close(out.double(), exp, **out_tol)
    assert grads.keys() == exp_grads.keys()
    # Cancellation leaves rounding noise of the size of the cancelling terms, not of the
    # result: d cos/dq is exactly 0 when D = 1, and with a one-hot softmax ds = w (g.X - g.out)
    # is a difference of two O(|g||X|) numbers, scaled by 1/tau (1/tau^2 for tau's own grad).
    # So errors are measured against the largest gradient entry of any input, times 1/tau.
    # The gradient of cos(q, a) with respect to a is (q^ - cos a^) / |a|: its rounding noise
    # grows as 1/|a| for a short vector a (with D = 1 the true value is exactly 0 and a tiny
    # |a| leaves eps/|a| behind), so each row's allowance is scaled by how much shorter it
    # is than a typical row of its tensor.
    floor = max(max(g.abs().max().item() for g in exp_grads.values()), 1e-3)
    amp = 1.0 / min(tau, 1.0)
    for name, got in grads.items():
        want = exp_grads[name]
        assert got.shape == want.shape, name
        assert got.dtype == (torch.float32 if name == "tau" else dtype), name
        scale = max(want.abs().max().item(), floor) * (amp * amp if name == "tau" else amp)
        cond = _shortness(inp[name]) if name != "tau" else torch.ones(())
        err = (got.double() - want).abs()
        allowed = gtol * scale * cond + gtol * want.abs()
        bad = err > allowed
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} entries off, worst {float((err - allowed).max()):.3g} "
            f"past the allowance"
        )


def _shortness(t: torch.Tensor) -> torch.Tensor:
    """Per-entry factor max(1, median row norm / row norm) over the last dim (see above)."""
    norms = t.detach().double().norm(dim=-1, keepdim=True)
    typical = norms.flatten().median().clamp_min(1e-12)
    return (typical / norms.clamp_min(1e-12)).clamp_min(1.0).expand_as(t)


CONFIGS = {
    "base": dict(n=4, p=37, d=19),
    "one_frame": dict(n=1, p=5, d=8, k=1, refs=[0]),
    "one_patch": dict(n=5, p=1, d=9),
    "p729": dict(n=3, p=729, d=80, k=2),
    "d131": dict(n=3, p=49, d=131),
    "query_per_frame": dict(n=4, p=23, d=17, query="frame"),
    "query_1xD": dict(n=3, p=23, d=17, query="shared2d"),
    "rel": dict(n=3, p=21, d=13, rel=True),
    "red": dict(n=3, p=21, d=13, red=True),
    "rel_red_per_frame": dict(n=4, p=21, d=13, rel=True, red=True, query="frame"),
    "no_bank": dict(n=3, p=30, d=11, bank=False),
    "no_bank_rel": dict(n=3, p=30, d=11, bank=False, rel=True),
    "refs_all_minus1": dict(n=4, p=15, d=10, refs=[-1, -1, -1, -1]),
    "refs_one_row": dict(n=5, p=15, d=10, k=2, refs=[1, 1, 1, 1, 1]),
    "refs_unsorted": dict(n=8, p=19, d=12, refs=[2, -1, 0, 2, 2, -1, 1, 0]),
}


# --------------------------------------------------------------------------- kernel identity
def test_cpu_kernel_is_the_cpp_one():
    status = _extension.cpu_kernel_status()
    assert not any("diff_weighted_pool" in e for e in status["errors"]), status
    for op in ("diff_weighted_pool", "diff_weighted_pool_backward"):
        dump = torch._C._dispatch_dump(f"lvlm_fast::{op}")
        cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        # the Python fallback would be a boxed kernel registered from torch/library.py
        assert "diff_weighted_pool.cpp" in cpu and "unboxed" in cpu, cpu


# --------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_matches_reference(cfg, dtype):
    check_against_reference(make_inputs(**CONFIGS[cfg], dtype=dtype), 0.5, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "cfg", ["base", "p729", "query_per_frame", "rel_red_per_frame", "no_bank", "refs_unsorted"]
)
def test_matches_reference_low_precision(cfg, dtype):
    check_against_reference(make_inputs(**CONFIGS[cfg], dtype=dtype), 0.5, dtype)


def test_sharp_temperature_fp32():
    # ViLAMP's initial tau = 0.01: scores span ~200, softmax is nearly one-hot
    check_against_reference(make_inputs(4, 64, 24, k=2, refs=[0, 0, 1, -1]), 0.01, torch.float32)


def test_weights_and_lse():
    inp = make_inputs(4, 37, 19)
    tau = torch.tensor(0.3)
    out, w, lse = FWD(
        inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"], None, None, tau, True
    )
    exp_out, exp_w = ref_dwp(
        **{k: v.double() if v is not None and v.is_floating_point() else v for k, v in inp.items()},
        tau=0.3,
        return_weights=True,
    )
    assert w.shape == (4, 37) and w.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(w.double(), exp_w, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(w.sum(1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), exp_out, atol=2e-6, rtol=2e-5)
    # lse = logsumexp of the scores: recover the scores from the weights
    s = torch.log(exp_w) + lse.double().unsqueeze(1)
    torch.testing.assert_close(torch.logsumexp(s, 1), lse.double(), atol=1e-5, rtol=0)
    _, w_none, _ = FWD(
        inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"], None, None, tau, False
    )
    assert w_none.shape == (0,)
    out2, w2 = dwp(
        inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"], tau=0.3, return_weights=True
    )
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(w2, w, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_dtype(dtype):
    inp = make_inputs(3, 10, 8, dtype=dtype)
    out, w = dwp(**inp, tau=0.5, return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype and w.shape == (3, 10)
    _, exp_w = ref_dwp(
        **{k: v.double() if v is not None and v.is_floating_point() else v for k, v in inp.items()},
        tau=0.5,
        return_weights=True,
    )
    torch.testing.assert_close(w.double(), exp_w, **TOL[dtype][0])


def test_tau_forms():
    inp = make_inputs(4, 20, 10)
    a = dwp(**inp, tau=0.25)
    b = dwp(**inp, tau=torch.tensor(0.25))
    c = dwp(**inp, tau=torch.tensor(0.25, dtype=torch.float64))
    d_ = dwp(**inp, tau=torch.tensor(0.25, dtype=torch.bfloat16))  # exactly representable
    for t in (b, c, d_):
        torch.testing.assert_close(t, a, atol=0, rtol=0)
    # tau tensor with grad, float64 tau with float32 inputs: grad comes back in tau's dtype
    tau = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    out = dwp(**inp, tau=tau)
    (g,) = torch.autograd.grad(out.sum(), tau)
    assert g.dtype == torch.float64 and g.shape == ()
    tau_r = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    exp = ref_dwp(
        **{k: v.double() if v is not None and v.is_floating_point() else v for k, v in inp.items()},
        tau=tau_r,
    )
    (g_r,) = torch.autograd.grad(exp.sum(), tau_r)
    torch.testing.assert_close(g, g_r, atol=1e-5 * max(1.0, g_r.abs().item()), rtol=1e-4)


def test_python_float_tau_makes_no_host_tensor(monkeypatch):
    # issue 9.13: a float tau was turned into torch.tensor(float(tau), device=x.device), a
    # host-to-device copy (and sync) on every CUDA call; the wrapper now fills a 0-d tensor
    # on x's device (no host tensor, no copy). torch.tensor must not be reached at all.
    from torch.utils._python_dispatch import TorchDispatchMode

    inp = make_inputs(3, 10, 8)
    want = dwp(**inp, tau=torch.tensor(0.25))
    seen = []

    class Spy(TorchDispatchMode):  # records the tau the registered op receives
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.lvlm_fast.diff_weighted_pool.default:
                seen.append(args[6])
            return func(*args, **(kwargs or {}))

    def boom(*a, **k):
        raise AssertionError("torch.tensor called for a float tau")

    monkeypatch.setattr(torch, "tensor", boom)
    with Spy():
        got = dwp(**inp, tau=0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    (tau,) = seen
    assert tau.dim() == 0 and tau.dtype == torch.float32 and float(tau) == 0.25
    # on the meta device (standing in for CUDA) the tau tensor is made on x's device
    seen.clear()
    with Spy():
        dwp(torch.empty(2, 5, 8, device="meta"), torch.empty(8, device="meta"), tau=0.5)
    assert seen[0].device.type == "meta"


def test_rel_red_equal_to_x_is_the_same_as_none():
    inp = make_inputs(3, 20, 10)
    a = dwp(**inp, tau=0.5)
    b = dwp(**{**inp, "rel": inp["x"], "red": inp["x"]}, tau=0.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # through the raw op rel=x is an input of its own: x's grad splits, the sum is the same
    x = inp["x"].clone().requires_grad_(True)
    out, _, _ = FWD(
        x, inp["query"], inp["ref_bank"], inp["ref_index"], x, x, torch.tensor(0.5), False
    )
    (gx_alias,) = torch.autograd.grad(out.sum(), x)
    x2 = inp["x"].clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(
        dwp(x2, inp["query"], inp["ref_bank"], inp["ref_index"], tau=0.5).sum(), x2
    )
    torch.testing.assert_close(gx_alias, gx, atol=1e-6, rtol=1e-5)


def test_ref_index_int32_equals_int64():
    inp = make_inputs(6, 20, 10)
    a = dwp(**inp, tau=0.5)
    b = dwp(**{**inp, "ref_index": inp["ref_index"].int()}, tau=0.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_backward_deterministic_and_thread_count():
    inp = make_inputs(6, 45, 16, query="frame", rel=True, red=True, refs=[0, 1, -1, 0, 2, 0])
    _, g1, _ = run_fused(inp, 0.4)
    _, g2, _ = run_fused(inp, 0.4)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k  # bitwise: block-ordered reduction, no atomics
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, g3, _ = run_fused(inp, 0.4)
    finally:
        torch.set_num_threads(old)
    for k in g1:
        torch.testing.assert_close(g3[k], g1[k], atol=1e-6, rtol=1e-5, msg=k)


# --------------------------------------------------------------------------- strides
def _restride(t: torch.Tensor, how: str) -> torch.Tensor:
    """Same values, different memory layout."""
    if how == "transposed":  # leading dims swapped in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "big_strides":  # every 3rd frame / 2nd patch of a wider, longer buffer
        shape = list(t.shape)
        big = torch.zeros(
            [shape[0] * 3, *([shape[1] * 2] if t.dim() == 3 else []), shape[-1] + 5], dtype=t.dtype
        )
        view = big[::3, ::2, : shape[-1]] if t.dim() == 3 else big[::3, : shape[-1]]
        view.copy_(t)
        return view
    if how == "last_dim_strided":  # channel stride 2: the kernel copies this once
        big = torch.zeros([*t.shape[:-1], t.shape[-1] * 2], dtype=t.dtype)
        view = big[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(how)


@pytest.mark.parametrize("how", ["transposed", "big_strides", "last_dim_strided"])
@pytest.mark.parametrize("cfg", ["base", "rel_red_per_frame"])
def test_non_contiguous_inputs(cfg, how):
    inp = make_inputs(**CONFIGS[cfg])
    nc = {}
    for name, t in inp.items():
        if t is None:
            nc[name] = None
        elif name == "ref_index":
            buf = torch.full((2 * t.numel(),), 7, dtype=t.dtype)
            buf[::2] = t
            nc[name] = buf[::2]
        elif t.dim() == 1:
            buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
            buf[::2] = t
            nc[name] = buf[::2]
        elif t.dim() == 2 and how == "transposed":
            nc[name] = t.t().contiguous().t()
        else:
            nc[name] = _restride(t, how)
        if nc[name] is not None:
            assert torch.equal(nc[name], t)
    assert not nc["x"].is_contiguous()
    out, grads, _ = run_fused(inp, 0.5)
    out_nc, grads_nc, _ = run_fused(nc, 0.5)
    torch.testing.assert_close(out_nc, out, atol=1e-6, rtol=1e-5)
    for k in grads:
        assert grads_nc[k].shape == grads[k].shape
        torch.testing.assert_close(grads_nc[k], grads[k], atol=1e-6, rtol=1e-5, msg=k)
    exp, _ = run_reference(inp, 0.5, torch.zeros(out.shape, dtype=torch.float64))
    torch.testing.assert_close(out_nc.double(), exp, atol=2e-6, rtol=2e-5)


def test_expanded_query_and_bank():
    # stride-0 leading dims (expand) are read in place
    inp = make_inputs(4, 12, 9, query="frame")
    q_exp = inp["query"][:1].expand(4, -1)
    bank_exp = inp["ref_bank"][:1].expand(3, -1, -1)
    a = dwp(inp["x"], q_exp, bank_exp, inp["ref_index"], tau=0.5)
    b = dwp(inp["x"], q_exp.contiguous(), bank_exp.contiguous(), inp["ref_index"], tau=0.5)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------- property test
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    p=st.integers(1, 40),
    d=st.integers(1, 37),
    k=st.integers(1, 3),
    rel=st.booleans(),
    red=st.booleans(),
    bank=st.booleans(),
    query=st.sampled_from(["shared", "shared2d", "frame"]),
    tau=st.sampled_from([0.05, 0.3, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(n, p, d, k, rel, red, bank, query, tau, seed):
    inp = make_inputs(n, p, d, k=k, rel=rel, red=red, bank=bank, query=query, seed=seed)
    check_against_reference(inp, tau, torch.float32)


# --------------------------------------------------------------------------- torch.library
def _op_args(inp: dict, tau: torch.Tensor, return_weights: bool) -> tuple:
    return (
        inp["x"],
        inp["query"],
        inp["ref_bank"],
        inp["ref_index"],
        inp["rel"],
        inp["red"],
        tau,
        return_weights,
    )


@pytest.mark.parametrize("cfg", ["base", "rel_red_per_frame", "no_bank", "query_1xD"])
def test_opcheck_forward(cfg):
    inp = _leaves(make_inputs(**CONFIGS[cfg]), None)
    tau = torch.tensor(0.5, requires_grad=True)
    for rw in (False, True):
        torch.library.opcheck(FWD.default, _op_args(inp, tau, rw))


@pytest.mark.parametrize("cfg", ["base", "rel_red_per_frame", "no_bank"])
def test_opcheck_backward(cfg):
    inp = make_inputs(**CONFIGS[cfg])
    tau = torch.tensor(0.5)
    out, _, lse = FWD(*_op_args(inp, tau, False))
    gout = torch.randn_like(out)
    args = (
        gout,
        inp["x"],
        inp["query"],
        inp["ref_bank"],
        inp["ref_index"],
        inp["rel"],
        inp["red"],
        tau,
        out,
        lse,
    )
    torch.library.opcheck(BWD.default, args)
    # the fake kernel must agree with the real one on every output's shape, dtype and strides
    real = BWD(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = BWD(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())


@pytest.mark.parametrize(
    "cfg",
    [
        dict(n=3, p=5, d=4),
        dict(n=3, p=4, d=3, rel=True, red=True, query="frame", refs=[1, -1, 1]),
        dict(n=2, p=3, d=5, bank=False, query="shared2d"),
    ],
)
def test_gradcheck_fp64(cfg):
    inp = make_inputs(**cfg, dtype=torch.float64)
    names = [k for k in GRAD_NAMES if inp[k] is not None]
    leaves = [inp[k].clone().requires_grad_(True) for k in names]
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        kw = dict(zip(names, args[:-1], strict=True))
        return dwp(
            kw.pop("x"),
            kw.pop("query"),
            kw.pop("ref_bank", None),
            inp["ref_index"],
            tau=args[-1],
            **kw,
        )

    assert torch.autograd.gradcheck(fn, (*leaves, tau), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_meta_shapes():
    n, p, d, k = 5, 7, 6, 2
    m = dict(device="meta")
    x = torch.empty(n, p, d, **m)
    q = torch.empty(n, d + 1, **m)
    rel = torch.empty(n, p, d + 1, **m)
    red = torch.empty(n, p, d - 1, **m)
    bank = torch.empty(k, p, d - 1, **m)
    ri = torch.empty(n, dtype=torch.int64, **m)
    tau = torch.empty((), **m)
    out, w = dwp(x, q, bank, ri, rel=rel, red=red, tau=tau, return_weights=True)
    assert out.device.type == "meta" and out.shape == (n, d) and w.shape == (n, p)
    out, w, lse = FWD(x, q, bank, ri, rel, red, tau, False)
    assert w.shape == (0,) and lse.shape == (n,) and lse.dtype == torch.float32
    grads = BWD(torch.empty(n, d, **m), x, q, bank, ri, rel, red, tau, out, lse)
    assert [tuple(g.shape) for g in grads] == [
        (n, p, d),
        (n, d + 1),
        (k, p, d - 1),
        (n, p, d + 1),
        (n, p, d - 1),
        (),
    ]
    assert grads[-1].dtype == torch.float32
    out = dwp(
        torch.empty(n, p, d, dtype=torch.bfloat16, **m),
        torch.empty(d, dtype=torch.bfloat16, **m),
        tau=0.5,
    )
    assert out.shape == (n, d) and out.dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inp = make_inputs(4, 30, 12, rel=True, query="frame")

    def fn(x, q, bank, ri, rel, tau):
        out, w = dwp(x, q, bank, ri, rel=rel, tau=tau, return_weights=True)
        return out * 2 + 1, w

    compiled = torch.compile(fn, fullgraph=True)
    tau = torch.tensor(0.4)
    args = (inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"], inp["rel"], tau)
    eager = fn(*args)
    got = compiled(*args)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # backward through the compiled graph
    leaves = [t.clone().requires_grad_(True) for t in (inp["x"], inp["query"], inp["ref_bank"])]
    out, _ = compiled(leaves[0], leaves[1], leaves[2], inp["ref_index"], inp["rel"], tau)
    g_c = torch.autograd.grad(out.sum(), leaves)
    leaves_e = [t.clone().requires_grad_(True) for t in (inp["x"], inp["query"], inp["ref_bank"])]
    out_e, _ = fn(leaves_e[0], leaves_e[1], leaves_e[2], inp["ref_index"], inp["rel"], tau)
    g_e = torch.autograd.grad(out_e.sum(), leaves_e)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_torch_compile_python_float_tau():
    torch._dynamo.reset()
    inp = make_inputs(3, 10, 8)

    def fn(x, q, bank, ri):
        return dwp(x, q, bank, ri, tau=0.25)

    got = torch.compile(fn, fullgraph=True)(
        inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"]
    )
    torch.testing.assert_close(
        got, fn(inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"]), atol=1e-6, rtol=1e-5
    )


# --------------------------------------------------------------------------- degenerate inputs
def test_all_equal_scores_give_uniform_weights():
    g = torch.Generator().manual_seed(3)
    n, p, d = 3, 11, 7
    # identical patches within each frame: every score of a frame is the same
    x = torch.randn(n, 1, d, generator=g).expand(n, p, d).contiguous()
    bank = torch.randn(2, 1, d, generator=g).expand(2, p, d).contiguous()
    out, w = dwp(
        x, torch.randn(d, generator=g), bank, torch.tensor([0, -1, 1]), tau=0.1, return_weights=True
    )
    torch.testing.assert_close(w, torch.full((n, p), 1.0 / p), atol=1e-7, rtol=0)
    torch.testing.assert_close(out, x.mean(1), atol=1e-6, rtol=1e-6)
    # zero query and no bank: cos = 0 everywhere, also uniform (with distinct patches)
    x = torch.randn(n, p, d, generator=g)
    out, w = dwp(x, torch.zeros(d), tau=0.01, return_weights=True)
    torch.testing.assert_close(w, torch.full((n, p), 1.0 / p), atol=1e-7, rtol=0)
    torch.testing.assert_close(out, x.mean(1), atol=1e-6, rtol=1e-6)


def test_one_patch_returns_the_patch():
    inp = make_inputs(4, 1, 9)
    out, w = dwp(**inp, tau=0.05, return_weights=True)
    torch.testing.assert_close(w, torch.ones(4, 1), atol=0, rtol=0)
    torch.testing.assert_close(out, inp["x"][:, 0], atol=0, rtol=0)


def test_zero_vectors_are_finite():
    inp = make_inputs(4, 9, 6, rel=True, red=True, query="frame", refs=[0, 1, -1, 0])
    inp["x"][0, :3] = 0  # zero value rows
    inp["rel"][1, 2] = 0  # zero A row
    inp["red"][0, 4] = 0  # zero B row
    inp["ref_bank"][0, 5] = 0  # zero R row
    inp["query"][2] = 0  # zero query vector
    out, grads, _ = run_fused(inp, 0.3)
    assert torch.isfinite(out).all()
    for k, gr in grads.items():
        assert torch.isfinite(gr).all(), k
    check_against_reference(inp, 0.3, torch.float32)
    # the all-A = B = X case, a whole zero frame
    inp = make_inputs(3, 5, 4)
    inp["x"][1] = 0
    inp["ref_bank"][:] = 0
    check_against_reference(inp, 0.3, torch.float32)


def test_nan_propagates_to_affected_frames_only():
    """NaN policy (documented in lvlm_fast.ops.diff_weighted_pool): a NaN in frame n's x/rel/
    red poisons out[n] and lse[n] only; a NaN in bank row k poisons exactly the frames with
    ref_index == k; frames with ref_index = -1 never read the bank."""
    inp = make_inputs(6, 12, 8, rel=True, refs=[1, -1, 0, 1, 2, -1])
    tau = torch.tensor(0.5)
    clean_out, _, clean_lse = FWD(*_op_args(inp, tau, False))

    def check(mutated: dict, bad: set[int]):
        out, _, lse = FWD(*_op_args(mutated, tau, False))
        exp = ref_dwp(**mutated, tau=0.5)
        for i in range(6):
            if i in bad:
                assert torch.isnan(out[i]).all() and torch.isnan(lse[i]), i
                assert torch.isnan(exp[i]).all(), i
            else:
                assert torch.equal(out[i], clean_out[i]) and torch.equal(lse[i], clean_lse[i]), i

    x = inp["x"].clone()
    x[2, 3, 0] = float("nan")
    check({**inp, "x": x}, {2})
    rel = inp["rel"].clone()
    rel[4, 0, 1] = float("nan")
    check({**inp, "rel": rel}, {4})
    bank = inp["ref_bank"].clone()
    bank[1, 5, 2] = float("nan")
    check({**inp, "ref_bank": bank}, {0, 3})
    bank = inp["ref_bank"].clone()
    bank[0, 0, 0] = float("nan")  # row 0 is also what the reference gathers for ref = -1
    check({**inp, "ref_bank": bank}, {2})


# --------------------------------------------------------------------------- bad inputs
def _bad_cases():
    n, p, d, k = 4, 6, 5, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, d, generator=g)
    base = dict(
        x=x,
        query=torch.randn(d, generator=g),
        ref_bank=torch.randn(k, p, d, generator=g),
        ref_index=torch.tensor([0, 1, -1, 2]),
        rel=None,
        red=None,
        tau=0.5,
    )
    meta = "meta"
    cases = {
        "x_rank": (dict(x=x[0]), ValueError, "x"),
        "x_int": (dict(x=x.long()), TypeError, "x"),
        "x_not_tensor": (dict(x=x.tolist()), TypeError, "x"),
        "x_empty": (dict(x=x[:0], ref_index=torch.empty(0, dtype=torch.int64)), ValueError, "x"),
        "query_rank": (dict(query=torch.randn(1, 1, d)), ValueError, "query"),
        "query_dim": (dict(query=torch.randn(d + 1)), ValueError, "query"),
        "query_rows": (dict(query=torch.randn(n + 1, d)), ValueError, "query"),
        "rel_N": (dict(rel=torch.randn(n + 1, p, d)), ValueError, "rel"),
        "rel_P": (dict(rel=torch.randn(n, p + 1, d)), ValueError, "rel"),
        "rel_vs_query": (dict(rel=torch.randn(n, p, d + 2)), ValueError, "query"),
        "red_P": (dict(red=torch.randn(n, p - 1, d)), ValueError, "red"),
        "red_vs_bank": (dict(red=torch.randn(n, p, d + 1)), ValueError, "ref_bank"),
        "red_without_bank": (
            dict(ref_bank=None, ref_index=None, red=torch.randn(n, p, d)),
            ValueError,
            "red",
        ),
        "bank_rank": (dict(ref_bank=torch.randn(p, d)), ValueError, "ref_bank"),
        "bank_P": (dict(ref_bank=torch.randn(k, p + 1, d)), ValueError, "ref_bank"),
        "bank_D": (dict(ref_bank=torch.randn(k, p, d + 1)), ValueError, "ref_bank"),
        "bank_without_index": (dict(ref_index=None), ValueError, "ref_index"),
        "index_without_bank": (dict(ref_bank=None), ValueError, "ref_bank"),
        "index_len": (dict(ref_index=torch.tensor([0, 1, 2])), ValueError, "ref_index"),
        "index_rank": (
            dict(ref_index=torch.zeros(n, 1, dtype=torch.int64)),
            ValueError,
            "ref_index",
        ),
        "index_float": (dict(ref_index=torch.zeros(n)), TypeError, "ref_index"),
        "index_too_big": (dict(ref_index=torch.tensor([0, 1, 3, 2])), ValueError, "ref_index"),
        "index_below_minus1": (
            dict(ref_index=torch.tensor([0, -2, 1, 2])),
            ValueError,
            "ref_index",
        ),
        "tau_zero": (dict(tau=0.0), ValueError, "tau"),
        "tau_negative_tensor": (dict(tau=torch.tensor(-1.0)), ValueError, "tau"),
        "tau_nan": (dict(tau=float("nan")), ValueError, "tau"),
        "tau_1d": (dict(tau=torch.tensor([0.5])), ValueError, "tau"),
        "tau_int_tensor": (dict(tau=torch.tensor(1)), ValueError, "tau"),
        "tau_str": (dict(tau="0.5"), TypeError, "tau"),
        "tau_bool": (dict(tau=True), TypeError, "tau"),
        "device_query": (dict(query=torch.empty(d, device=meta)), ValueError, "query"),
        "device_bank": (dict(ref_bank=torch.empty(k, p, d, device=meta)), ValueError, "ref_bank"),
        "device_index": (
            dict(ref_index=torch.empty(n, dtype=torch.int64, device=meta)),
            ValueError,
            "ref_index",
        ),
        "device_rel": (dict(rel=torch.empty(n, p, d, device=meta)), ValueError, "rel"),
        "device_tau": (dict(tau=torch.empty((), device=meta)), ValueError, "tau"),
        "dtype_query": (dict(query=torch.randn(d, dtype=torch.float64)), TypeError, "query"),
        "dtype_bank": (
            dict(ref_bank=torch.randn(k, p, d, dtype=torch.float16)),
            TypeError,
            "ref_bank",
        ),
        "dtype_red": (dict(red=torch.randn(n, p, d, dtype=torch.bfloat16)), TypeError, "red"),
    }
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("case", list(_CASES), ids=list(_CASES))
def test_bad_inputs_raise_naming_the_argument(case):
    change, exc, name = _CASES[case]
    kw = {**_BASE, **change}
    with pytest.raises(exc, match=rf"\b{name}\b"):
        dwp(
            kw["x"],
            kw["query"],
            kw["ref_bank"],
            kw["ref_index"],
            rel=kw["rel"],
            red=kw["red"],
            tau=kw["tau"],
        )


@pytest.mark.parametrize(
    "case",
    [
        "query_dim",
        "query_rows",
        "rel_N",
        "red_P",
        "bank_D",
        "bank_without_index",
        "index_len",
        "index_float",
        "index_too_big",
        "index_below_minus1",
        "tau_negative_tensor",
        "dtype_bank",
    ],
)
def test_raw_op_checks_in_cpp(case):
    """torch.ops calls skip the Python validation: the C++ kernel must still refuse."""
    change, exc, name = _CASES[case]
    kw = {**_BASE, **change}
    tau = kw["tau"] if isinstance(kw["tau"], torch.Tensor) else torch.tensor(kw["tau"])
    with pytest.raises(exc, match=rf"\b{name}\b"):
        FWD(kw["x"], kw["query"], kw["ref_bank"], kw["ref_index"], kw["rel"], kw["red"], tau, False)


def test_raw_backward_checks_side_inputs():
    inp = make_inputs(3, 5, 4)
    tau = torch.tensor(0.5)
    out, _, lse = FWD(*_op_args(inp, tau, False))
    common = (inp["x"], inp["query"], inp["ref_bank"], inp["ref_index"], None, None, tau)
    with pytest.raises(ValueError, match="grad_out"):
        BWD(torch.randn(3, 5), *common, out, lse)
    with pytest.raises(ValueError, match="lse"):
        BWD(torch.randn(3, 4), *common, out, lse[:2])
    with pytest.raises(ValueError, match="out"):
        BWD(torch.randn(3, 4), *common, out[:, :3], lse)
