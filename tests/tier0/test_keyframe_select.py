"""Tier 0: keyframe_select on CPU. The reference against a literal released-style oracle
(full N x N matrix, sorted walk, released gap fill), hand-checked fill examples, the C++
kernel against the reference (random, adversarial integer-valued inputs with duplicates,
ties, zero vectors, every option, every dtype), the device-side fill of the Triton launcher
(plain torch ops) against the reference fill, the reference-index helpers (incl. the
released indexing slip), opcheck, meta, torch.compile, bad input, memory (no N x N) and
O(k N) scaling."""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lvlm_fast.kernels.keyframe_select import compact, finish

import lvlm_fast  # noqa: F401  (loads the C++ kernels)
from lvlm_fast.ops import (
    keyframe_select,
    reference_index_from_keyframes,
    released_reference_index,
)
from lvlm_fast.ops.keyframe_select import reference_fwd

# the module, not the function of the same name that lvlm_fast.reference re-exports
R = importlib.import_module("lvlm_fast.reference.keyframe_select")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OP = torch.ops.lvlm_fast.keyframe_select.default
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- oracles
def _cos_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs cosine with the op's formula and operand order (rows of b are the
    'selected'/'query' side): dot / (|b_i| * |a_j|) -> (len(b), len(a))."""
    acc = R.acc_dtype(a.dtype)
    a, b = a.to(acc), b.to(acc)
    return (b @ a.T) / (R.row_norms(b)[:, None] * R.row_norms(a)[None, :])


def released_style(frame_emb, query_emb, k, threshold, floor):
    """The released SeqFrameSelector + distribute_frames, literally: the full N x N matrix,
    a descending walk that breaks at the floor before the visited test, then the gap fill
    with a binary search for the spacing (our tie rule: lower index first)."""
    n = frame_emb.shape[0]
    acc = R.acc_dtype(frame_emb.dtype)
    f2f = _cos_matrix(frame_emb, frame_emb)
    rel = _cos_matrix(frame_emb, query_emb[None])[0]
    order = sorted(range(n), key=lambda i: (-float(rel[i]), i))
    floor_v = None if floor is None else torch.tensor(floor, dtype=acc)
    visited = torch.zeros(n, dtype=torch.bool)
    selected = torch.zeros(n, dtype=torch.long)
    idx = 0
    while idx < n and int(selected.sum()) < k:
        cur = order[idx]
        if floor_v is not None and rel[cur] < floor_v:
            break
        if visited[cur]:
            idx += 1
            continue
        visited[cur] = True
        selected[cur] = 1
        visited |= f2f[cur] > torch.tensor(threshold, dtype=acc)
        idx += 1
    sel = selected.tolist()
    missing = k - sum(sel)
    ones = [i for i, s in enumerate(sel) if s]
    bounds = [-1, *ones, n]
    gaps = [(a + 1, b - 1) for a, b in itertools.pairwise(bounds) if a + 1 <= b - 1]

    def total(d):
        return sum(math.ceil((e - s + 1) / d) - 1 for s, e in gaps)

    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if total(mid) <= missing:
            hi = mid
        else:
            lo = mid + 1
    out = list(sel)
    got = 0
    for s, e in gaps:
        kg = math.ceil((e - s + 1) / lo) - 1
        if kg > 0:
            step = math.ceil((e - s + 1) / (kg + 1))
            for j in range(kg):
                out[min(s + step * (j + 1), e)] = 1
            got += kg
    rest = missing - got
    for s, e in reversed(gaps):
        for p in range(e, s - 1, -1):
            if rest > 0 and out[p] == 0:
                out[p] = 1
                rest -= 1
    return [i for i, o in enumerate(out) if o], ones


def _int_embeddings(draw, n, e, pool):
    """Small-integer rows (exact cosines in every dtype) drawn from a pool -> duplicates."""
    vals = st.integers(-2, 2)
    rows = [draw(st.lists(vals, min_size=e, max_size=e)) for _ in range(pool)]
    pick = draw(st.lists(st.integers(0, pool - 1), min_size=n, max_size=n))
    return torch.tensor([rows[i] for i in pick], dtype=torch.float64)


@st.composite
def int_case(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    e = draw(st.integers(1, 6))
    frames = _int_embeddings(draw, n, e, draw(st.integers(1, max(1, n))))
    query = torch.tensor(draw(st.lists(st.integers(-2, 2), min_size=e, max_size=e)),
                         dtype=torch.float64)
    k = draw(st.integers(1, n + 3))
    thr = draw(st.sampled_from([-1.0, -0.5, 0.0, 0.3, 0.5, 0.85, 0.99, 1.0]))
    floor = draw(st.sampled_from([None, -1.0, -0.2, 0.0, 0.2, 0.5, 1.0]))
    return frames, query, k, thr, floor


def _op(frames, query, k, thr=0.85, floor=None, fill=True):
    return keyframe_select(frames, query, k, threshold=thr, min_relevance=floor, fill=fill)


def _ref(frames, query, k, thr=0.85, floor=None, fill=True):
    return R.keyframe_select(frames, query, k, threshold=thr, min_relevance=floor, fill=fill)


def _same(a, b, msg=""):
    assert a[0].dtype == b[0].dtype == torch.int64 and a[1].dtype == torch.int64, msg
    assert torch.equal(a[0], b[0]), f"indices {a[0].tolist()} != {b[0].tolist()} {msg}"
    assert torch.equal(a[1], b[1]), f"ref_index {a[1].tolist()} != {b[1].tolist()} {msg}"


# --------------------------------------------------------------------------- the C++ kernel is live
def test_cpu_kernel_is_the_cpp_one():
    dump = torch._C._dispatch_dump("lvlm_fast::keyframe_select")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "keyframe_select.cpp" in cpu_line, cpu_line


# --------------------------------------------------------------------------- reference anchors
@settings(max_examples=150, deadline=None)
@given(int_case())
def test_reference_matches_released_style(case):
    frames, query, k, thr, floor = case
    want, greedy = released_style(frames, query, k, thr, floor)
    assert sorted(R.greedy_select(frames, query, k, thr, floor)) == greedy
    got = _ref(frames, query, k, thr, floor)
    assert got[0].tolist() == want
    assert len(want) == min(k, frames.shape[0])


def test_released_fill_examples_by_hand():
    # nothing selected, N=100, K=32: D=4 -> 24 frames 4, 8, ..., 96, then the 8 missing
    # ones are the highest free frames 99, 98, 97, 95, 94, 93, 91, 90
    want = sorted([*range(4, 100, 4), 99, 98, 97, 95, 94, 93, 91, 90])
    assert R.budget_fill([], 100, 32) == want
    # one frame (0) selected, N=10, K=3: gap [1, 9], 2 missing -> D=3, step 3: 4 and 7
    assert R.budget_fill([0], 10, 3) == [0, 4, 7]
    # budget already met: nothing added
    assert R.budget_fill([3, 7], 10, 2) == [3, 7]
    # K >= N: every frame
    assert R.budget_fill([2], 5, 9) == [0, 1, 2, 3, 4]
    # N = 1
    assert R.budget_fill([], 1, 4) == [0]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 400), st.data())
def test_fill_positions_never_clip(length, data):
    # the release clips start + j*step to the gap end; for spacings it can pick the clip
    # never fires (so the count is exact and no frame is chosen twice)
    d = data.draw(st.integers(1, length))
    kg = math.ceil(length / d) - 1
    if kg > 0:
        assert math.ceil(length / (kg + 1)) * kg <= length - 1


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 60), st.data())
def test_fill_count_and_superset(n, data):
    k = data.draw(st.integers(1, n + 5))
    sel = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=min(k, n))))
    out = R.budget_fill(sel, n, k)
    assert len(out) == min(k, n) and len(set(out)) == len(out)
    assert set(sel) <= set(out) and all(0 <= i < n for i in out)


# --------------------------------------------------------------------------- C++ == reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,e,k", [(1, 8, 1), (1, 8, 5), (7, 3, 3), (100, 16, 32), (333, 64, 20),
                                   (257, 5, 300), (600, 512, 32)])
@pytest.mark.parametrize("floor", [None, 0.05, -1.0])
def test_matches_reference_random(dtype, n, e, k, floor):
    gen = torch.Generator().manual_seed(n * 131 + e)
    frames = torch.randn(n, e, generator=gen).to(dtype)
    query = torch.randn(e, generator=gen).to(dtype)
    for thr, fill in ((0.85, True), (0.1, False), (0.3, True)):
        _same(_op(frames, query, k, thr, floor, fill), _ref(frames, query, k, thr, floor, fill),
              f"{dtype} n={n} e={e} k={k} thr={thr} floor={floor} fill={fill}")


@settings(max_examples=300, deadline=None)
@given(int_case(), st.sampled_from(DTYPES), st.booleans())
def test_matches_reference_adversarial(case, dtype, fill):
    frames, query, k, thr, floor = case
    f, q = frames.to(dtype), query.to(dtype)
    _same(_op(f, q, k, thr, floor, fill), _ref(f, q, k, thr, floor, fill))


def test_matches_reference_clustered_long():
    # many near-duplicates: the walk rejects most frames (the lazy-visited path)
    gen = torch.Generator().manual_seed(3)
    cent = torch.randn(12, 48, generator=gen)
    frames = cent[torch.randint(0, 12, (1500,), generator=gen)]
    frames = frames + 0.05 * torch.randn(1500, 48, generator=gen)
    query = torch.randn(48, generator=gen)
    for k in (1, 5, 12, 13, 32):
        _same(_op(frames, query, k), _ref(frames, query, k), f"k={k}")
        _same(_op(frames, query, k, fill=False), _ref(frames, query, k, fill=False))


def test_fallback_reference_is_schema_shaped():
    frames, query = torch.randn(20, 6), torch.randn(1, 6)
    _same(reference_fwd(frames, query, 4, 0.85, None, True), OP(frames, query[0], 4, 0.85,
                                                                 None, True))


# --------------------------------------------------------------------------- definitions
def test_ties_go_to_the_lower_index():
    # equal relevance, dissimilar frames: the lower frame index is visited first
    frames = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    query = torch.tensor([1.0, 1.0])
    assert _op(frames, query, 1, fill=False)[0].tolist() == [0]
    assert _op(frames.flip(0), query, 1, fill=False)[0].tolist() == [0]


def test_all_equal_embeddings():
    frames = torch.ones(10, 4)
    idx, ref = _op(frames, torch.randn(4), 3)
    assert idx.tolist() == [0, 4, 7]  # frame 0 marks all others; the fill adds 4 and 7
    assert ref.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    idx, ref = _op(frames, torch.randn(4), 3, fill=False)
    assert idx.tolist() == [0, -1, -1] and ref.tolist() == [0] * 10


def test_zero_vectors_have_cosine_zero():
    frames = torch.zeros(6, 5)
    frames[2] = torch.tensor([1.0, 0, 0, 0, 0])
    query = torch.tensor([1.0, 0, 0, 0, 0])
    # rel = 1 for frame 2, 0 for the zero frames; a zero frame is similar to nothing (cos 0)
    idx, _ = _op(frames, query, 6, fill=False)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5]
    idx, ref = _op(frames, torch.zeros(5), 3, fill=False)  # zero query: all rel 0 -> ties
    assert idx.tolist() == [0, 1, 2] and ref.tolist() == [0, 1, 2, 2, 2, 2]
    _same(_op(frames, torch.zeros(5), 3), _ref(frames, torch.zeros(5), 3))


def test_nan_relevance_is_never_selected_by_the_walk():
    frames = torch.eye(5)
    frames[1, 0] = float("nan")
    query = torch.ones(5)
    idx, _ = _op(frames, query, 5, fill=False)
    assert 1 not in idx.tolist() and idx.tolist() == [0, 2, 3, 4, -1]
    idx, _ = _op(frames, query, 5)  # ... but the fill may still add it
    assert idx.tolist() == [0, 1, 2, 3, 4]
    _same(_op(frames, query, 3), _ref(frames, query, 3))
    # a NaN query: nothing is eligible, so the result is the released empty-selection fill
    nanq = torch.full((5,), float("nan"))
    assert _op(frames, nanq, 2, fill=False)[0].tolist() == [-1, -1]
    assert _op(frames, nanq, 2)[0].tolist() == R.budget_fill([], 5, 2)


def test_all_below_floor_gives_the_empty_fill():
    gen = torch.Generator().manual_seed(1)
    frames, query = torch.randn(100, 8, generator=gen), torch.randn(8, generator=gen)
    idx, ref = _op(frames, query, 32, floor=1.0)  # cos < 1 for every frame
    assert idx.tolist() == R.budget_fill([], 100, 32)
    assert ref.tolist() == R.reference_index(idx.tolist(), 100)
    idx, ref = _op(frames, query, 32, floor=1.0, fill=False)
    assert idx.tolist() == [-1] * 32 and ref.tolist() == [-1] * 100


def test_k_larger_than_n_and_one_frame():
    frames, query = torch.randn(7, 4), torch.randn(4)
    idx, ref = _op(frames, query, 50)
    assert idx.tolist() == list(range(7)) and ref.tolist() == list(range(7))
    idx, ref = _op(torch.randn(1, 4), query, 3)
    assert idx.tolist() == [0] and ref.tolist() == [0]
    idx, ref = _op(torch.randn(1, 4), query, 1, floor=1.0, fill=False)
    assert idx.tolist() == [-1] and ref.tolist() == [-1]


def test_threshold_controls_redundancy():
    # two near-identical frames (cos ~0.995) and one orthogonal frame
    frames = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    query = torch.tensor([1.0, 0.2, 0.1])  # rel: frame 0 > frame 1 > frame 2 > 0
    assert _op(frames, query, 3, thr=0.85, fill=False)[0].tolist() == [0, 2, -1]
    assert _op(frames, query, 3, thr=0.999, fill=False)[0].tolist() == [0, 1, 2]
    # threshold -1: frame 0 marks every frame with cosine > -1, i.e. all of them
    assert _op(frames, query, 3, thr=-1.0, fill=False)[0].tolist() == [0, -1, -1]


@pytest.mark.parametrize("layout", ["transposed", "col_strided", "row_strided",
                                    "query_strided"])
def test_non_contiguous_inputs(layout):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(90, 24, generator=gen)
    query = torch.randn(24, generator=gen)
    if layout == "transposed":
        frames = base.T.contiguous().T  # last dim stride 90
    elif layout == "col_strided":
        frames = torch.randn(90, 48, generator=gen)[:, ::2]  # last dim stride 2
    elif layout == "row_strided":
        frames = torch.randn(180, 24, generator=gen)[::2]  # rows 48 apart, unit last dim
    else:
        frames = base
        query = torch.randn(48, generator=gen)[::2]
    assert not (frames.is_contiguous() and query.is_contiguous())
    _same(_op(frames, query, 10), _op(frames.contiguous(), query.contiguous(), 10))
    _same(_op(frames, query, 10), _ref(frames, query, 10))


def test_query_as_row_vector():
    frames, query = torch.randn(30, 8), torch.randn(8)
    _same(_op(frames, query[None], 5), _op(frames, query, 5))


# --------------------------------------------------------------------------- device-side fill
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 70), st.data())
def test_launcher_fill_matches_reference(n, data):
    k = data.draw(st.integers(1, n + 5))
    m = min(k, n)
    sel = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=m))
    picks = torch.tensor(sel + [-1] * (m - len(sel)), dtype=torch.int64)
    for fill in (True, False):
        idx, ref = finish(picks, n, k, fill)
        want = R.budget_fill(sel, n, k) if fill else sorted(sel)
        want = want + [-1] * (m - len(want))
        assert idx.tolist() == want
        assert ref.tolist() == R.reference_index([i for i in want if i >= 0], n)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 70), st.data())
def test_compact_equals_nonzero_static(n, data):
    # issue 9.3: the launcher compacts with a scatter (nonzero_static has no CUDA kernel
    # before torch 2.6); the result is nonzero_static's, also when fewer than m are set and
    # when more than m are set (the extra ones are cut off)
    sel = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    m = data.draw(st.integers(1, n + 3))
    rank = torch.cumsum(sel, 0, dtype=torch.int64) - 1
    want = torch.nonzero_static(sel, size=m, fill_value=-1).reshape(m)
    assert compact(sel, rank, m).tolist() == want.tolist()


def test_finish_does_not_call_nonzero_static(monkeypatch):
    # issue 9.3: pins the op away from nonzero_static (torch < 2.6 has no CUDA kernel)
    def boom(*a, **k):
        raise AssertionError("nonzero_static called")

    monkeypatch.setattr(torch, "nonzero_static", boom)
    idx, ref = finish(torch.tensor([4, -1, 1]), 6, 3, False)
    assert idx.tolist() == [1, 4, -1] and ref.tolist() == [-1, 0, 0, 0, 1, 1]
    idx, _ = finish(torch.tensor([4, -1, 1]), 6, 3, True)
    assert idx.tolist() == R.budget_fill([4, 1], 6, 3)


# --------------------------------------------------------------------------- index helpers
def test_reference_index_examples():
    idx = torch.tensor([2, 5, 9])
    assert reference_index_from_keyframes(idx, 12).tolist() == [-1, -1, 0, 0, 0, 1, 1, 1, 1,
                                                                2, 2, 2]
    # the release: frames before the first keyframe -> themselves; segment i -> frame i
    assert released_reference_index(idx, 12).tolist() == [0, 1, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    padded = torch.tensor([3, 6, -1, -1])
    assert reference_index_from_keyframes(padded, 8).tolist() == [-1, -1, -1, 0, 0, 0, 1, 1]
    assert released_reference_index(padded, 8).tolist() == [0, 1, 2, 0, 0, 0, 1, 1]
    assert released_reference_index(torch.tensor([-1, -1]), 3).tolist() == [0, 1, 2]
    assert reference_index_from_keyframes(torch.tensor([0], dtype=torch.int32), 3).tolist() == [
        0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.data())
def test_reference_index_matches_loops(n, data):
    kf = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n)))
    pad = data.draw(st.integers(0, 3))
    idx = torch.tensor(kf + [-1] * pad, dtype=torch.int64)
    assert reference_index_from_keyframes(idx, n).tolist() == R.reference_index(kf, n)
    assert released_reference_index(idx, n).tolist() == R.released_reference_index(kf, n)


def test_released_reference_rows_reproduce_the_release():
    # The released sig_pooling / average_pooling_res build the per-frame reference from
    # img_embs (ALL frames): img_embs[:first], then img_embs[i] repeated over segment i.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 3, 4, generator=gen)
    for kf in ([3, 8, 15], [0, 4], [19], [0, 1, 2, 3]):
        bounds = [*kf, 20]
        pieces = [x[: bounds[0]]] if bounds[0] > 0 else []
        for i in range(len(bounds) - 1):
            pieces.append(x[i].unsqueeze(0).repeat(bounds[i + 1] - bounds[i], 1, 1))
        released = torch.cat(pieces)
        got = x[released_reference_index(torch.tensor(kf), 20)]
        assert torch.equal(got, released)
        # the paper's reading: the segment's own keyframe (bank = keyframe features)
        ours = reference_index_from_keyframes(torch.tensor(kf), 20)
        bank = x[torch.tensor(kf)]
        for f in range(20):
            if ours[f] >= 0:
                assert torch.equal(bank[ours[f]], x[max(k for k in kf if k <= f)])


def test_op_ref_index_is_the_helper():
    frames, query = torch.randn(64, 8), torch.randn(8)
    for fill in (True, False):
        idx, ref = _op(frames, query, 9, floor=0.2, fill=fill)
        assert torch.equal(ref, reference_index_from_keyframes(idx, 64))


@pytest.mark.parametrize("bad,num,exc,words", [
    (torch.tensor([3, 1]), 5, ValueError, "strictly increasing"),
    (torch.tensor([1, 1]), 5, ValueError, "strictly increasing"),
    (torch.tensor([1, 7]), 5, ValueError, "num_frames"),
    (torch.tensor([1, -1, 3]), 5, ValueError, "padding"),
    (torch.tensor([-2]), 5, ValueError, "padding"),
    (torch.tensor([1.0]), 5, TypeError, "indices"),
    (torch.tensor([[1]]), 5, ValueError, "indices"),
    ([1, 2], 5, TypeError, "indices"),
    (torch.tensor([1]), 0, ValueError, "num_frames"),
    (torch.tensor([1]), 2.0, TypeError, "num_frames"),
])
def test_index_helpers_bad_input(bad, num, exc, words):
    for fn in (reference_index_from_keyframes, released_reference_index):
        with pytest.raises(exc, match=words):
            fn(bad, num)


# --------------------------------------------------------------------------- opcheck, meta, compile
@pytest.mark.parametrize("args", [
    (20, 6, 5, 0.85, None, True),
    (20, 6, 5, 0.3, 0.1, False),
    (9, 4, 30, 0.85, None, True),
    (1, 4, 2, 0.85, -1.0, True),
])
def test_opcheck(args):
    n, e, k, thr, floor, fill = args
    frames = torch.randn(n, e, dtype=torch.float64)
    torch.library.opcheck(OP, (frames, torch.randn(e, dtype=torch.float64), k, thr, floor, fill))
    frames = torch.randn(n, e, requires_grad=True)
    torch.library.opcheck(OP, (frames, torch.randn(e), k, thr, floor, fill))


@pytest.mark.parametrize("n,k", [(50, 8), (5, 8), (1, 1)])
def test_meta_shapes(n, k):
    frames = torch.empty(n, 16, device="meta", dtype=torch.bfloat16)
    query = torch.empty(16, device="meta", dtype=torch.bfloat16)
    for fill in (True, False):
        idx, ref = keyframe_select(frames, query, k, fill=fill)
        assert idx.device.type == "meta" and idx.shape == (min(k, n),) and idx.dtype == torch.int64
        assert ref.shape == (n,) and ref.dtype == torch.int64


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()

    def fn(frames, query):
        idx, ref = keyframe_select(frames, query, 8, threshold=0.5, min_relevance=0.0)
        return idx, ref + 1

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for n in (40, 57, 5):
        frames, query = torch.randn(n, 12), torch.randn(12)
        got, want = compiled(frames, query), fn(frames, query)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------- bad input
F2, Q2 = torch.randn(10, 4), torch.randn(4)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: keyframe_select(torch.randn(2, 10, 4), Q2, 3), ValueError, "frame_emb"),
    (lambda: keyframe_select(torch.randn(0, 4), Q2, 3), ValueError, "frame_emb"),
    (lambda: keyframe_select(torch.randn(10, 0), torch.randn(0), 3), ValueError, "frame_emb"),
    (lambda: keyframe_select(F2, torch.randn(5), 3), ValueError, "query_emb"),
    (lambda: keyframe_select(F2, torch.randn(2, 4), 3), ValueError, "query_emb"),
    (lambda: keyframe_select(F2, torch.randn(1, 1, 4), 3), ValueError, "query_emb"),
    (lambda: keyframe_select(F2.int(), Q2.int(), 3), TypeError, "frame_emb"),
    (lambda: keyframe_select(F2, Q2.double(), 3), TypeError, "query_emb"),
    (lambda: keyframe_select(F2, Q2.to("meta"), 3), ValueError, "query_emb"),
    (lambda: keyframe_select(F2.numpy(), Q2, 3), TypeError, "frame_emb"),
    (lambda: keyframe_select(F2, Q2, 0), ValueError, "k must be >= 1"),
    (lambda: keyframe_select(F2, Q2, -3), ValueError, "k must be >= 1"),
    (lambda: keyframe_select(F2, Q2, 2.0), TypeError, "k must be an int"),
    (lambda: keyframe_select(F2, Q2, True), TypeError, "k must be an int"),
    (lambda: keyframe_select(F2, Q2, 3, threshold=1.5), ValueError, "threshold"),
    (lambda: keyframe_select(F2, Q2, 3, threshold=-1.01), ValueError, "threshold"),
    (lambda: keyframe_select(F2, Q2, 3, threshold=float("nan")), ValueError, "threshold"),
    (lambda: keyframe_select(F2, Q2, 3, threshold="0.8"), TypeError, "threshold"),
    (lambda: keyframe_select(F2, Q2, 3, min_relevance=float("nan")), ValueError,
     "min_relevance"),
    (lambda: keyframe_select(F2, Q2, 3, min_relevance=float("inf")), ValueError,
     "min_relevance"),
    (lambda: keyframe_select(F2, Q2, 3, min_relevance="x"), TypeError, "min_relevance"),
    (lambda: keyframe_select(F2, Q2, 3, fill=1), TypeError, "fill"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("args,words", [
    ((F2, Q2, 0, 0.85, None, True), "k must be"),
    ((F2, torch.randn(5), 3, 0.85, None, True), "query_emb"),
    ((torch.randn(10), Q2, 3, 0.85, None, True), "frame_emb"),
    ((F2, Q2.double(), 3, 0.85, None, True), "dtype"),
    ((F2, Q2, 3, 2.0, None, True), "threshold"),
    ((F2, Q2, 3, 0.85, float("nan"), True), "min_relevance"),
])
def test_raw_op_checks_instead_of_crashing(args, words):
    with pytest.raises(RuntimeError, match=words):
        OP(*args)


# --------------------------------------------------------------------------- memory and work
_MEM_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    import lvlm_fast
    from lvlm_fast.ops import keyframe_select
    import torch.nn.functional as F

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.manual_seed(0)
    n, e = 10240, 512
    frames, query = torch.randn(n, e), torch.randn(e)
    keyframe_select(frames[:64], query, 4)  # lazy initialisation out of the way
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
    base = status("VmRSS")
    if sys.argv[1] == "op":
        for dt in (torch.float32, torch.bfloat16):
            f, q = frames.to(dt), query.to(dt)
            base = max(base, status("VmRSS"))
            keyframe_select(f, q, 32)
            keyframe_select(f, q, 32, min_relevance=0.2)
    else:  # positive control: the released way, an N x N matrix
        a = F.normalize(frames, dim=1)
        sim = a @ a.T
        del sim
    print((status("VmHWM") - base) * 1024)
""")


def _peak_growth(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, mode], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_no_n_by_n_memory():
    n = 10240
    nn_bytes = n * n * 4  # 400 MiB
    control = _peak_growth("nxn")
    assert control > 0.8 * nn_bytes, f"the measurement misses an N x N matrix ({control} B)"
    grown = _peak_growth("op")
    assert grown < nn_bytes / 16, f"peak RSS grew by {grown} B"


def test_no_large_torch_allocation_inside_the_op():
    from torch.profiler import ProfilerActivity, profile

    n, e = 10240, 512
    frames, query = torch.randn(n, e).to(torch.bfloat16), torch.randn(e).to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keyframe_select(frames, query, 32)
    biggest = max((ev.cpu_memory_usage for ev in prof.events()), default=0)
    assert biggest <= n * 8 + 4096, f"allocation of {biggest} B inside keyframe_select"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.nn.functional.normalize(frames.float(), dim=1)
        _ = a @ a.T
    assert max(ev.cpu_memory_usage for ev in prof.events()) >= n * n * 4  # tracker works


def _cpu_ms(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def test_work_scales_linearly_in_frames():
    # Clustered frames: after one pick per cluster the walk checks EVERY remaining frame
    # against the picks (the expensive path). Single thread, CPU time of this thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        cent = torch.randn(16, 256, generator=gen)
        query = torch.randn(256, generator=gen)

        def frames(n):
            lab = torch.randint(0, 16, (n,), generator=gen)
            return cent[lab] + 0.05 * torch.randn(n, 256, generator=gen)

        small, big = frames(4096), frames(16384)
        keyframe_select(small, query, 32)
        t_small = _cpu_ms(lambda: keyframe_select(small, query, 32))
        t_big = _cpu_ms(lambda: keyframe_select(big, query, 32))
        # 4x the frames: O(k N) work -> ~4x; an N x N pass would be ~16x
        assert t_big / t_small < 8.0, (t_small, t_big)
    finally:
        torch.set_num_threads(threads)
