"""Tier 0: context_content_pool (LLaMA-VID context + content tokens) on CPU.

The reference against independent anchors (scaled_dot_product_attention, adaptive_avg_pool2d,
the seed baseline), the C++ kernel against the reference (forward and backward for x,
queries and keys, every option, awkward shapes, non-contiguous inputs), opcheck, gradcheck,
meta shapes, torch.compile, bad input, peak memory, and the nn module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401  (loads the C++ kernels)
from benchmarks.seed.llamavid import seed_context_content
from lvlm_fast import _extension
from lvlm_fast.nn import ContextContentPooling
from lvlm_fast.ops import context_content_pool
from lvlm_fast.ops.context_content_pool import reference_bwd, reference_fwd
from lvlm_fast.reference.context_content_pool import content_tokens, grid_bins
from lvlm_fast.reference.context_content_pool import context_content_pool as ref_pool

OP = torch.ops.lvlm_fast.context_content_pool
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got, want, dtype, name="", slack=1.0):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1.0)
    err = (got - want).abs().max().item()
    assert err <= TOL[dtype] * slack * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _inputs(n, p, lq, c, *, ck=None, per_frame=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, c, generator=g, dtype=torch.float64)
    q = torch.randn(*((n,) if per_frame else ()), lq, ck or c, generator=g, dtype=torch.float64)
    k = torch.randn(n, p, ck, generator=g, dtype=torch.float64) if ck else None
    cast = lambda t: t.to(dtype) if t is not None else None
    return cast(x), cast(q), cast(k)


def _fwd_bwd(fn, x, q, k, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, q, k)]
    out = fn(leaves[0], leaves[1], leaves[2], **kw)
    out.backward(grad)
    return out, [t.grad if t is not None else None for t in leaves]


def _assert_matches(x, q, k=None, slack=1.0, **kw):
    """C++ op vs the reference, forward and all three gradients. The reference runs in
    float64 (then cast) so low-precision runs compare against the exact answer."""
    want = ref_pool(x.double(), q.double(), k.double() if k is not None else None, **kw)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = _fwd_bwd(context_content_pool, x, q, k, grad.to(x.dtype), **kw)
    wout, wgrads = _fwd_bwd(ref_pool, x.double(), q.double(),
                            k.double() if k is not None else None, grad, **kw)
    _close(out, wout.to(x.dtype), x.dtype, "out", slack)
    for name, g, wg in zip(("grad_x", "grad_queries", "grad_keys"), grads, wgrads, strict=True):
        if wg is None:
            assert g is None, name
        else:
            _close(g, wg.to(x.dtype), x.dtype, name, slack)


# ------------------------------------------------------------------ the kernel is the C++ one
def test_cpu_kernel_is_the_cpp_one():
    for name in ("context_content_pool", "context_content_pool_backward"):
        dump = torch._C._dispatch_dump(f"lvlm_fast::{name}")
        cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
        assert "context_content_pool.cpp" in cpu_line, cpu_line
    errors = " ".join(_extension.cpu_kernel_status()["errors"])
    assert "context_content_pool" not in errors


# ------------------------------------------------------------------ reference anchors
@pytest.mark.parametrize("per_frame", [False, True])
def test_reference_is_mean_of_sdpa(per_frame):
    x, q, k = _inputs(3, 10, 4, 6, ck=5, per_frame=per_frame, dtype=torch.float64)
    qq = q if per_frame else q.expand(3, -1, -1)
    attn_out = F.scaled_dot_product_attention(qq, k, x)  # default scale 1/sqrt(Ck)
    got = ref_pool(x, q, k)
    torch.testing.assert_close(got[:, 0], attn_out.mean(1))
    torch.testing.assert_close(got[:, 1], x.mean(1))


@pytest.mark.parametrize(("side", "g"), [(4, 2), (5, 3), (27, 4), (2, 3), (3, 1)])
def test_reference_grid_is_adaptive_avg_pool2d(side, g):
    x = torch.randn(2, side * side, 3, dtype=torch.float64)
    want = F.adaptive_avg_pool2d(x.view(2, side, side, 3).permute(0, 3, 1, 2), g)
    got = content_tokens(x, g)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2))


def test_grid_bins_overlap_like_adaptive_pooling():
    assert grid_bins(5, 3) == [(0, 2), (1, 4), (3, 5)]
    assert grid_bins(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_seed_baseline_equals_op(grid):
    x, q, _ = _inputs(3, 16, 5, 12)
    want = seed_context_content(x, q, content_grid=grid)
    _close(context_content_pool(x, q, content_grid=grid), want, torch.float32)


def test_seed_with_key_projection_equals_op_with_keys():
    x, q, _ = _inputs(2, 9, 3, 8, dtype=torch.float64)
    w, b = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    want = seed_context_content(x, q, w, b)
    got = context_content_pool(x, q, F.linear(x, w, b))
    _close(got, want, torch.float64)


# ------------------------------------------------------------------ kernel vs reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("ck", [None, 11])
@pytest.mark.parametrize("grid", [1, 3])
def test_matches_reference(dtype, per_frame, ck, grid):
    x, q, k = _inputs(3, 25, 7, 19, ck=ck, per_frame=per_frame, dtype=dtype)
    _assert_matches(x, q, k, content_grid=grid)


def test_released_setting():
    # EVA-ViT-G at 224 px: P = 256 (16 x 16), C = 1408, 32 queries; grid:2 content.
    x, q, _ = _inputs(2, 256, 32, 1408)
    _assert_matches(x, q, content_grid=1)
    _assert_matches(x, q, content_grid=2)


@pytest.mark.parametrize(("n", "p", "lq", "c"), [
    (1, 1, 1, 1), (1, 729, 17, 80), (2, 3, 33, 9), (5, 7, 1, 130), (1, 2, 48, 24), (3, 64, 16, 16)])
def test_awkward_shapes(n, p, lq, c):
    x, q, _ = _inputs(n, p, lq, c, per_frame=(n % 2 == 1))
    _assert_matches(x, q)


def test_one_patch_gives_x_twice():
    x, q, _ = _inputs(4, 1, 6, 10)
    out = context_content_pool(x, q)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, 1], x[:, 0])
    _assert_matches(x, q)


@pytest.mark.parametrize("side_grid", [(5, 3), (2, 3), (27, 4), (4, 4)])
def test_grids_overlapping_and_larger_than_side(side_grid):
    side, g = side_grid
    x, q, _ = _inputs(2, side * side, 3, 9)
    _assert_matches(x, q, content_grid=g)


def test_scale_argument_and_lse():
    x, q, k = _inputs(2, 12, 5, 6, ck=4)
    out, lse = OP(x, q, k, 0.37, 1)
    _close(out, ref_pool(x, q, k, scale=0.37), torch.float32)
    want_lse = torch.logsumexp(q.double() @ k.double().transpose(1, 2) * 0.37, -1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    _assert_matches(x, q, k, scale=0.37)
    _assert_matches(x, q, k, scale=0.0)  # uniform attention: context = content


def test_large_scores_are_stable():
    x, q, _ = _inputs(2, 30, 4, 8)
    x, q = x * 30, q * 30  # scores ~ 1e3: a naive exp overflows
    out = context_content_pool(x, q)
    assert torch.isfinite(out).all()
    # scores ~ 1e3: fp32 rounding of the scores alone moves the softmax by ~1e-4 relative
    _assert_matches(x, q, slack=50.0)
    _assert_matches(x.double(), q.double())


def test_nan_stays_in_its_frame():
    x, q, _ = _inputs(3, 8, 4, 5)
    x[1, 2, 3] = float("nan")
    out = context_content_pool(x, q)
    assert torch.isnan(out[1]).any()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(4, 20, 2, 30, generator=g)
    x = big[:, :, 1, 3:22]  # strided rows
    xt = torch.randn(19, 20, 4, generator=g).permute(2, 1, 0)  # strided channel dim
    q = torch.randn(19, 6, generator=g).t()  # (6, 19) transposed view
    qf = torch.randn(4, 19, 6, generator=g).transpose(1, 2)  # per frame, transposed
    k = torch.randn(4, 40, 7, generator=g)[:, ::2]  # strided patches
    qk = torch.randn(6, 14, generator=g)[:, ::2]  # strided channels
    for xx in (x, xt):
        assert not xx.is_contiguous()
        _assert_matches(xx, q)
        _assert_matches(xx, qf, content_grid=1)
        _assert_matches(xx, qk, k)


def test_keys_is_x_means_keys_none():
    x, q, _ = _inputs(2, 9, 3, 5, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    context_content_pool(xa, q, xa).sum().backward()
    xb = x.clone().requires_grad_(True)
    ref_pool(xb, q, xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), side=st.integers(1, 6), lq=st.integers(1, 20), c=st.integers(1, 40),
       ck=st.one_of(st.none(), st.integers(1, 20)), per_frame=st.booleans(),
       grid=st.integers(1, 4), scale=st.one_of(st.none(), st.floats(-2, 2)),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_hypothesis_matches_reference(n, side, lq, c, ck, per_frame, grid, scale, dtype):
    x, q, k = _inputs(n, side * side, lq, c, ck=ck, per_frame=per_frame, dtype=dtype)
    _assert_matches(x, q, k, content_grid=grid, scale=scale)


# ------------------------------------------------------------------ op contract
@pytest.mark.parametrize(("per_frame", "ck", "grid"), [(False, None, 1), (True, 5, 2)])
def test_opcheck(per_frame, ck, grid):
    x, q, k = _inputs(2, 9, 3, 6, ck=ck, per_frame=per_frame)
    for t in (x, q, k):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(OP, (x, q, k, 0.5, grid))


@pytest.mark.parametrize(("per_frame", "ck", "grid"),
                         [(False, None, 1), (True, None, 2), (False, 4, 3), (True, 3, 1)])
def test_gradcheck_fp64(per_frame, ck, grid):
    x, q, k = _inputs(2, 9, 3, 5, ck=ck, per_frame=per_frame, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, q, k) if t is not None]
    fn = lambda *a: context_content_pool(a[0], a[1], a[2] if len(a) > 2 else None,
                                         content_grid=grid)
    assert torch.autograd.gradcheck(fn, leaves)


def test_cpu_fallback_matches_cpp():
    x, q, k = _inputs(2, 16, 5, 7, ck=6, per_frame=True)
    out, lse = OP(x, q, k, 0.4, 2)
    rout, rlse = reference_fwd(x, q, k, 0.4, 2)
    _close(out, rout, torch.float32, "out")
    torch.testing.assert_close(lse, rlse.float(), rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    got = torch.ops.lvlm_fast.context_content_pool_backward(go, x, q, k, 0.4, 2, lse)
    want = reference_bwd(go, x, q, k, 0.4, 2, rlse)
    for name, a, b in zip(("gx", "gq", "gk"), got, want, strict=True):
        _close(a, b, torch.float32, name)
    # keys None: grad_keys is an empty placeholder in both
    got = torch.ops.lvlm_fast.context_content_pool_backward(
        torch.randn(2, 2, 7), x, q[..., :7] if q.shape[-1] >= 7 else torch.randn(2, 5, 7), None,
        0.4, 1, torch.zeros(2, 5))
    assert got[2].numel() == 0


def test_meta_shapes():
    x = torch.empty(5, 16, 12, device="meta")
    q = torch.empty(3, 12, device="meta")
    out = context_content_pool(x, q, content_grid=2)
    assert out.shape == (5, 5, 12) and out.device.type == "meta"
    o, lse = OP(x.half(), q.half(), None, 1.0, 1)
    assert o.shape == (5, 2, 12) and o.dtype == torch.float16 and lse.dtype == torch.float32
    o, lse = OP(x.double(), torch.empty(5, 4, 7, device="meta", dtype=torch.float64),
                torch.empty(5, 16, 7, device="meta", dtype=torch.float64), 1.0, 4)
    assert o.shape == (5, 17, 12) and lse.shape == (5, 4) and lse.dtype == torch.float64


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    x, q, _ = _inputs(3, 16, 4, 8)
    fn = torch.compile(lambda a, b: context_content_pool(a, b, content_grid=2).sum(dim=1),
                       fullgraph=True, backend=backend)
    xa = x.clone().requires_grad_(True)
    out = fn(xa, q)
    _close(out, ref_pool(x, q, content_grid=2).sum(dim=1), torch.float32)
    out.sum().backward()
    xr = x.clone().requires_grad_(True)
    ref_pool(xr, q, content_grid=2).sum().backward()
    _close(xa.grad, xr.grad, torch.float32)


def test_no_attention_sized_tensor_is_materialised():
    from lvlm_fast.profile.tracker import peak_live_bytes

    n, p, lq, c = 64, 64, 32, 48
    x, q, _ = _inputs(n, p, lq, c)
    fwd = peak_live_bytes(lambda: context_content_pool(x, q))
    out_bytes = n * 2 * c * 4
    lse_bytes = n * lq * 4
    assert fwd <= out_bytes + lse_bytes, fwd
    attn_bytes = n * lq * p * 4
    assert attn_bytes > 4 * (out_bytes + lse_bytes)  # the check above can fail
    xg = x.clone().requires_grad_(True)
    qg = q.clone().requires_grad_(True)
    out = context_content_pool(xg, qg)
    go = torch.ones_like(out)
    bwd = peak_live_bytes(lambda: torch.autograd.grad(out, (xg, qg), go))
    assert bwd <= xg.numel() * 4 + qg.numel() * 4 + out_bytes, bwd


# ------------------------------------------------------------------ bad input
def _bad_cases():
    x = torch.randn(2, 9, 6)
    q = torch.randn(3, 6)
    return [
        (dict(x=x, queries=torch.randn(0, 6)), ValueError, ["queries", "Lq"]),
        (dict(x=x, queries=torch.randn(2, 0, 6)), ValueError, ["queries", "Lq"]),
        (dict(x=x, queries=torch.randn(3, 5)), ValueError, ["queries", "channel"]),
        (dict(x=x, queries=q, keys=torch.randn(2, 9, 5)), ValueError, ["queries", "keys"]),
        (dict(x=x, queries=torch.randn(3, 3, 6)), ValueError, ["queries", "N frames"]),
        (dict(x=x, queries=q.double()), TypeError, ["queries", "dtype"]),
        (dict(x=x, queries=q, keys=torch.randn(2, 9, 6).half()), TypeError, ["keys", "dtype"]),
        (dict(x=x, queries=q.to("meta")), ValueError, ["queries", "is on meta"]),
        (dict(x=x, queries=q, keys=torch.randn(2, 8, 6)), ValueError, ["keys", "P patches"]),
        (dict(x=x, queries=q, keys=torch.randn(3, 9, 6)), ValueError, ["keys", "N frames"]),
        (dict(x=torch.randn(2, 10, 6), queries=q, content_grid=2), ValueError,
         ["content_grid", "square", "P = 10"]),
        (dict(x=x, queries=q, content_grid=0), ValueError, ["content_grid", ">= 1"]),
        (dict(x=x, queries=q, content_grid=2.0), TypeError, ["content_grid"]),
        (dict(x=x, queries=q, content_grid=True), TypeError, ["content_grid"]),
        (dict(x=x, queries=q, scale=float("nan")), ValueError, ["scale", "finite"]),
        (dict(x=x, queries=q, scale="1"), TypeError, ["scale"]),
        (dict(x=x, queries=q, scale=torch.tensor(1.0)), TypeError, ["scale"]),
        (dict(x=x[0], queries=q), ValueError, ["x", "3-D"]),
        (dict(x=torch.randn(2, 0, 6), queries=q), ValueError, ["x", "P"]),
        (dict(x=x.long(), queries=q), TypeError, ["x", "float"]),
        (dict(x=x, queries=[[1.0] * 6]), TypeError, ["queries", "Tensor"]),
        (dict(x=x, queries=torch.randn(6)), ValueError, ["queries", "2-D or 3-D"]),
    ]


@pytest.mark.parametrize(("kwargs", "exc", "words"), _bad_cases())
def test_bad_input(kwargs, exc, words):
    with pytest.raises(exc) as ei:
        context_content_pool(**kwargs)
    msg = str(ei.value)
    for w in words:
        assert w in msg, (w, msg)


def test_raw_op_checks_do_not_crash():
    x, q = torch.randn(2, 9, 6), torch.randn(3, 6)
    bad = [
        (x, torch.randn(0, 6), None, 1.0, 1),
        (x, torch.randn(3, 5), None, 1.0, 1),
        (x, q, None, 1.0, 0),
        (torch.randn(2, 10, 6), q, None, 1.0, 2),
        (x, q.double(), None, 1.0, 1),
        (x, q, torch.randn(2, 8, 6), 1.0, 1),
        (x, torch.randn(3, 3, 6), None, 1.0, 1),
    ]
    for args in bad:
        with pytest.raises(RuntimeError, match="context_content_pool"):
            OP(*args)
    out, lse = OP(x, q, None, 1.0, 1)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.lvlm_fast.context_content_pool_backward(out, x, q, None, 1.0, 1, lse[:, :2])
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.lvlm_fast.context_content_pool_backward(out[:, :1], x, q, None, 1.0, 1, lse)


# ------------------------------------------------------------------ nn module
def _released_token_generation(m, text_q, vis_embed, grid):
    """The released token_generation, written out (keys projected per patch)."""
    keys = m.key_projector(vis_embed)
    n = vis_embed.shape[0]
    tq = text_q[None].expand(n, -1, -1) if text_q.dim() == 2 else text_q
    att = (tq @ keys.transpose(-1, -2)) / (vis_embed.shape[-1] ** 0.5)
    ctx = (att.softmax(-1) @ vis_embed).mean(1)
    ctx = m.val_projector(ctx[:, None])
    if grid > 1:
        side = math.isqrt(vis_embed.shape[1])
        v = vis_embed.reshape(n, side, side, -1).permute(0, 3, 1, 2)
        v = F.avg_pool2d(v, kernel_size=side // grid, stride=side // grid)
        v = v.permute(0, 2, 3, 1).flatten(1, 2)
    else:
        v = vis_embed.mean(1, keepdim=True)
    return torch.cat([ctx, m.mm_projector(v)], dim=1)


@pytest.mark.parametrize(("grid", "per_frame", "fold"),
                         [(1, False, True), (2, True, True), (1, True, False), (4, False, False)])
def test_module_matches_released_token_generation(grid, per_frame, fold):
    torch.manual_seed(0)
    m = ContextContentPooling(12, 20, content_grid=grid, frames_per_chunk=3,
                              fold_key_projection=fold, dtype=torch.float64)
    x = torch.randn(7, 16, 12, dtype=torch.float64, requires_grad=True)
    q = torch.randn(*((7,) if per_frame else ()), 5, 12, dtype=torch.float64, requires_grad=True)
    got = m(x, q)
    assert got.shape == (7, 1 + grid * grid, 20)
    want = _released_token_generation(m, q, x, grid)
    torch.testing.assert_close(got, want)
    go = torch.randn_like(got)
    params = [x, q, *m.parameters()]
    g1 = torch.autograd.grad(got, params, go, allow_unused=True)
    g2 = torch.autograd.grad(want, params, go, allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        if a is None:  # the key bias has exactly zero gradient (it cancels in the softmax)
            assert b is None or b.abs().max() < 1e-10
        else:
            torch.testing.assert_close(a, b)


def test_module_chunking_bounds_memory():
    from lvlm_fast.profile.tracker import peak_live_bytes

    m = ContextContentPooling(32, 40, frames_per_chunk=8)
    q = torch.randn(6, 32)

    def peak(n):
        x = torch.randn(n, 64, 32)
        with torch.no_grad():
            return peak_live_bytes(lambda: m(x, q))

    out_bytes = lambda n: n * 2 * 40 * 4
    p16, p128 = peak(16), peak(128)
    # growth with N is the output only (+ nothing that scales with frames x patches)
    assert p128 - p16 <= out_bytes(128) - out_bytes(16) + 4096, (p16, p128)


def test_module_load_released_and_projector_types():
    m = ContextContentPooling(8, 6, projector_type="linear")
    assert isinstance(m.mm_projector, torch.nn.Linear)
    m2 = ContextContentPooling(8, 6, projector_type="mlp3x_gelu")
    assert len(m2.mm_projector) == 5
    with pytest.raises(ValueError, match="projector_type"):
        ContextContentPooling(8, 6, projector_type="conv")
    src = ContextContentPooling(8, 6)
    sd = {f"model.vlm_att_key_projector.{k}": v for k, v in src.key_projector.state_dict().items()}
    sd |= {f"model.vlm_att_val_projector.{k}": v for k, v in src.val_projector.state_dict().items()}
    sd |= {f"model.mm_projector.{k}": v for k, v in src.mm_projector.state_dict().items()}
    sd["model.vlm_att_query"] = torch.zeros(1, 32, 768)  # ignored
    dst = ContextContentPooling(8, 6)
    dst.load_released(sd)
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert torch.equal(a, b)
    x, q = torch.randn(2, 4, 8), torch.randn(3, 8)
    torch.testing.assert_close(src(x, q), dst(x, q))


def test_module_bad_input():
    m = ContextContentPooling(8, 6)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 4, 7), torch.randn(3, 8))
    with pytest.raises(ValueError, match="text_queries"):
        m(torch.randn(2, 4, 8), torch.randn(3, 7))
    with pytest.raises(ValueError, match="text_queries"):
        m(torch.randn(2, 4, 8), torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match="queries"):
        m(torch.randn(2, 4, 8), torch.randn(0, 8))
