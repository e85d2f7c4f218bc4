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


def test_strided_buffers(launched):
    # issue 9.5 audit: a (B, C, H, D) cache viewed as (B, H, C, D) and a buffer with padded
    # rows are read and written through their strides
    count, first, stride, _ = summary_layout(37, 2, 1)
    g = torch.Generator().manual_seed(4)
    inv = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    k = torch.randn(2, 70, 3, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, 3, 70, 72, generator=g)[..., 4:68]
    assert not k.is_contiguous() and v.stride(2) == 72
    kr, vr = k.clone(), v.clone()
    evict_summaries_fwd(k, v, inv, 7, first, stride, count, 5, 0)
    ref_evict(kr, vr, inv, 7, first, stride, count, 5)
    torch.testing.assert_close(k, kr, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, vr)


def test_strided_last_dim_is_refused():
    # the raw op skips the public checks; an in-place edit cannot copy a strided last dim
    k = torch.randn(1, 2, 20, 128)[..., ::2]
    v = torch.randn(1, 2, 20, 64)
    inv = torch.ones(32)
    with pytest.raises(ValueError, match="key must have a unit-stride last dim"):
        evict_summaries_fwd(k, v, inv, 2, 1, 2, 3, 1, 0)


# --------------------------------------------------------------------------- issue 14.2.4
@pytest.mark.parametrize(("dtype", "ratio", "carry", "n_raw", "d"), [
    (torch.float32, 2, 1, 37, 80), (torch.float16, 4, 0, 53, 128),
])  # fmt: skip
def test_all_layers_in_one_launch(launched, dtype, ratio, carry, n_raw, d):
    # separately allocated per-layer buffers (as the cache holds them), one launch
    from lvlm_fast.kernels.evict_summaries import evict_summaries_layers_fwd

    count, first, stride, _ = summary_layout(n_raw, ratio, carry)
    start, layers = 5, 4
    g = torch.Generator().manual_seed(9)
    shape = (1, 3, start + n_raw + count + 1, d)
    ks = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    vs = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    want = [(k.clone(), v.clone()) for k, v in zip(ks, vs, strict=True)]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    evict_summaries_layers_fwd(ks, vs, inv, start, first, stride, count, start, 0)
    for kr, vr in want:
        ref_evict(kr, vr, inv, start, first, stride, count, start)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for (kr, vr), k, v in zip(want, ks, vs, strict=True):
        torch.testing.assert_close(k, kr, atol=tol, rtol=tol)
        assert torch.equal(v, vr)
    assert len(launched) == 1
    assert_interpreted(launched[0])


def test_layers_must_match():
    from lvlm_fast.kernels.evict_summaries import evict_summaries_layers_fwd

    k = torch.zeros(1, 2, 20, 8)
    inv = torch.ones(4)
    with pytest.raises(ValueError, match="keys\\[1\\]"):
        evict_summaries_layers_fwd([k, torch.zeros(1, 2, 21, 8)], [k, k], inv, 0, 1, 2, 3, 0, 0)
