"""Tier 3: evict_summaries on CUDA (Triton, in place) vs the reference, on strided cache
views; the raw op refuses a strided last dim. Skips cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401  (registers the ops)
from lvlm_fast.reference.videoxl import evict_summaries as ref_evict
from lvlm_fast.reference.videoxl import summary_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_strided_cache_views(dtype):
    # a (B, C, H, D) buffer viewed as (B, H, C, D); fp64 compiles too (tier 2)
    count, first, stride, _ = summary_layout(37, 2, 1)
    g = torch.Generator().manual_seed(0)
    inv = 1.0 / 10000 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    k = torch.randn(2, 70, 4, 128, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(2, 70, 4, 128, generator=g).to(dtype).transpose(1, 2)
    kr, vr = k.clone(), v.clone()
    kc, vc = k.cuda(), v.cuda()
    torch.ops.lvlm_fast.evict_summaries(kc, vc, inv.cuda(), 7, first, stride, count, 5, 0)
    ref_evict(kr, vr, inv, 7, first, stride, count, 5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(kc.cpu(), kr, atol=tol, rtol=tol)
    assert torch.equal(vc.cpu(), vr)


def test_raw_op_refuses_a_strided_last_dim():
    k = torch.randn(1, 2, 20, 128, device="cuda")[..., ::2]
    v = torch.randn(1, 2, 20, 64, device="cuda")
    with pytest.raises(ValueError, match="unit-stride last dim"):
        torch.ops.lvlm_fast.evict_summaries(k, v, torch.ones(32, device="cuda"), 2, 1, 2, 3,
                                            1, 0)


def test_all_layers_one_launch_cuda():
    # issue 14.2.4: 28 separately allocated layer buffers evicted by one launch
    from lvlm_fast.ops.evict_summaries import evict_summaries_layers

    g = torch.Generator(device="cuda").manual_seed(0)
    ks = [torch.randn(1, 4, 600, 128, device="cuda", generator=g, dtype=torch.bfloat16)
          for _ in range(28)]
    vs = [torch.randn_like(k) for k in ks]
    want = [(k.clone(), v.clone()) for k, v in zip(ks, vs, strict=True)]
    inv = 1.0 / 10000 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float32) / 128)
    kw = dict(window_start=20, ratio=16, carry=3, count=30, dst=20, inv_freq=inv)
    for k, v in want:
        torch.ops.lvlm_fast.evict_summaries(k, v, inv, 20, 13, 17, 30, 20, 0)
    evict_summaries_layers(ks, vs, **kw)
    for (kr, vr), k, v in zip(want, ks, vs, strict=True):
        assert torch.equal(k, kr) and torch.equal(v, vr)
