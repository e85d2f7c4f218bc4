"""Tier 1: split_kv's merge kernel in the interpreter vs a torch logsumexp merge, including
rows wider than one BLOCK_D chunk (diff_weighted_pool merges whole channel rows: D up to
8192, in 128-wide chunks) and splits with no visible key (lse -inf)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import split_kv as K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [7, 128, 300])
def test_merge_matches_logsumexp(launched, dtype, d):
    g = torch.Generator().manual_seed(d)
    ns, b, h, lq = 3, 2, 3, 5
    o_part = torch.randn(ns, b, h, lq, d, generator=g)
    lse_part = torch.randn(ns, b, h, lq, generator=g) * 4
    lse_part[1, 0, 1] = float("-inf")  # split 1 saw no key for these rows
    lse_part[0, 1, :, 2] = float("-inf")
    out = torch.empty(b, lq, h, d, dtype=dtype).transpose(1, 2)  # strided (b, h, i) output
    lse = K.merge_partials(o_part, lse_part, out)
    want_lse = torch.logsumexp(lse_part.double(), 0)
    want = (torch.exp(lse_part.double() - want_lse)[..., None] * o_part.double()).sum(0)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert K.merge_block_d(d) <= K.MERGE_MAX_BLOCK_D
    for fn in launched:
        assert_interpreted(fn)
    assert [f.fn.__name__ for f in launched] == ["_lse_merge_kernel"]
