"""Tier 1: the qformer_cross_attention Triton forward (split-KV, K/V projection and position
rows fused) in the interpreter, on CPU tensors, vs the reference. fp32 and fp16; video /
audio-like layouts at small widths, non-power-of-two Lq / head dim / encoder width / S,
several key splits (ragged last split), strided frames, and the recompute backward on the
kernel's saved lse."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import qformer_cross_attention as kern

from lvlm_fast.ops.qformer_cross_attention import chunked_backward
from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention as ref

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _inputs(b, t, lq, c, h, s, e, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, c, generator=g)
    fbuf = torch.randn(b, t + 2, s, e + 3, generator=g)
    frames = fbuf[:, 1:t + 1, :, :e] if strided else fbuf[:, :t, :, :e].contiguous()
    pos = torch.randn(t, e, generator=g) * 0.5
    w = e**-0.5
    wk, wv = torch.randn(c, e, generator=g) * w, torch.randn(c, e, generator=g) * w
    bk, bv = torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g) * 0.1
    return [x.to(dtype) for x in (q, frames, pos, wk, bk, wv, bv)], h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "t", "lq", "c", "h", "s", "e", "strided"), [
    (1, 3, 32, 64, 2, 8, 48, False),    # video-like: 32 queries, several tokens per frame
    (2, 7, 8, 64, 4, 1, 40, True),      # audio-like: 8 queries, 1 token per clip, strided
    (1, 5, 5, 60, 3, 7, 37, False),     # non-powers of two: Lq 5, Dh 20, S 7, E 37
    (1, 33, 8, 32, 2, 3, 24, True),     # 99 keys over several splits
])  # fmt: skip
def test_forward(launched, monkeypatch, dtype, b, t, lq, c, h, s, e, strided):
    monkeypatch.setattr(kern, "MIN_KEYS_PER_SPLIT", 16)  # force several (ragged) splits
    inputs, h = _inputs(b, t, lq, c, h, s, e, dtype, strided=strided)
    scale = (c // h) ** -0.5
    out, lse = kern.qformer_cross_attention_fwd(*inputs, h, scale)
    r, rl = ref(*[x.double() for x in inputs], h, return_lse=True)
    tol = TOL[dtype]
    assert out.shape == (b, lq, c) and out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    assert {f.fn.__name__ for f in launched} == {"_qformer_xattn_fwd_kernel", "_lse_merge_kernel"}
    for f in launched:
        assert_interpreted(f)


def test_splits_cover_every_key_once():
    for n, bh in ((1, 12), (99, 2), (32_000, 12), (320_000, 1)):
        ns, per = kern._splits(n, bh, 32)
        assert per % 32 == 0 and (ns - 1) * per < n <= ns * per  # each split non-empty
        assert ns * bh <= max(kern.TARGET_PROGRAMS, bh)  # partial buffer stays bounded


def test_backward_from_kernel_lse(launched):
    inputs, h = _inputs(1, 6, 8, 32, 2, 3, 24, torch.float32)
    out, lse = kern.qformer_cross_attention_fwd(*inputs, h, 0.25)
    go = torch.randn(out.shape)
    grads = chunked_backward(go, None, *inputs, out, lse, h, 0.25)
    leaves = [x.double().requires_grad_(True) for x in inputs]
    (ref(*leaves, h, scale=0.25) * go.double()).sum().backward()
    for a, x in zip(grads, leaves, strict=True):
        torch.testing.assert_close(a.double(), x.grad, atol=1e-4, rtol=1e-4)
