"""Tier 1: context_content_pool Triton launchers (forward and backward) in the interpreter
vs the schema-shaped reference (lvlm_fast.ops.context_content_pool.reference_fwd /
reference_bwd, which tier 0 checks against autograd through the spec), computed in fp64.
fp32 and fp16 only; small shapes with non-powers of two (729 patches = 27 x 27 grid with
overlapping bins, C = 80 and 19, Lq = 5 / 17 / 70 (two query chunks), ragged P and C
blocks), content grids of 1 to 4 x 4 bins (one chunk) and 7 x 7, 9 x 9 (several
chunks), one frame, P = 1, per-frame queries, separate keys, non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import context_content_pool as K
from split_checks import assert_split_matches_whole  # tests/ is on sys.path

from lvlm_fast.ops.context_content_pool import reference_bwd, reference_fwd

TOL = {torch.float32: 2e-6, torch.float16: 3e-3}
FWD = {"_context_content_pool_fwd_kernel", "_context_content_pool_pool_kernel"}
BWD = {"_context_content_pool_bwd_prep_kernel", "_context_content_pool_bwd_kernel",
       "_context_content_pool_bwd_dq_kernel"}


def _close(name, got, want, dtype):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _inputs(n, p, lq, c, ck=None, per_frame=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, c, generator=g)
    q = torch.randn(*((n,) if per_frame else ()), lq, ck or c, generator=g)
    k = torch.randn(n, p, ck, generator=g) if ck else None
    return x, q, k


def _check(x, q, k, grid, dtype, launched, scale=None):
    x, q = x.to(dtype), q.to(dtype)
    k = k.to(dtype) if k is not None else None
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, lse = K.context_content_pool_fwd(x, q, k, scale, grid)
    d = lambda t: t.double() if t is not None else None
    want, want_lse = reference_fwd(d(x), d(q), d(k), scale, grid)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _close("out", out, want, dtype)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-4, atol=1e-4)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    gx, gq, gk = K.context_content_pool_bwd(go, x, q, k, scale, grid, lse)
    wgx, wgq, wgk = reference_bwd(d(go), d(x), d(q), d(k), scale, grid, want_lse)
    assert gx.dtype == dtype and gq.dtype == dtype
    _close("grad_x", gx, wgx, dtype)
    _close("grad_queries", gq, wgq, dtype)
    if k is not None:
        _close("grad_keys", gk, wgk, dtype)
    else:
        assert gk.numel() == 0
    for fn in launched:
        assert_interpreted(fn)
    names = {f.fn.__name__ for f in launched}
    assert names == FWD | BWD, names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "p", "lq", "c", "ck", "per_frame", "grid"), [
    (2, 16, 5, 19, None, False, 1),     # single score block, ragged C
    (2, 16, 5, 19, None, True, 4),      # per-frame queries, 4 x 4 grid (1 patch per bin)
    (1, 729, 17, 80, None, False, 4),   # 27 x 27 grid, overlapping bins, P blocks
    (2, 25, 3, 20, 7, True, 3),         # separate keys (Ck != C), 5 x 5 -> 3 x 3 overlap
    (1, 1, 4, 9, None, False, 1),       # P = 1
    (1, 9, 70, 10, None, False, 2),     # Lq = 70: two query chunks (fp32 accumulation)
    (2, 100, 40, 24, 16, False, 1),     # Lq = 40 (padded 64-row block), 64 x 128 single block
    # content bins in chunks of G_PAD = 16: 49 bins over a 27 x 27 grid (4 chunks, rows
    # shared by chunks), and 81 bins over 8 x 8 patches (bins smaller than patches: every
    # backward patch block meets all 81, 6 chunks), separate keys, per-frame queries
    (1, 729, 9, 20, None, False, 7),
    (2, 64, 5, 12, 6, True, 9),
])
def test_matches_reference(n, p, lq, c, ck, per_frame, grid, dtype, launched):
    x, q, k = _inputs(n, p, lq, c, ck, per_frame)
    _check(x, q, k, grid, dtype, launched)


@pytest.mark.parametrize("split", [False, True])
def test_multi_block_path_with_keys(monkeypatch, launched, split):
    # BLOCK_Q x next_pow2(P) > 8192: the two-pass (online lse) forward; separate keys. 2
    # frames split P by default; SPLIT_TARGET_PROGRAMS = 1 keeps one program per frame.
    if not split:
        monkeypatch.setattr(K, "SPLIT_TARGET_PROGRAMS", 1)
    x, q, k = _inputs(2, 300, 40, 12, ck=20, per_frame=True)
    assert not K.fwd_config(40, torch.float32, 300)["SINGLE_BLOCK"]
    assert (K.p_splits(2, 300)[0] > 1) == split
    _check(x, q, k, 1, torch.float32, launched)


# --------------------------------------------------------------------------- issue 14.5
# Split P at small N: grid (N, splits) for the forward (phase 1: partial lse per split;
# phase 2: merge, weights of the split's patches) and the backward prep (dw, partial D).
@pytest.fixture
def grids(monkeypatch, launched):
    """(kernel name, grid, PHASE) of every interpreted launch (on top of ``launched``)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    inner = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn.__name__, tuple(grid), kwargs.get("PHASE")))
        return inner(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _small_split_blocks(monkeypatch):
    # 16-patch split blocks, so that P = 49 (7 x 7) splits too (16, 16, 16, 1)
    monkeypatch.setattr(K, "SPLIT_BLOCK_P", 16)
    monkeypatch.setattr(K, "SPLIT_MIN_PATCHES", 16)


def test_split_chooser():
    # the default policy (diff_weighted_pool's): ~2 waves of 132 SMs, >= 64 patches a split
    assert K.p_splits(1, 256) == (4, 64)
    assert K.p_splits(3, 256) == (4, 64)
    assert K.p_splits(17, 256) == (4, 64)
    assert K.p_splits(3, 197) == (4, 64)     # 64, 64, 64, 5
    assert K.p_splits(17, 729) == (12, 64)
    assert K.p_splits(38, 729) == (6, 128)   # splits of two blocks
    assert K.p_splits(1, 49) == (1, 49)      # P <= SPLIT_MIN_PATCHES
    assert K.p_splits(1, 65) == (2, 64)      # 64, 1
    assert K.p_splits(264, 729) == (1, 729)  # N fills the GPU
    assert K.p_splits(1024, 256) == (1, 256)
    for n in range(1, 300, 7):
        for p in (1, 49, 64, 65, 196, 197, 256, 576, 729):
            sp, pps = K.p_splits(n, p)
            assert (sp == 1 and pps == p) or (sp > 1 and pps % 64 == 0
                                             and (sp - 1) * pps < p <= sp * pps)


SPLIT_CASES = [
    # n, p, lq, c, ck, per_frame, grid, small_blocks
    (1, 256, 32, 24, None, False, 1, False),   # LLaMA-VID-like P, one frame: 4 splits
    (3, 256, 70, 20, 12, True, 2, False),      # Lq = 70 (two chunks), keys, per-frame q
    (17, 256, 5, 16, None, False, 2, False),   # the wrapper's 17-frame vision chunk
    (3, 197, 32, 24, None, True, 1, False),    # ragged last split (5 patches)
    (2, 49, 70, 12, 8, False, 2, True),        # 7 x 7, 16-patch splits, last holds 1
    (1, 49, 32, 12, None, True, 1, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "p", "lq", "c", "ck", "per_frame", "grid", "small"), SPLIT_CASES)
def test_split_p_matches_reference(monkeypatch, grids, launched, n, p, lq, c, ck, per_frame,
                                   grid, small, dtype):
    if small:
        _small_split_blocks(monkeypatch)
    nsplit, _ = K.p_splits(n, p)
    assert nsplit > 1, "the case must exercise the split path"
    x, q, k = _inputs(n, p, lq, c, ck, per_frame, seed=n + p)
    _check(x, q, k, grid, dtype, launched)
    chunks = -(-lq // 64)
    fwd = [(g, ph) for name, g, ph in grids if name == "_context_content_pool_fwd_kernel"]
    assert fwd == [((n, nsplit), 1), ((n, nsplit), 2)] * chunks, fwd
    prep = [g for name, g, _ in grids if name == "_context_content_pool_bwd_prep_kernel"]
    assert prep == [(n, nsplit)] * chunks, prep


@pytest.mark.parametrize(("n", "p", "lq", "c", "ck", "per_frame", "grid", "small"), SPLIT_CASES)
def test_split_p_equals_unsplit_to_fp32_rounding(monkeypatch, n, p, lq, c, ck, per_frame,
                                                 grid, small):
    # the same call with one program per frame (SPLIT_TARGET_PROGRAMS = 1): equal up to fp32
    # rounding (the lse merge and the partial-D sum reassociate), and bitwise repeatable
    if small:
        _small_split_blocks(monkeypatch)
    x, q, k = _inputs(n, p, lq, c, ck, per_frame, seed=n + p)
    go = torch.randn(n, 1 + grid * grid, c, generator=torch.Generator().manual_seed(7))
    scale = q.shape[-1] ** -0.5

    def run():
        out, lse = K.context_content_pool_fwd(x, q, k, scale, grid)
        return (out, lse, *K.context_content_pool_bwd(go, x, q, k, scale, grid, lse))

    assert_split_matches_whole(K, monkeypatch, run, n, p, tol=2e-6)


def test_non_contiguous_inputs(launched):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 2, 30, generator=g)[:, :16, 1, 5:26]  # strided frames/patches
    q = torch.randn(21, 6, generator=g).t()  # strided channel dim (copied once)
    k = torch.randn(3, 32, 9, generator=g)[:, ::2]
    qk = torch.randn(3, 9, 6, generator=g).transpose(1, 2)
    assert not x.is_contiguous() and not k.is_contiguous()
    _check(x, q, None, 2, torch.float32, launched)
    _check(x, qk, k, 1, torch.float32, launched)


def test_large_scores_stable(launched):
    x, q, _ = _inputs(2, 30, 4, 8)
    out, _ = K.context_content_pool_fwd(x * 30, q * 30, None, 8**-0.5, 1)
    assert torch.isfinite(out).all()
    want, _ = reference_fwd((x * 30).double(), (q * 30).double(), None, 8**-0.5, 1)
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-3)


def test_transposed_and_expanded_inputs(launched):
    # issue 9.5 audit: frames as a transposed (P, N, C) view, per-frame queries broadcast over
    # the frames (stride 0) and a broadcast grad_out are all read through their strides
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, 19, generator=g).transpose(0, 1)  # patch stride 3 * 19
    qf = torch.randn(1, 5, 19, generator=g).expand(3, 5, 19)
    assert x.stride(1) == 57 and qf.stride(0) == 0
    _check(x, qf, None, 2, torch.float32, launched)
    _, lse = K.context_content_pool_fwd(x, qf, None, 0.3, 1)
    go = torch.randn(1, 2, 19, generator=g).expand(3, 2, 19)
    got = K.context_content_pool_bwd(go, x, qf, None, 0.3, 1, lse)
    want = K.context_content_pool_bwd(go.contiguous(), x.contiguous(), qf.contiguous(), None,
                                      0.3, 1, lse)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_frame_spanning_2_31_elements_is_made_contiguous(monkeypatch):
    # issue 9.6 audit: offsets inside a frame (patch * stride) are int32; x given as a
    # (P, N, C).transpose(0, 1) view of 10,240 SigLIP frames has a patch stride of N * C,
    # so patch 728 sits 8.6e9 elements in. The launcher (on the meta device, kernels
    # recorded, not run) must hand the kernels a copy whose frame spans P * C.
    seen = []

    class Rec:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(a)

    for name in ("_context_content_pool_fwd_kernel", "_context_content_pool_pool_kernel"):
        monkeypatch.setattr(K, name, Rec())
    n, p, c = 10_240, 729, 1152
    x = torch.empty(p, n, c, device="meta", dtype=torch.bfloat16).transpose(0, 1)
    q = torch.empty(32, c, device="meta", dtype=torch.bfloat16)
    K.context_content_pool_fwd(x, q, None, 0.1, 1)
    fwd_keys, pool_x = seen[0][1], seen[-1][0]
    assert fwd_keys.stride() == (p * c, c, 1) and pool_x.stride() == (p * c, c, 1)
    # a modest view keeps its strides (no copy)
    seen.clear()
    small = torch.empty(p, 8, c, device="meta", dtype=torch.bfloat16).transpose(0, 1)
    K.context_content_pool_fwd(small, q, None, 0.1, 1)
    assert seen[0][1].stride() == small.stride()


# --------------------------------------------------------------------------- issue 14.2.3
@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_deterministic_and_uses_no_atomics(monkeypatch, launched, per_frame, dtype):
    # grad_Q has no atomics: two runs are bitwise equal, and several frame groups (shared
    # queries: forced small DQ_TARGET_PROGRAMS -> 3 groups of 2-3 frames) sum in order
    monkeypatch.setattr(K, "DQ_TARGET_PROGRAMS", 3)
    x, q, _ = _inputs(7, 45, 5, 24, per_frame=per_frame, seed=3)
    x, q = x.to(dtype), q.to(dtype)
    assert K.dq_groups(7, 24, 32, not per_frame) == ((7, 1) if per_frame else (3, 3))
    out, lse = K.context_content_pool_fwd(x, q, None, 0.2, 1)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    a = K.context_content_pool_bwd(go, x, q, None, 0.2, 1, lse)
    b = K.context_content_pool_bwd(go, x, q, None, 0.2, 1, lse)
    for u, w in zip(a, b, strict=True):
        assert torch.equal(u, w)
    _, want_lse = reference_fwd(x.double(), q.double(), None, 0.2, 1)
    want = reference_bwd(go.double(), x.double(), q.double(), None, 0.2, 1, want_lse)
    _close("grad_x", a[0], want[0], dtype)
    _close("grad_queries", a[1], want[1], dtype)
    assert "_context_content_pool_bwd_dq_kernel" in {f.fn.__name__ for f in launched}


def test_no_atomics_in_any_kernel():
    # issue 14.2.3: every reduction in kernels/ is deterministic (per-program partials)
    import pathlib

    import lvlm_fast.kernels as pkg

    for d in pkg.__path__:
        for f in pathlib.Path(d).glob("*.py"):
            assert "atomic_" not in f.read_text().replace("no atomics", ""), f.name
