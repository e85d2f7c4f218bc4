"""Tier 1: the keyframe_select Triton launcher under TRITON_INTERPRET=1 on CPU tensors
equals the reference: random and integer-valued (exact, with duplicates and ties) inputs,
non-power-of-two N and E, floor, fill, NaN, strided rows; fp32 and fp16. Also checks the
launch structure: prep + pick, then one (sweep, pick) pair per further keyframe, so
2 min(k, N) launches and no host round trip in between."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import keyframe_select as K

R = importlib.import_module("lvlm_fast.reference.keyframe_select")


def _check(frames, query, k, thr=0.85, floor=None, fill=True):
    got = K.keyframe_select_fwd(frames, query, k, thr, floor, fill)
    want = R.keyframe_select(frames, query, k, threshold=thr, min_relevance=floor, fill=fill)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int64
    assert got[0].tolist() == want[0].tolist(), (k, thr, floor, fill)
    assert got[1].tolist() == want[1].tolist(), (k, thr, floor, fill)
    return got


def test_kernels_are_interpreted():
    for fn in (K._keyframe_select_prep_kernel, K._keyframe_select_pick_kernel,
               K._keyframe_select_fwd_kernel):
        assert_interpreted(fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,e,k", [(1, 5, 3), (7, 80, 3), (33, 5, 9), (100, 64, 12),
                                   (45, 130, 50)])
def test_random_matches_reference(dtype, n, e, k):
    gen = torch.Generator().manual_seed(n + 7 * e)
    frames = torch.randn(n, e, generator=gen).to(dtype)
    query = torch.randn(e, generator=gen).to(dtype)
    _check(frames, query, k)
    _check(frames, query, k, thr=0.1, floor=0.0, fill=False)
    _check(frames, query, k, thr=0.3, floor=-1.0, fill=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_integer_duplicates_ties_exact(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n, e = (29, 37, 64, 3, 50, 11)[seed], (3, 4, 2, 5, 6, 1)[seed]
    pool = torch.randint(-2, 3, (max(1, n // 4), e), generator=gen).float()
    frames = pool[torch.randint(0, pool.shape[0], (n,), generator=gen)].to(dtype)
    query = torch.randint(-2, 3, (e,), generator=gen).to(dtype)
    for thr, floor, fill in ((0.85, None, True), (0.5, 0.0, False), (-1.0, None, True),
                             (1.0, -0.2, True), (0.0, 0.2, False)):
        _check(frames, query, (seed * 5) % (n + 3) + 1, thr, floor, fill)


def test_zero_rows_all_equal_and_nan():
    frames = torch.zeros(9, 6)
    frames[4, 0] = 1.0
    _check(frames, torch.zeros(6), 4)  # zero query: all rel 0, ties by index
    _check(frames, torch.ones(6), 9, fill=False)
    _check(torch.ones(10, 4), torch.randn(4), 3)  # one pick marks all; fill 4 and 7
    got = K.keyframe_select_fwd(torch.ones(10, 4), torch.randn(4), 3, 0.85, None, True)
    assert got[0].tolist() == [0, 4, 7]
    nanf = torch.eye(6)
    nanf[2, 1] = float("nan")
    got = _check(nanf, torch.ones(6), 6, fill=False)
    assert 2 not in got[0].tolist()
    got = _check(nanf, torch.full((6,), float("nan")), 3, fill=False)
    assert got[0].tolist() == [-1, -1, -1]
    _check(nanf, torch.full((6,), float("nan")), 3)  # released empty-selection fill


def test_all_below_floor_and_k_above_n():
    gen = torch.Generator().manual_seed(4)
    frames, query = torch.randn(23, 7, generator=gen), torch.randn(7, generator=gen)
    _check(frames, query, 8, floor=1.0)
    got = _check(frames, query, 8, floor=1.0, fill=False)
    assert got[0].tolist() == [-1] * 8 and got[1].tolist() == [-1] * 23
    got = _check(frames, query, 40)
    assert got[0].tolist() == list(range(23))


def test_strided_rows_and_columns():
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(60, 20, generator=gen)[::2]  # row stride 40
    cols = torch.randn(30, 40, generator=gen)[:, ::2]  # last dim stride 2: one copy
    query = torch.randn(20, generator=gen)
    _check(rows, query, 6)
    _check(cols, query, 6, thr=0.2)


def test_launch_structure(launched):
    gen = torch.Generator().manual_seed(0)
    frames, query = torch.randn(50, 16, generator=gen), torch.randn(16, generator=gen)
    K.keyframe_select_fwd(frames, query, 7, 0.85, None, True)
    names = [f.fn.__name__ if hasattr(f, "fn") else str(f) for f in launched]
    m = 7
    assert len(launched) == 2 * m, names
    assert names[0].endswith("prep_kernel") and names[1].endswith("pick_kernel")
    assert all(s.endswith("fwd_kernel") for s in names[2::2])
    assert all(s.endswith("pick_kernel") for s in names[3::2])
    launched.clear()
    K.keyframe_select_fwd(frames[:3], query, 7, 0.85, None, True)  # min(k, N) = 3
    assert len(launched) == 6
