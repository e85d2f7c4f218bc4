"""Tier 0: slowfast_pool on CPU. The reference against torch's own pooling (the spec's
anchors), the C++ kernel against the reference (forward and backward, every option,
awkward shapes, ties, NaN), opcheck, gradcheck, meta shapes, torch.compile, bad input,
presets and the seed-style baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lvlm_fast  # noqa: F401  (loads the C++ kernels)
from benchmarks.seed.slowfast import seed_slowfast
from lvlm_fast.ops import SlowFastConfig, slowfast_pool
from lvlm_fast.ops.slowfast_pool import (
    frame_slots,
    num_tokens,
    reference_bwd,
    reference_fwd,
)
from lvlm_fast.reference.slowfast_pool import adaptive_bins, fast_pool, released_slow_index
from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_pool

OPT = dict(slow_kernel=(2, 2), slow_mode="avg", fast_grid=(4, 4), fast_frames="all",
           order="slow_fast")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(got, want, dtype, name=""):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g} (scale {scale:.3g})"


def _run_both(x, slow_index, separator=None, grad_seed=0, **opt):
    """Op (C++) and reference forward + backward on the same inputs."""
    o = {**OPT, **opt}
    xa = x.detach().clone().requires_grad_(True)
    sa = separator.detach().clone().requires_grad_(True) if separator is not None else None
    out = slowfast_pool(xa, slow_index=slow_index, separator=sa, **o)
    xr = x.detach().clone().requires_grad_(True)
    sr = separator.detach().clone().requires_grad_(True) if separator is not None else None
    want = ref_pool(xr, slow_index, separator=sr, **o)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.dtype)
    out.backward(g)
    want.backward(g)
    return (out, xa.grad, sa.grad if sa is not None else None), (
        want, xr.grad, sr.grad if sr is not None else None)


def _assert_same(x, slow_index, separator=None, **opt):
    (o, gx, gs), (wo, wgx, wgs) = _run_both(x, slow_index, separator, **opt)
    _close(o, wo, x.dtype, "out")
    _close(gx, wgx, x.dtype, "grad_x")
    if separator is not None:
        _close(gs, wgs, x.dtype, "grad_separator")
    return o


# --------------------------------------------------------------------------- the C++ kernel is live
def test_cpu_kernel_is_the_cpp_one():
    dump = torch._C._dispatch_dump("lvlm_fast::slowfast_pool")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "slowfast_pool.cpp" in cpu_line, cpu_line
    dump = torch._C._dispatch_dump("lvlm_fast::slowfast_pool_backward")
    cpu_line = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "slowfast_pool.cpp" in cpu_line, cpu_line


# --------------------------------------------------------------------------- reference anchors
@pytest.mark.parametrize("hw,grid", [((27, 27), (4, 4)), ((24, 24), (4, 4)), ((7, 5), (3, 2)),
                                     ((24, 24), (6, 6)), ((5, 9), (5, 4))])
def test_reference_fast_matches_adaptive_avg_pool2d(hw, grid):
    x = torch.randn(3, *hw, 6, dtype=torch.float64)
    want = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(fast_pool(x, grid), want)


def test_adaptive_bins_27_to_4():
    # bin i covers [floor(i*27/4), ceil((i+1)*27/4)): overlapping for non-dividing grids
    assert adaptive_bins(27, 4) == [(0, 7), (6, 14), (13, 21), (20, 27)]


def test_reference_slow_1d_max_is_released_maxpool1d():
    x = torch.randn(2, 24, 24, 5, dtype=torch.float64)
    out = ref_pool(x, torch.tensor([0, 1]), slow_kernel=(1, 2), slow_mode="max",
                   fast_grid=(1, 1), fast_frames="non_slow")
    flat = x.reshape(2, 576, 5).permute(0, 2, 1)
    want = F.max_pool1d(flat, 2, 2).permute(0, 2, 1).reshape(-1, 5)
    torch.testing.assert_close(out, want)
    assert out.shape == (2 * 288, 5)


def test_reference_slow_2x2_avg_is_avg_pool2d():
    x = torch.randn(2, 6, 8, 5, dtype=torch.float64)
    out = ref_pool(x, torch.tensor([0, 1]), fast_grid=(1, 1), fast_frames="non_slow")
    want = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2).reshape(-1, 5)
    torch.testing.assert_close(out, want)


def test_released_slow_index():
    assert released_slow_index(50, 10).tolist() == list(range(0, 50, 5))
    assert released_slow_index(128, 32).tolist() == list(range(0, 128, 4))
    assert SlowFastConfig.sf_llava().slow_index().tolist() == list(range(0, 50, 5))
    # non-dividing: linspace(0, 7, 4) = 0, 2.33, 4.67 -> 0, 2, 4 (truncation)
    assert released_slow_index(7, 3).tolist() == [0, 2, 4]


# --------------------------------------------------------------------------- C++ vs reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("fast_frames", ["all", "non_slow"])
@pytest.mark.parametrize("order", ["slow_fast", "interleaved"])
@pytest.mark.parametrize("with_sep", [False, True])
def test_matches_reference_all_options(dtype, mode, fast_frames, order, with_sep):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, 8, 19, generator=gen, dtype=torch.float64).to(dtype)
    sep = torch.randn(19, generator=gen, dtype=torch.float64).to(dtype) if with_sep else None
    out = _assert_same(x, torch.tensor([0, 3, 6]), sep, slow_kernel=(2, 2), slow_mode=mode,
                       fast_grid=(4, 3), fast_frames=fast_frames, order=order)
    assert out.dtype == dtype
    assert out.shape[0] == num_tokens(7, 3, 6, 8, (2, 2), (4, 3), fast_frames, order, with_sep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_setting_27x27_grid(dtype):
    # 27x27 (SigLIP-384): 3x3 slow windows, non-dividing 4x4 fast bins (overlapping)
    x = torch.randn(4, 27, 27, 80).to(dtype)
    _assert_same(x, torch.tensor([1, 3]), slow_kernel=(3, 3), slow_mode="max")
    _assert_same(x, torch.tensor([0]), slow_kernel=(3, 3), slow_mode="avg", fast_grid=(5, 4))


@pytest.mark.parametrize("kernel", [(1, 2), (2, 2)])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("hw,fast", [((6, 6), (4, 4)), ((24, 24), (5, 5)), ((8, 10), (3, 4))])
def test_window_path_bins_straddling_windows(kernel, mode, hw, fast):
    # the C++ window-at-a-time path (1x2, 2x2): windows whose columns fall in different
    # (overlapping) fast bins take the per-patch fallback inside the same frame
    x = torch.randn(3, *hw, 24, dtype=torch.float64)
    if mode == "max":
        x = x.round()
    _assert_same(x, torch.tensor([0, 2]), torch.randn(24, dtype=torch.float64),
                 slow_kernel=kernel, slow_mode=mode, fast_grid=fast, order="interleaved")


def test_one_frame_non_square_odd_d():
    x = torch.randn(1, 4, 10, 37, dtype=torch.float64)
    _assert_same(x, torch.tensor([0]), slow_kernel=(1, 2), slow_mode="max", fast_grid=(3, 4))
    _assert_same(x, torch.tensor([0]), slow_kernel=(4, 5), fast_grid=(1, 1))
    out = _assert_same(x, torch.tensor([0]), slow_kernel=(1, 1), fast_grid=(4, 10),
                       fast_frames="non_slow", order="interleaved")
    torch.testing.assert_close(out, x.reshape(40, 37))  # kernel 1x1 on the only frame: identity


def test_non_contiguous_inputs():
    base = torch.randn(6, 8, 12, 30, dtype=torch.float64)
    x = base[::2, :, 1:11]  # strided frames, sliced columns
    assert not x.is_contiguous()
    _assert_same(x, torch.tensor([0, 2]), slow_kernel=(2, 2), slow_mode="max", fast_grid=(3, 3))
    xt = base.transpose(1, 2)  # grid transposed: H and W strides swapped
    _assert_same(xt, torch.tensor([1]), slow_kernel=(3, 2))
    xd = torch.randn(3, 4, 4, 40, dtype=torch.float64)[..., ::2]  # channel dim stride 2
    assert xd.stride(-1) == 2
    _assert_same(xd, torch.tensor([0, 1]), slow_mode="max", fast_grid=(2, 2))


def test_three_d_input_with_grid_and_square_inference():
    x = torch.randn(3, 24, 7, dtype=torch.float64)
    a = slowfast_pool(x, grid=(4, 6), slow_stride=2)
    b = ref_pool(x.view(3, 4, 6, 7), torch.tensor([0, 2]), **OPT)
    torch.testing.assert_close(a, b)
    x = torch.randn(3, 36, 7, dtype=torch.float64)
    a = slowfast_pool(x, slow_stride=2)
    b = ref_pool(x.view(3, 6, 6, 7), torch.tensor([0, 2]), **OPT)
    torch.testing.assert_close(a, b)


def test_default_and_stride_slow_frames():
    x = torch.randn(10, 4, 4, 3, dtype=torch.float64)
    a = slowfast_pool(x)  # default: slow_stride=4 -> frames 0, 4, 8
    torch.testing.assert_close(a, ref_pool(x, torch.tensor([0, 4, 8]), **OPT))
    a = slowfast_pool(x, slow_stride=3)  # 0, 3, 6, 9
    torch.testing.assert_close(a, ref_pool(x, torch.tensor([0, 3, 6, 9]), **OPT))
    assert a.shape[0] == 4 * 4 + 10 * 16


def test_empty_slow_and_all_slow():
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    out = _assert_same(x, torch.zeros(0, dtype=torch.long), torch.randn(5, dtype=torch.float64))
    assert out.shape == (1 + 3 * 16, 5)
    out = _assert_same(x, torch.arange(3), fast_frames="non_slow", order="interleaved")
    assert out.shape == (3 * 6, 5)  # no fast tokens at all


def test_int32_slow_index():
    x = torch.randn(5, 4, 4, 8)
    a = slowfast_pool(x, slow_index=torch.tensor([1, 4], dtype=torch.int32))
    b = slowfast_pool(x, slow_index=torch.tensor([1, 4]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 5),
    sh=st.integers(1, 4), sw=st.integers(1, 4), kh=st.integers(1, 3), kw=st.integers(1, 3),
    d=st.integers(1, 21),
    fh_frac=st.floats(0.0, 1.0), fw_frac=st.floats(0.0, 1.0),
    mode=st.sampled_from(["avg", "max"]),
    fast_frames=st.sampled_from(["all", "non_slow"]),
    order=st.sampled_from(["slow_fast", "interleaved"]),
    with_sep=st.booleans(), transpose=st.booleans(), seed=st.integers(0, 2**16),
    slow_mask=st.integers(0, 31),
)
def test_hypothesis_matches_reference(t, sh, sw, kh, kw, d, fh_frac, fw_frac, mode,
                                      fast_frames, order, with_sep, transpose, seed, slow_mask):
    h, w = sh * kh, sw * kw
    fh, fw = max(1, round(fh_frac * h)), max(1, round(fw_frac * w))
    gen = torch.Generator().manual_seed(seed)
    if transpose:  # non-contiguous: the grid stored transposed
        x = torch.randn(t, w, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    else:
        x = torch.randn(t, h, w, d, generator=gen, dtype=torch.float64)
    if mode == "max":
        x = x.round()  # many ties: the first-max rule must agree everywhere
    idx = torch.tensor([i for i in range(t) if slow_mask >> i & 1], dtype=torch.long)
    sep = torch.randn(d, generator=gen, dtype=torch.float64) if with_sep else None
    _assert_same(x, idx, sep, slow_kernel=(kh, kw), slow_mode=mode, fast_grid=(fh, fw),
                 fast_frames=fast_frames, order=order, grad_seed=seed)


# --------------------------------------------------------------------------- ties, NaN, argmax
def test_max_ties_first_in_row_major_order():
    x = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    x[0, 0, 1, 0] = 1.0  # channel 0: unique max at window position 1
    x[0, 1, 0, 1] = x[0, 1, 1, 1] = 2.0  # channel 1: tie at positions 2 and 3 -> 2
    # channel 2: all zero -> position 0
    x.requires_grad_(True)
    out = slowfast_pool(x, slow_index=torch.tensor([0]), slow_mode="max", fast_grid=(1, 1),
                        fast_frames="non_slow")
    _, argmax = torch.ops.lvlm_fast.slowfast_pool(x, torch.tensor([0]), None, [2, 2], "max",
                                                  [1, 1], "non_slow", "slow_fast", True)
    assert argmax.tolist() == [[1, 2, 0]]
    out.sum().backward()
    want = torch.zeros_like(x)
    want[0, 0, 1, 0] = want[0, 1, 0, 1] = want[0, 0, 0, 2] = 1.0
    torch.testing.assert_close(x.grad, want)


def test_max_nan_propagates_first_nan_gets_gradient():
    x = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    x[0, 0, 1, 0] = float("nan")
    x[0, 0, 0, 0] = float("nan")
    x.requires_grad_(True)
    out = slowfast_pool(x, slow_index=torch.tensor([0]), slow_kernel=(1, 4), slow_mode="max",
                        fast_grid=(1, 1), fast_frames="non_slow")
    assert torch.isnan(out[0, 0]) and not torch.isnan(out[0, 1])
    out.sum().backward()
    assert x.grad[0, 0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_argmax_only_saved_when_needed():
    x = torch.randn(4, 4, 4, 8)
    _, am = torch.ops.lvlm_fast.slowfast_pool(x, torch.tensor([0, 2]), None, [2, 2], "max",
                                              [2, 2], "all", "slow_fast", False)
    assert am.numel() == 0
    _, am = torch.ops.lvlm_fast.slowfast_pool(x, torch.tensor([0, 2]), None, [2, 2], "max",
                                              [2, 2], "all", "slow_fast", True)
    assert am.shape == (2 * 4, 8) and am.dtype == torch.int32
    _, am = torch.ops.lvlm_fast.slowfast_pool(x, torch.tensor([0, 2]), None, [2, 2], "avg",
                                              [2, 2], "all", "slow_fast", True)
    assert am.numel() == 0
    xr = x.clone().requires_grad_(True)
    out, _ = torch.ops.lvlm_fast.slowfast_pool(xr, torch.tensor([0, 2]), None, [2, 2], "max",
                                               [2, 2], "all", "slow_fast", False)
    with pytest.raises(RuntimeError, match="need_argmax"):
        out.sum().backward()


# --------------------------------------------------------------------------- schema-level checks
def _op_args(dtype=torch.float64, mode="max", sep=True, order="interleaved", grad=True):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 6, 7, generator=gen, dtype=dtype).requires_grad_(grad)
    s = torch.randn(7, generator=gen, dtype=dtype).requires_grad_(grad) if sep else None
    return (x, torch.tensor([1, 3]), s, [2, 3], mode, [3, 4], "all", order, True)


@pytest.mark.parametrize("mode,sep,order", [("max", True, "interleaved"),
                                            ("avg", False, "slow_fast"),
                                            ("avg", True, "slow_fast")])
def test_opcheck(mode, sep, order):
    args = _op_args(torch.float32, mode, sep, order)
    torch.library.opcheck(torch.ops.lvlm_fast.slowfast_pool.default, args)
    x, idx, _, sk, m, fg, ff, o, _ = args
    out, am = torch.ops.lvlm_fast.slowfast_pool(*args)
    bargs = (torch.randn_like(out), am, idx, list(x.shape), sep, sk, m, fg, ff, o)
    torch.library.opcheck(torch.ops.lvlm_fast.slowfast_pool_backward.default, bargs)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_gradcheck_fp64(mode):
    x, idx, s, *_ = _op_args(torch.float64, mode)
    f = lambda x, s: slowfast_pool(x, slow_index=idx, slow_kernel=(2, 3), slow_mode=mode,
                                   fast_grid=(3, 4), order="interleaved", separator=s)
    assert torch.autograd.gradcheck(f, (x, s))


def test_cpu_fallback_matches_cpp():
    # the schema-shaped reference (used only when the C++ build is missing) is a second,
    # independent backward: scatter by window / bin instead of autograd
    for mode in ("avg", "max"):
        args = _op_args(torch.float64, mode, grad=False)
        out, am = torch.ops.lvlm_fast.slowfast_pool(*args)
        rout, ram = reference_fwd(*args)
        torch.testing.assert_close(out, rout)
        torch.testing.assert_close(am, ram)
        x, idx, _, sk, m, fg, ff, o, _ = args
        g = torch.randn_like(out)
        got = torch.ops.lvlm_fast.slowfast_pool_backward(g, am, idx, list(x.shape), True, sk, m,
                                                         fg, ff, o)
        want = reference_bwd(g, am, idx, list(x.shape), True, sk, m, fg, ff, o)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


def test_frame_slots_layout():
    slow, fast, sep, rank = frame_slots(torch.tensor([0, 2]), 4, 5, 3, True, "all",
                                        "slow_fast")
    assert slow.tolist() == [0, -1, 5, -1] and rank.tolist() == [0, -1, 1, -1]
    assert fast.tolist() == [11, 14, 17, 20] and sep.tolist() == [10, -1, -1, -1]
    slow, fast, sep, _ = frame_slots(torch.tensor([0, 2]), 4, 5, 3, True, "non_slow",
                                     "interleaved")
    # frame 0: slow 0..4, sep 5 | frame 1: fast 6..8, sep 9 | frame 2: slow 10..14, sep 15 | ...
    assert slow.tolist() == [0, -1, 10, -1] and fast.tolist() == [-1, 6, -1, 16]
    assert sep.tolist() == [5, 9, 15, 19]


# --------------------------------------------------------------------------- meta, compile
def test_meta_shapes():
    x = torch.empty(128, 24, 24, 1152, device="meta")
    idx = torch.empty(32, dtype=torch.long, device="meta")
    out = slowfast_pool(x, slow_index=idx, fast_grid=(6, 6))
    assert out.shape == (9216, 1152) and out.device.type == "meta"
    sep = torch.empty(1152, device="meta")
    out = slowfast_pool(x, slow_index=idx, slow_kernel=(1, 2), slow_mode="max",
                        order="interleaved", separator=sep)
    assert out.shape == (32 * 288 + 128 * 16 + 128, 1152)
    out = slowfast_pool(x.view(128, 576, 1152), slow_stride=5, fast_frames="non_slow")
    assert out.shape == (26 * 144 + 102 * 16, 1152)


def test_torch_compile_fullgraph():
    def f(x, idx, sep):
        return slowfast_pool(x, slow_index=idx, slow_kernel=(1, 2), slow_mode="max",
                             fast_grid=(3, 3), separator=sep)

    x = torch.randn(6, 6, 8, 16)
    idx, sep = torch.tensor([0, 3]), torch.randn(16)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, idx, sep), f(x, idx, sep))
    xg = x.clone().requires_grad_(True)
    compiled(xg, idx, sep).sum().backward()
    xr = x.clone().requires_grad_(True)
    f(xr, idx, sep).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


# --------------------------------------------------------------------------- bad input
X = torch.randn(6, 4, 6, 8)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(slow_index=torch.tensor([0, 6])), ValueError, ["slow_index", "[0, 6)"]),
    (dict(slow_index=torch.tensor([-1, 2])), ValueError, ["slow_index"]),
    (dict(slow_index=torch.tensor([3, 1])), ValueError, ["slow_index", "strictly increasing"]),
    (dict(slow_index=torch.tensor([1, 1])), ValueError, ["slow_index", "strictly increasing"]),
    (dict(slow_index=torch.arange(7)), ValueError, ["slow_index", "at most"]),
    (dict(slow_index=torch.tensor([[0]])), ValueError, ["slow_index", "1-D"]),
    (dict(slow_index=torch.tensor([0.0])), TypeError, ["slow_index", "int"]),
    (dict(slow_index=[0, 2]), TypeError, ["slow_index"]),
    (dict(slow_index=torch.tensor([0]), slow_stride=2), ValueError, ["slow_stride",
                                                                     "slow_index"]),
    (dict(slow_stride=0), ValueError, ["slow_stride"]),
    (dict(slow_stride=2.0), TypeError, ["slow_stride"]),
    (dict(slow_kernel=(3, 2)), ValueError, ["slow_kernel", "(4, 6)"]),
    (dict(slow_kernel=(2, 4)), ValueError, ["slow_kernel", "grid"]),
    (dict(slow_kernel=(0, 2)), ValueError, ["slow_kernel"]),
    (dict(slow_kernel=2), TypeError, ["slow_kernel"]),
    (dict(fast_grid=(5, 4)), ValueError, ["fast_grid", "(4, 6)"]),
    (dict(fast_grid=(4, 7)), ValueError, ["fast_grid"]),
    (dict(fast_grid=(0, 1)), ValueError, ["fast_grid"]),
    (dict(slow_mode="mean"), ValueError, ["slow_mode"]),
    (dict(fast_frames="slow"), ValueError, ["fast_frames"]),
    (dict(order="fast_slow"), ValueError, ["order"]),
    (dict(separator=torch.randn(7)), ValueError, ["separator", "D"]),
    (dict(separator=torch.randn(8, dtype=torch.float64)), TypeError, ["separator", "dtype"]),
    (dict(separator=torch.randn(1, 8)), ValueError, ["separator"]),
    (dict(separator=torch.empty(8, device="meta")), ValueError, ["separator", "on meta"]),
    (dict(slow_index=torch.tensor([0], device="meta")), ValueError, ["slow_index", "on meta"]),
    (dict(grid=(4, 5)), ValueError, ["grid"]),
])
def test_bad_input(kwargs, exc, words):
    with pytest.raises(exc) as info:
        slowfast_pool(X, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("x,kwargs,exc,words", [
    (torch.randn(4, 8), {}, ValueError, ["x", "3-D or 4-D"]),
    (torch.zeros(2, 4, 4, 3, dtype=torch.int64), {}, TypeError, ["x", "float"]),
    ([[1.0]], {}, TypeError, ["x"]),
    (torch.randn(2, 10, 3), {}, ValueError, ["grid", "square"]),
    (torch.randn(2, 12, 3), dict(grid=(3, 5)), ValueError, ["grid", "12"]),
    (torch.randn(0, 4, 4, 3), {}, ValueError, ["T, H, W, D >= 1"]),
    (torch.randn(2, 4, 4, 3).half(), dict(separator=torch.randn(3)), TypeError, ["separator"]),
])
def test_bad_x(x, kwargs, exc, words):
    with pytest.raises(exc) as info:
        slowfast_pool(x, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_raw_op_checks_do_not_crash():
    # torch.ops skips Python validation: the C++ kernel must reject, not read out of bounds
    with pytest.raises(RuntimeError, match="slow_index"):
        torch.ops.lvlm_fast.slowfast_pool(X, torch.tensor([9]), None, [2, 2], "avg", [2, 2],
                                          "all", "slow_fast", False)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.lvlm_fast.slowfast_pool(X, torch.tensor([2, 1]), None, [2, 2], "avg", [2, 2],
                                          "all", "slow_fast", False)
    with pytest.raises(RuntimeError, match="slow_kernel"):
        torch.ops.lvlm_fast.slowfast_pool(X, torch.tensor([1]), None, [3, 2], "avg", [2, 2],
                                          "all", "slow_fast", False)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.lvlm_fast.slowfast_pool_backward(torch.randn(3, 8), torch.empty(0),
                                                   torch.tensor([1]), [6, 4, 6, 8], False,
                                                   [2, 2], "avg", [2, 2], "all", "slow_fast")


# --------------------------------------------------------------------------- presets and seed
def test_presets():
    v1 = SlowFastConfig.sf_llava()
    assert (v1.num_frames, v1.num_slow, v1.slow_kernel, v1.slow_mode, v1.fast_grid) == (
        50, 10, (1, 2), "max", (4, 4))
    assert v1.num_tokens((24, 24)) == 3680
    v15 = SlowFastConfig.sf_llava_1_5()
    assert (v15.num_frames, v15.num_slow, v15.slow_kernel, v15.slow_mode) == (
        128, 32, (2, 2), "avg")
    assert v15.num_tokens((24, 24)) == 9216
    assert v15.num_tokens((24, 24), separator=True) == 9217
    assert v15.slow_index().tolist() == list(range(0, 128, 4))
    assert "UNVERIFIED" in SlowFastConfig.sf_llava_1_5.__doc__


@pytest.mark.parametrize("how,kernel,mode", [("spatial_1d_max_pool", (1, 2), "max"),
                                             ("spatial_2d_avg_pool", (2, 2), "avg")])
def test_seed_baseline_equals_op(how, kernel, mode):
    x = torch.randn(50, 576, 24)
    want = seed_slowfast(x, 10, how, (4, 4))[0]
    cfg = SlowFastConfig(num_frames=50, num_slow=10, slow_kernel=kernel, slow_mode=mode)
    got = cfg.pool(x)
    torch.testing.assert_close(got, want)
    assert got.shape == (cfg.num_tokens((24, 24)), 24)


def test_preset_pool_sf_llava():
    x = torch.randn(50, 24, 24, 16)
    out = SlowFastConfig.sf_llava().pool(x)
    want = ref_pool(x, torch.arange(0, 50, 5), slow_kernel=(1, 2), slow_mode="max")
    torch.testing.assert_close(out, want)
    assert out.shape == (3680, 16)
