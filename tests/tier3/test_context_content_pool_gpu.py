"""Tier 3: context_content_pool on CUDA (Triton) through the public op: bf16/fp16/fp32
numerics (forward and the three gradients) against the fp64 reference on the CPU at the
LLaMA-VID shape and awkward ones, the nn module, peak memory and speed vs the seed-style
baseline. Skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch
from split_checks import assert_split_matches_whole  # tests/ is on sys.path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# bf16: inputs and dS are rounded to 8 bits of mantissa before the tensor-core products.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got, want, dtype, name):
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _run(fn, x, q, k, go, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, q, k)]
    out = fn(*leaves, **kw)
    out.backward(go)
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "p", "lq", "c", "ck", "per_frame", "grid"), [
    (8, 256, 32, 1408, None, False, 1),   # LLaMA-VID (EVA-ViT-G, 224 px)
    (8, 256, 32, 1408, None, True, 2),    # per-frame queries, grid:2
    (4, 729, 17, 80, 48, False, 4),       # 27 x 27, separate keys, P blocks, overlapping bins
    (3, 9, 70, 40, None, True, 3),        # two query chunks
    # issue 14.5: small N splits P across programs (forward and backward prep)
    (1, 256, 32, 1408, None, False, 1),   # one frame: 4 splits
    (17, 256, 32, 1408, None, True, 2),   # the wrapper's 17-frame vision chunk
    (3, 197, 70, 96, 64, False, 1),       # ragged last split, keys, two query chunks
    (3, 729, 17, 80, None, True, 3),      # 27 x 27: 12 splits
])
def test_matches_reference(dtype, n, p, lq, c, ck, per_frame, grid):
    from lvlm_fast.ops import context_content_pool
    from lvlm_fast.reference.context_content_pool import context_content_pool as ref_pool

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, c, generator=gen, dtype=torch.float64)
    q = torch.randn(*((n,) if per_frame else ()), lq, ck or c, generator=gen, dtype=torch.float64)
    k = torch.randn(n, p, ck, generator=gen, dtype=torch.float64) if ck else None
    want_go = torch.randn(n, 1 + grid * grid, c, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(device="cuda", dtype=dtype) if t is not None else None
    # the reference sees the same rounded inputs
    d = lambda t: cast(t).double().cpu() if t is not None else None
    out, grads = _run(context_content_pool, cast(x), cast(q), cast(k), cast(want_go),
                      content_grid=grid)
    wout, wgrads = _run(ref_pool, d(x), d(q), d(k), d(want_go), content_grid=grid)
    assert out.device.type == "cuda" and out.dtype == dtype
    _close(out, wout, dtype, "out")
    for name, g, wg in zip(("grad_x", "grad_queries", "grad_keys"), grads, wgrads, strict=True):
        if wg is not None:
            _close(g, wg, dtype, name)


def test_module_bf16_matches_fp64():
    from lvlm_fast.nn import ContextContentPooling

    torch.manual_seed(0)
    m = ContextContentPooling(1408, 256, content_grid=2, frames_per_chunk=5).cuda()
    x = torch.randn(12, 256, 1408, device="cuda")
    q = torch.randn(32, 1408, device="cuda")
    want = m.double()(x.double(), q.double()).float()
    got = m.to(torch.bfloat16)(x.bfloat16(), q.bfloat16()).float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_peak_memory_and_speed_vs_seed():
    from benchmarks.seed.llamavid import seed_context_content
    from lvlm_fast.ops import context_content_pool

    n, p, lq, c = 1024, 256, 32, 1408
    x = torch.randn(n, p, c, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(lq, c, device="cuda", dtype=torch.bfloat16)

    def peak_and_time(fn):
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, start.elapsed_time(end) / 5

    fused_peak, fused_ms = peak_and_time(lambda: context_content_pool(x, q))
    seed_peak, seed_ms = peak_and_time(lambda: seed_context_content(x, q))
    assert fused_peak * 8 <= seed_peak, (fused_peak, seed_peak)
    assert fused_ms < seed_ms, (fused_ms, seed_ms)


def test_transposed_frames_on_cuda():
    # issue 9.5/9.6 audit: frames given as a (P, N, C).transpose(0, 1) view (read through
    # their strides, or copied when one frame would span >= 2^31 elements) and broadcast
    # per-frame queries give the contiguous result
    from lvlm_fast.ops import context_content_pool

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, 64, generator=g).cuda().transpose(0, 1)
    q = torch.randn(1, 32, 64, generator=g).cuda().expand(6, 32, 64)
    got = context_content_pool(x, q)
    want = context_content_pool(x.contiguous(), q.contiguous())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shared", [True, False])
def test_backward_deterministic_cuda(shared):
    # issue 14.2.3: no atomics; two backward passes are bitwise equal on the GPU
    from lvlm_fast.kernels.context_content_pool import (
        context_content_pool_bwd,
        context_content_pool_fwd,
    )

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 256, 1408, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randn(*(() if shared else (64,)), 32, 1408, device="cuda", generator=g,
                    dtype=torch.bfloat16)
    out, lse = context_content_pool_fwd(x, q, None, 1408**-0.5, 1)
    go = torch.randn(out.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    a = context_content_pool_bwd(go, x, q, None, 1408**-0.5, 1, lse)
    b = context_content_pool_bwd(go, x, q, None, 1408**-0.5, 1, lse)
    for u, w in zip(a, b, strict=True):
        assert torch.equal(u, w)


@pytest.mark.parametrize(("n", "p", "lq", "per_frame", "keys", "grid"), [
    (1, 256, 32, False, False, 1),
    (3, 197, 70, True, True, 1),
    (17, 256, 32, False, False, 2),
    (5, 729, 32, True, False, 3),
])
def test_split_p_cuda(monkeypatch, n, p, lq, per_frame, keys, grid):
    # issue 14.5: at small N the launcher splits P (grid (N, splits)); fp32 results equal the
    # one-program-per-frame path up to fp32 rounding, and two runs are bitwise equal
    import lvlm_fast.kernels.context_content_pool as K

    assert K.p_splits(n, p)[0] > 1
    g = torch.Generator(device="cuda").manual_seed(0)
    c = 256
    x = torch.randn(n, p, c, device="cuda", generator=g)
    q = torch.randn(*((n,) if per_frame else ()), lq, c, device="cuda", generator=g)
    k = torch.randn(n, p, c, device="cuda", generator=g) if keys else None
    go = torch.randn(n, 1 + grid * grid, c, device="cuda", generator=g)

    def run():
        out, lse = K.context_content_pool_fwd(x, q, k, c**-0.5, grid)
        return (out, lse, *K.context_content_pool_bwd(go, x, q, k, c**-0.5, grid, lse))

    assert_split_matches_whole(K, monkeypatch, run, n, p, tol=1e-5)
