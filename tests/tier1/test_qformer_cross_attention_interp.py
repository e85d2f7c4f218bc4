"""Tier 1: the qformer_cross_attention Triton kernels in the interpreter, on CPU tensors, vs
the reference. Forward (split-KV, K/V projection and position rows fused): fp32 and fp16;
video / audio-like layouts at small widths, non-power-of-two Lq / head dim / encoder width
/ S, several key splits (ragged last split), strided frames. Backward
(``_qformer_cross_attention_bwd_kernel`` + the chunk GEMMs of its launcher): every gradient
(dq, dframes, dpos, dWk, dbk, dWv, dbv) with a nonzero grad of lse, at T = 1, 7, 33 and a
long stream in ragged chunks, 32 / 8 queries, encoder widths 768 and 1024 (hidden 32-64:
the interpreter is slow), fp32 and fp16; fp64 never reaches a kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_interpreted
from lvlm_fast.kernels import qformer_cross_attention as kern

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


def _ref_grads(inputs, h, scale, go, gl):
    leaves = [x.double().requires_grad_(True) for x in inputs]
    r, rl = ref(*leaves, h, scale=scale, return_lse=True)
    ((r * go.double()).sum() + (rl * gl.double()).sum()).backward()
    return r, rl, [x.grad for x in leaves]


GRADS = ("dq", "dframes", "dpos", "dwk", "dbk", "dwv", "dbv")
VIDEO = dict(lq=32, s=4, e=768)  # 32 queries, several tokens per frame, encoder width 768
AUDIO = dict(lq=8, s=1, e=1024)  # 8 queries, one token per clip, encoder width 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("shape", [VIDEO, AUDIO], ids=["video", "audio"])
def test_backward(launched, monkeypatch, dtype, t, shape):
    monkeypatch.setattr(kern, "MIN_KEYS_PER_SPLIT", 16)  # several dq partials per chunk
    b, c, h = (2, 32, 2) if shape is AUDIO else (1, 64, 4)
    inputs, h = _inputs(b, t, shape["lq"], c, h, shape["s"], shape["e"], dtype,
                        strided=shape is AUDIO)  # fmt: skip
    _check_backward(launched, inputs, h, dtype)


@pytest.mark.parametrize(("b", "t", "lq", "c", "h", "s", "e", "chunk_keys"), [
    (1, 100, 8, 32, 2, 1, 1024, 24),   # audio stream: chunks of 24 clips, ragged last (4)
    (2, 45, 32, 32, 2, 3, 768, 40),    # video, batch 2: chunks of 6 frames, ragged last (3)
    (1, 20, 5, 60, 3, 7, 37, 64),      # Lq 5, Dh 20, S 7, E 37: chunks of 9 frames
    (1, 9, 40, 200, 2, 2, 24, 8),      # Lq 40 at Dh 100: two query blocks (bwd_block_m)
])  # fmt: skip
def test_backward_long_stream_ragged_chunks(launched, monkeypatch, b, t, lq, c, h, s, e,
                                            chunk_keys):  # fmt: skip
    monkeypatch.setattr(kern, "MIN_KEYS_PER_SPLIT", 16)
    monkeypatch.setattr(kern, "BWD_CHUNK_KEYS", chunk_keys)
    inputs, h = _inputs(b, t, lq, c, h, s, e, torch.float32, strided=True)
    ct = max(1, chunk_keys // (b * s))
    assert t % ct != 0 and t > 2 * ct  # several chunks, the last one ragged
    n_bwd = _check_backward(launched, inputs, h, torch.float32)
    assert n_bwd == -(-t // ct)  # one backward launch per chunk
    assert (kern.bwd_block_m(lq, c // h, torch.float32) < lq) == (lq == 40)


def _check_backward(launched, inputs, h, dtype):
    c = inputs[0].shape[2]
    scale = (c // h) ** -0.5
    g = torch.Generator().manual_seed(1)
    out, lse = kern.qformer_cross_attention_fwd(*inputs, h, scale)
    go = torch.randn(out.shape, generator=g)
    gl = torch.randn(lse.shape, generator=g)
    grads = kern.qformer_cross_attention_bwd(go.to(dtype), gl, *inputs, out, lse, h, scale)
    r, rl, want = _ref_grads(inputs, h, scale, go, gl)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rl, atol=tol, rtol=tol)
    for name, a, x, w in zip(GRADS, grads, inputs, want, strict=True):
        assert a.shape == x.shape and a.dtype == dtype, name
        big = max(1.0, w.abs().max().item())
        gt = 4e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.double(), w, atol=gt * big, rtol=gt, msg=name)
    names = [f.fn.__name__ for f in launched]
    assert "_qformer_cross_attention_bwd_kernel" in names
    for f in launched:
        assert_interpreted(f)
    return names.count("_qformer_cross_attention_bwd_kernel")


def test_backward_grad_lse_alone_and_none(launched):
    # grad of lse only (grad_out zero) and grad_lse None are both honoured
    inputs, h = _inputs(1, 5, 8, 32, 2, 2, 24, torch.float32)
    out, lse = kern.qformer_cross_attention_fwd(*inputs, h, 0.25)
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros_like(out)
    grads = kern.qformer_cross_attention_bwd(zero, gl, *inputs, out, lse, h, 0.25)
    _, _, want = _ref_grads(inputs, h, 0.25, zero, gl)
    for name, a, w in zip(GRADS, grads, want, strict=True):
        torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4, msg=name)
    g3 = torch.Generator().manual_seed(3)
    # a dense grad_out, and a broadcast one (stride 0, as autograd hands over for .sum())
    for go in (torch.randn(out.shape, generator=g3),
               torch.randn(out.shape[2], generator=g3).expand(out.shape)):  # fmt: skip
        grads = kern.qformer_cross_attention_bwd(go, None, *inputs, out, lse, h, 0.25)
        _, _, want = _ref_grads(inputs, h, 0.25, go, torch.zeros_like(lse))
        for name, a, w in zip(GRADS, grads, want, strict=True):
            torch.testing.assert_close(a.double(), w, atol=1e-4, rtol=1e-4, msg=name)


def test_fp64_is_routed_to_the_chunked_torch_paths(launched):
    # Triton rejects the fp64 dots at compile time (tests/tier2): no kernel may be launched
    inputs, h = _inputs(1, 4, 8, 32, 2, 3, 24, torch.float64)
    out, lse = kern.qformer_cross_attention_fwd(*inputs, h, 0.25)
    go = torch.randn(out.shape, dtype=torch.float64)
    gl = torch.randn(lse.shape, dtype=torch.float64)
    grads = kern.qformer_cross_attention_bwd(go, gl, *inputs, out, lse, h, 0.25)
    assert launched == [] and out.dtype == lse.dtype == torch.float64
    r, rl, want = _ref_grads(inputs, h, 0.25, go, gl)
    torch.testing.assert_close(out, r)
    torch.testing.assert_close(lse, rl)
    for name, a, w in zip(GRADS, grads, want, strict=True):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a, w, msg=name)
