"""Tier 1: the evict_summaries Triton kernel in the interpreter vs the reference (ratio 1
and 2 overlap sources and destinations; carried remainder; head dim 80; fp32/fp16)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels.evict_summaries import evict_summaries_fwd

from lvlm_fast.reference.videoxl import evict_summaries as ref_evict
from lvlm_fast.reference.videoxl import summary_layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("ratio", "carry", "n_raw", "d"), [
    (1, 0, 40, 64), (2, 1, 37, 80), (4, 3, 53, 128), (16, 5, 100, 96),
])  # fmt: skip
def test_matches_reference(launched, dtype, ratio, carry, n_raw, d):
    count, first, stride, _ = summary_layout(n_raw, ratio, carry)
    start = 7
    g = torch.Generator().manual_seed(ratio)
    k = torch.randn(2, 3, start + n_raw + count + 2, d, generator=g).to(dtype)
    v = torch.randn(k.shape, generator=g).to(dtype)
    kr, vr = k.clone(), v.clone()
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    evict_summaries_fwd(k, v, inv, start, first, stride, count, start - 2, 0)
    ref_evict(kr, vr, inv, start, first, stride, count, start - 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(k, kr, atol=tol, rtol=tol)
    assert torch.equal(v, vr)
    assert len(launched) == 1
    assert_interpreted(launched[0])
