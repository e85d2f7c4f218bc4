"""Tier 3: slowfast_pool on CUDA (Triton) through the public op: bf16/fp16/fp32 numerics
against the fp64 reference on the CPU, arg-max routing, separator gradient, and a speed
check against the seed-style baseline. Skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got, want, dtype, name):
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("setting", [
    dict(grid=(24, 24), slow_kernel=(1, 2), slow_mode="max", fast_grid=(4, 4),
         fast_frames="all", order="slow_fast"),
    dict(grid=(24, 24), slow_kernel=(2, 2), slow_mode="avg", fast_grid=(6, 6),
         fast_frames="all", order="slow_fast"),
    dict(grid=(27, 27), slow_kernel=(3, 3), slow_mode="max", fast_grid=(4, 4),
         fast_frames="non_slow", order="interleaved"),
])
def test_matches_reference(dtype, setting):
    from lvlm_fast.ops import slowfast_pool
    from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_pool

    grid = setting.pop("grid")
    t, d = 12, 1152
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(t, *grid, d, generator=gen, dtype=torch.float64)
    sep64 = torch.randn(d, generator=gen, dtype=torch.float64)
    idx = torch.tensor([0, 4, 8, 11])
    x = x64.to(dtype).cuda().requires_grad_(True)
    sep = sep64.to(dtype).cuda().requires_grad_(True)
    out = slowfast_pool(x, slow_index=idx.cuda(), separator=sep, **setting)
    # reference in fp64 on the same rounded inputs
    xr = x.detach().double().cpu().requires_grad_(True)
    sr = sep.detach().double().cpu().requires_grad_(True)
    want = ref_pool(xr, idx, separator=sr, **setting)
    _close(out, want, dtype, "out")
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    out.backward(g.to(dtype).cuda())
    want.backward(g.to(dtype).double())
    _close(x.grad, xr.grad, dtype, "grad_x")
    _close(sep.grad, sr.grad, dtype, "grad_separator")


def test_small_video_shape():
    from lvlm_fast.ops import slowfast_pool

    x = torch.randn(4, 4, 4, 8, device="cuda")
    out = slowfast_pool(x, slow_index=torch.tensor([0, 2], device="cuda"))
    assert out.shape == (2 * 4 + 4 * 16, 8)


def test_faster_than_seed_bf16():
    from benchmarks.seed.slowfast import seed_slowfast
    from lvlm_fast.ops import SlowFastConfig

    x = torch.randn(128, 576, 1152, device="cuda", dtype=torch.bfloat16)
    cfg = SlowFastConfig.sf_llava_1_5()
    kw = cfg.kwargs(128, "cuda")

    def timed(fn, n=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    fused = timed(lambda: cfg.pool(x))
    seed = timed(lambda: seed_slowfast(x, 32, "spatial_2d_avg_pool", (6, 6)))
    assert kw["slow_index"].device.type == "cuda"
    assert fused < seed, (fused, seed)
