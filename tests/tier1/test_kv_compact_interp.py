"""Tier 1: the kv_compact Triton kernel in the interpreter vs the reference: fused TaR/VaN
scores (fp32, fp16), caller scores with ties, head dim 80, non-power-of-two capacities and
frames, M-RoPE, a no-op when the stream fits, and NaN rows past the length."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels.kv_compact import kv_compact_fwd

from lvlm_fast.reference.kv_compact import kv_compact as ref
from lvlm_fast.reference.kv_compact import move_kept, rotation_freqs, select_rows


def _inv(d):
    return 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _bufs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*shape, generator=g).to(dtype)
    v = (torch.randn(*shape, generator=g) * (1 + torch.rand(*shape[:4], 1, generator=g))
         ).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("shape", "n", "budget", "prefix", "recent", "tpf", "ps", "rot"), [
    ((2, 1, 2, 53, 80), 53, 21, 3, 9, 3, 5, 40),        # head dim 80, C = 53
    ((1, 2, 1, 77, 64), 70, 30, 5, 14, 7, 4, 32),       # ragged length, 7-token frames
    ((1, 1, 3, 45, 32), 45, 14, 1, 8, 4, 5, 4),         # M-RoPE: 4 temporal pairs
])  # fmt: skip
def test_matches_reference(launched, dtype, shape, n, budget, prefix, recent, tpf, ps, rot):
    k, v = _bufs(shape, dtype, seed=n)
    k[..., n:, :] = float("nan")  # poisoned rows past the length
    v[..., n:, :] = float("nan")
    k0, v0 = k.clone(), v.clone()
    inv = _inv(shape[4])
    d2 = shape[4] // 2
    section = None if rot == d2 else [rot, d2 - rot, 0]
    nl, keep, score = kv_compact_fwd(k, v, torch.tensor(n), inv, None, budget, prefix,
                                     recent, tpf, ps, rot)
    rn, rkeep, rscore = ref(k0.clone(), v0.clone(), n, inv, budget=budget, prefix=prefix,
                            recent=recent, tokens_per_frame=tpf, primary_slots=ps,
                            mrope_section=section)
    assert int(nl) == rn
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(score, rscore, atol=tol * 10, rtol=tol)
    if dtype == torch.float32:
        assert torch.equal(keep, rkeep)
    freqs = rotation_freqs(inv, section)
    for li, bi, hi in torch.cartesian_prod(*[torch.arange(s) for s in shape[:3]]).tolist():
        want = select_rows(score[0, li, bi, hi], score[1, li, bi, hi], n, budget, prefix,
                           recent, ps)
        assert torch.equal(keep[li, bi, hi], want)
        kk, vv = k0[li, bi, hi].clone(), v0[li, bi, hi].clone()
        move_kept(kk, vv, want, freqs)
        torch.testing.assert_close(k[li, bi, hi, :rn], kk[:rn], atol=tol, rtol=tol)
        assert torch.equal(v[li, bi, hi, :rn], vv[:rn])
    assert torch.isfinite(k[..., :rn, :]).all() and torch.isfinite(v[..., :rn, :]).all()
    assert len(launched) == 1  # one launch for every layer and head
    assert_interpreted(launched[0])


def test_caller_scores_with_ties_budget_one_and_noop(launched):
    shape = (2, 1, 2, 37, 16)
    k, v = _bufs(shape, torch.float32, 0)
    sc = torch.randint(0, 3, shape[:4], generator=torch.Generator().manual_seed(2)).float()
    sc[1, 0, 0] = 1.0  # all equal
    sc[0, 0, 1, 4:9] = float("nan")
    for budget, prefix, recent, n in [(13, 2, 3, 37), (1, 0, 0, 30), (1, 0, 1, 30),
                                      (40, 2, 3, 37)]:
        k1, v1 = k.clone(), v.clone()
        nl, keep, score = kv_compact_fwd(k1, v1, torch.tensor(n), _inv(16), sc, budget,
                                         prefix, recent, 0, budget - prefix - recent, 8)
        kr, vr = k.clone(), v.clone()
        rn, rkeep, rscore = ref(kr, vr, n, _inv(16), budget=budget, prefix=prefix,
                                recent=recent, primary_slots=budget - prefix - recent,
                                scores=sc)
        assert int(nl) == rn and torch.equal(keep, rkeep), (budget, prefix, recent)
        torch.testing.assert_close(score, rscore, equal_nan=True)
        torch.testing.assert_close(k1[..., :rn, :], kr[..., :rn, :], atol=1e-5, rtol=1e-5)
        assert torch.equal(v1[..., :rn, :], vr[..., :rn, :])
    assert len(launched) == 4
    assert_interpreted(launched[0])


@pytest.mark.parametrize(("d", "rdim", "section"), [
    (32, 32, [6, 5, 5]),  # Qwen3-VL-like: full rotary, interleaved sections
    (32, 8, [2, 1, 1]),  # Qwen3.5-like: partial rotary (1/4 of the head), interleaved
])
def test_interleaved_and_partial_rotary_match_reference(launched, d, rdim, section):
    """The Triton kernel driven exactly as the op wrapper drives it for these layouts (no
    kernel change: spatial pairs at frequency 0, or rows moved unrotated then the temporal
    pairs re-rotated from the keep mask) == the reference."""
    from lvlm_fast.ops.kv_compact import _kernel_rotation, _rerotate_kept

    shape = (2, 1, 2, 29, d)
    n, budget, prefix, recent, tpf, ps = 27, 13, 2, 6, 3, 3
    k, v = _bufs(shape, torch.float32, seed=rdim)
    k[..., n:, :] = float("nan")
    v[..., n:, :] = float("nan")
    k0, v0 = k.clone(), v.clone()
    inv = _inv(rdim)
    freq, pairs, post = _kernel_rotation(inv, d, rdim, section, True)
    nl, keep, _ = kv_compact_fwd(k, v, torch.tensor(n), freq, None, budget, prefix, recent,
                                 tpf, ps, pairs)
    if post is not None:
        _rerotate_kept(k, keep, budget, *post)
    rn, rkeep, _ = ref(k0, v0, n, inv, budget=budget, prefix=prefix, recent=recent,
                       tokens_per_frame=tpf, primary_slots=ps, mrope_section=section,
                       mrope_interleaved=True)
    assert int(nl) == rn and torch.equal(keep, rkeep)
    torch.testing.assert_close(k[..., :rn, :], k0[..., :rn, :], atol=1e-5, rtol=1e-5)
    assert torch.equal(v[..., :rn, :], v0[..., :rn, :])
    assert len(launched) == 1  # one kernel launch for every layer and head
    assert_interpreted(launched[0])
