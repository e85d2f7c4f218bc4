"""Tier 0: the live-tensor tracker (lvlm_fast.profile.tracker)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lvlm_fast.profile import tracker as tr
from lvlm_fast.profile.tracker import LiveTensorTracker, measure_peak, peak_live_bytes

F32 = 4


def test_known_pattern_exact_peak():
    def f():
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 4000 B -> 8000 live
        c = torch.cat([a, b])  # 8000 B -> 16000 live (the peak)
        del a, b
        return c.sum()  # 4 B while c (8000) is alive

    assert peak_live_bytes(f) == 16000


def test_sequential_allocations_do_not_add_up():
    def f():
        for _ in range(5):
            t = torch.empty(1000)
            del t

    assert peak_live_bytes(f) == 1000 * F32


def test_result_is_counted_and_returned():
    res, peak = measure_peak(lambda n: torch.zeros(n), 256)
    assert peak == 256 * F32
    assert res.shape == (256,)


def test_preexisting_storage_not_counted():
    x = torch.randn(1 << 16)
    assert peak_live_bytes(lambda: x.add_(1)) == 0  # in-place on a pre-existing tensor
    assert peak_live_bytes(lambda: x.view(4, -1)) == 0  # a view allocates nothing
    assert peak_live_bytes(lambda: x[::2]) == 0
    assert peak_live_bytes(lambda: x.split(100)) == 0


def test_views_of_new_tensor_deduplicated():
    def f():
        a = torch.empty(1000)
        return a.view(10, 100), a[:10], a.unbind(0)

    assert peak_live_bytes(f) == 1000 * F32


def test_inplace_growth_counted():
    x = torch.randn(1000)
    buf = torch.empty(0)
    assert peak_live_bytes(lambda: torch.cat([x, x], out=buf)) == 2000 * F32

    def fresh():
        out = torch.empty(0)
        torch.cat([x, x, x], out=out)
        return out

    assert peak_live_bytes(fresh) == 3000 * F32


def test_autograd_saved_tensors_count_until_backward():
    w = torch.randn(1000, requires_grad=True)
    with LiveTensorTracker() as t:
        y = w.exp()  # saved for backward
        z = y.sum()
        del y
        live_before_bw = t.current_bytes
        z.backward()
        del z
    assert live_before_bw >= 1000 * F32  # exp output kept alive by the graph
    assert t.peak_bytes >= 2000 * F32  # + the gradient
    assert t.current_bytes == 1000 * F32  # only w.grad remains (a new tensor)
    w.grad = None


def test_meta_tensors_counted():
    def f():
        a = torch.empty(1 << 30, device="meta")  # 4 GiB, nothing allocated
        b = a + 1  # another 4 GiB
        return b.sum()

    assert peak_live_bytes(f) == 2 * (1 << 30) * F32 + F32


def test_meta_module_counted():
    lin = torch.nn.Linear(1024, 2048, device="meta")
    x = torch.empty(512, 1024, device="meta")
    with torch.no_grad():
        assert peak_live_bytes(lin, x) == 512 * 2048 * F32


def test_fake_tensors_counted_inside_fake_mode():
    with FakeTensorMode():
        with LiveTensorTracker() as t:
            a = torch.empty(1000, 1000)
            b = a @ a
            del b
        assert t.peak_bytes == 2 * 1000 * 1000 * F32
        assert t.peak_by_device == {"meta": 2 * 1000 * 1000 * F32}


def test_per_device_peaks():
    with LiveTensorTracker() as t:
        a = torch.empty(100)
        m = torch.empty(1000, device="meta")
        del a, m
    assert t.peak_by_device == {"cpu": 400, "meta": 4000}
    assert t.peak_bytes == 4400
    assert t.num_allocations == 2 and t.allocated_bytes == 4400


def test_nested_trackers():
    with LiveTensorTracker() as outer:
        a = torch.empty(1000)
        with LiveTensorTracker() as inner:
            b = torch.empty(500)
            del b
        del a
    assert inner.peak_bytes == 2000
    assert outer.peak_bytes == 6000


def test_frees_after_exit_are_harmless():
    with LiveTensorTracker() as t:
        a = torch.empty(1000)
    cur = t.current_bytes
    del a
    gc.collect()
    assert t.current_bytes == cur == 4000


def test_kernel_internal_scratch_invisible_but_rss_sees_it():
    """The documented limit: allocations inside a kernel that are not returned are not seen
    by a dispatch-level tracker; the RSS cross-check sees them."""
    scratch = 64 << 20  # 64 MiB of touched scratch inside the kernel

    @torch.library.custom_op("lvlm_fast_test::scratchy", mutates_args=())
    def scratchy(x: torch.Tensor) -> torch.Tensor:
        tmp = torch.ones(scratch // 4)  # touched pages
        return x + tmp[:1]

    x = torch.zeros(8)
    assert peak_live_bytes(scratchy, x) == 8 * F32
    _, rss = tr.rss_peak_bytes(scratchy, x)
    assert rss >= scratch * 0.9


def test_rss_peak_tracks_big_allocation():
    n = 32 << 20  # 128 MiB fp32
    _, rss = tr.rss_peak_bytes(lambda: torch.ones(n).sum())
    assert 0.9 * n * F32 <= rss <= 2.5 * n * F32


def test_cuda_allocator_helper():
    if torch.cuda.is_available():
        peak = tr.cuda_allocator_peak_bytes(lambda: torch.empty(1 << 20, device="cuda"))
        assert peak >= (1 << 20) * F32
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            tr.cuda_allocator_peak_bytes(lambda: None)
