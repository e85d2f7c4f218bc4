"""Tier 0: evict_summaries_layers (issue 14.2.4): every layer evicted by one op call (one
launch on CUDA), equal to the per-layer op; one validation; meta tensors; the summary cache
calls it once per window."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import evict_summaries
from lvlm_fast.ops.evict_summaries import evict_summaries_layers


def _bufs(layers, shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(layers)],
            [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(layers)])


@pytest.mark.parametrize(("ratio", "carry", "count"), [(1, 0, 10), (4, 3, 6)])
def test_equals_per_layer_op(ratio, carry, count):
    ks, vs = _bufs(3, (2, 2, 60, 16))
    want_k, want_v = [k.clone() for k in ks], [v.clone() for v in vs]
    inv = torch.rand(8)
    kw = dict(window_start=4, ratio=ratio, carry=carry, count=count, dst=3, inv_freq=inv)
    for k, v in zip(want_k, want_v, strict=True):
        evict_summaries(k, v, **kw)
    evict_summaries_layers(ks, vs, **kw)
    for a, b in zip(ks + vs, want_k + want_v, strict=True):
        assert torch.equal(a, b)


def test_validates_once_with_clear_errors():
    ks, vs = _bufs(2, (1, 2, 20, 8))
    inv = torch.rand(4)
    kw = dict(window_start=0, ratio=2, carry=0, count=3, dst=0, inv_freq=inv)
    with pytest.raises(ValueError, match=r"keys\[1\]"):
        evict_summaries_layers([ks[0], torch.zeros(1, 2, 21, 8)], vs, **kw)
    with pytest.raises(ValueError, match="one length"):
        evict_summaries_layers(ks, vs[:1], **kw)
    with pytest.raises(TypeError):
        evict_summaries_layers(ks[0], vs[0], **kw)
    with pytest.raises(ValueError, match="capacity"):
        evict_summaries_layers(ks, vs, **{**kw, "count": 30})


def test_meta_tensors():
    ks = [torch.empty(1, 4, 100, 128, device="meta") for _ in range(28)]
    evict_summaries_layers(ks, ks, window_start=10, ratio=4, carry=0, count=5, dst=10,
                           inv_freq=torch.empty(64, device="meta"))


def test_cache_evicts_all_layers_with_one_call(monkeypatch):
    from lvlm_fast import cache as cache_mod

    calls = []
    orig = cache_mod.evict_summaries_layers

    def spy(keys, values, **kw):
        calls.append(len(keys))
        return orig(keys, values, **kw)

    monkeypatch.setattr(cache_mod, "evict_summaries_layers", spy)
    c = cache_mod.SummaryKVCache(5, 64, torch.rand(4))
    for li in range(5):
        c.update(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), li)
    c.mark_sink()
    for li in range(5):  # a window of 8 raw tokens + 2 summaries (ratio 4)
        c.update(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), li)
    assert c.evict_window(6, 8, 4) == 2
    assert calls == [5]
    assert all(la.length == 8 for la in c.layers)
