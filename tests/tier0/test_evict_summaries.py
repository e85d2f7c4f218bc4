"""Tier 0: evict_summaries C++ kernel vs the reference: ratios 1..16 (1 and 2 overlap
sources and destinations), carried remainders, head dims, dtypes, strided buffers,
positions after eviction equal a fresh RoPE at sink + j, opcheck, meta, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import evict_summaries
from lvlm_fast.reference.videoxl import (
    apply_rope,
    rope_cos_sin,
    summary_layout,
)
from lvlm_fast.reference.videoxl import evict_summaries as ref_evict


def _inv_freq(d, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _bufs(b, h, cap, d, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # (B, C, H, D) storage viewed as (B, H, C, D): non-contiguous leading dims
        k = torch.randn(b, cap, h, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, cap, h, d, generator=g).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(b, h, cap, d, generator=g).to(dtype)
        v = torch.randn(b, h, cap, d, generator=g).to(dtype)
    return k, v


def _run_both(b, h, d, dtype, ratio, carry, n_raw, start, dst, strided=False, seed=0):
    count, first, stride, _ = summary_layout(n_raw, ratio, carry)
    cap = start + n_raw + count + 3
    k, v = _bufs(b, h, cap, d, dtype, seed, strided)
    kr, vr = k.clone(), v.clone()
    inv = _inv_freq(d)
    evict_summaries(k, v, window_start=start, ratio=ratio, carry=carry, count=count, dst=dst,
                    inv_freq=inv)
    ref_evict(kr, vr, inv, start, first, stride, count, dst)
    return k, v, kr, vr, count


TOL = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("carry_frac", [0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(ratio, carry_frac, dtype):
    carry = int(carry_frac * ratio)
    k, v, kr, vr, count = _run_both(2, 3, 80, dtype, ratio, carry, 53, start=11, dst=11)
    assert count > 0
    torch.testing.assert_close(k, kr, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(v, vr)  # values are moved bit-exactly


@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_positions_after_eviction(d):
    # keys rotated at their window position, then evicted, equal keys rotated at sink + j
    sink, retained, n_raw, ratio, carry = 5, 4, 37, 4, 2
    count, first, stride, _ = summary_layout(n_raw, ratio, carry)
    start = sink + retained
    length = n_raw + count
    cap = start + length
    inv = _inv_freq(d, 1e6)
    raw = torch.randn(1, 2, cap, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(cap), inv)
    k = apply_rope(raw, cos.double(), sin.double())
    v = raw.clone()
    evict_summaries(k, v, window_start=start, ratio=ratio, carry=carry, count=count, dst=start,
                    inv_freq=inv)
    src_rows = start + first + stride * torch.arange(count)
    want_pos = start + torch.arange(count)
    c2, s2 = rope_cos_sin(want_pos, inv)
    want = apply_rope(raw[:, :, src_rows], c2.double(), s2.double())
    torch.testing.assert_close(k[:, :, start:start + count], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(v[:, :, start:start + count], raw[:, :, src_rows])
    # rows before the window untouched
    assert torch.equal(k[:, :, :start], apply_rope(raw, cos.double(), sin.double())[:, :, :start])


def test_strided_buffer_and_gap_destination():
    k, v, kr, vr, _ = _run_both(1, 4, 64, torch.float32, 2, 1, 30, start=20, dst=12,
                                strided=True)
    torch.testing.assert_close(k, kr, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, vr)


@settings(max_examples=30, deadline=None)
@given(ratio=st.integers(1, 17), n_raw=st.integers(1, 90), start=st.integers(0, 20),
       back=st.integers(0, 5), cseed=st.integers(0, 1000))  # fmt: skip
def test_hypothesis(ratio, n_raw, start, back, cseed):
    carry = cseed % ratio
    dst = max(0, start - back)
    k, v, kr, vr, _ = _run_both(1, 2, 64, torch.float32, ratio, carry, n_raw, start, dst)
    torch.testing.assert_close(k, kr, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, vr)


def test_count_zero_is_noop():
    k, v = _bufs(1, 2, 10, 64, torch.float32)
    k0, v0 = k.clone(), v.clone()
    evict_summaries(k, v, window_start=2, ratio=16, carry=0, count=0, dst=2,
                    inv_freq=_inv_freq(64))
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_opcheck_and_meta():
    k, v = _bufs(1, 2, 40, 64, torch.float32)
    torch.library.opcheck(torch.ops.lvlm_fast.evict_summaries.default,
                          (k, v, _inv_freq(64), 3, 2, 3, 5, 3, 0))
    km = torch.empty(1, 4, 100, 128, device="meta")
    evict_summaries(km, km.clone(), window_start=5, ratio=4, carry=0, count=10, dst=5,
                    inv_freq=torch.empty(64, device="meta"))


def test_torch_compile_fullgraph():
    k, v = _bufs(1, 2, 40, 64, torch.float32)
    kr, vr = k.clone(), v.clone()
    inv = _inv_freq(64)

    def f(k, v):
        evict_summaries(k, v, window_start=3, ratio=2, carry=1, count=6, dst=3, inv_freq=inv)
        return k.sum()

    torch.compile(f, fullgraph=True)(k, v)
    evict_summaries(kr, vr, window_start=3, ratio=2, carry=1, count=6, dst=3, inv_freq=inv)
    torch.testing.assert_close(k, kr)
    assert torch.equal(v, vr)


BAD = [
    (dict(ratio=0), ValueError, ["ratio", ">= 1"]),
    (dict(carry=4), ValueError, ["carry", "[0, ratio"]),
    (dict(count=30), ValueError, ["count", "capacity"]),
    (dict(dst=10), ValueError, ["dst", "<="]),
    (dict(window_start=-1), ValueError, ["window_start"]),
    (dict(ratio=2.0), TypeError, ["ratio", "int"]),
    (dict(inv_freq=torch.ones(31)), ValueError, ["inv_freq", "D/2"]),
    (dict(value=torch.zeros(1, 2, 41, 64)), ValueError, ["value must have key's shape"]),
    (dict(key=torch.zeros(1, 2, 40, 64, dtype=torch.float64)), TypeError, ["dtype"]),
]


@pytest.mark.parametrize(("kw", "err", "words"), BAD)
def test_bad_input_and_nothing_written(kw, err, words):
    k, v = _bufs(1, 2, 40, 64, torch.float32)
    args = dict(key=k, value=v, window_start=5, ratio=4, carry=0, count=3, dst=5,
                inv_freq=_inv_freq(64))
    args.update(kw)
    k0, v0 = k.clone(), v.clone()
    with pytest.raises(err) as e:
        evict_summaries(**args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert torch.equal(k, k0) and torch.equal(v, v0)


def test_raw_op_checks():
    k, v = _bufs(1, 2, 40, 64, torch.float32)
    with pytest.raises(RuntimeError, match="race-free"):
        torch.ops.lvlm_fast.evict_summaries(k, v, _inv_freq(64), 3, 2, 3, 5, 9, 0)
    with pytest.raises(RuntimeError, match="capacity"):
        torch.ops.lvlm_fast.evict_summaries(k, v, _inv_freq(64), 3, 2, 3, 50, 3, 0)
