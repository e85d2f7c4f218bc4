"""Tier 3: qformer_cross_attention on CUDA (Triton forward and backward) in bf16/fp16/fp32
vs the fp32 reference, at the released video / audio shapes, T up to 1,000 frames, with a
nonzero grad of lse, streaming through ``merge``; fp64 (routed to the chunked torch
paths); peak memory of the forward and of the backward flat in T."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import qformer_cross_attention as op
from lvlm_fast.ops import qformer_merge
from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VIDEO = dict(lq=32, c=768, h=12, s=32, e=768)
AUDIO = dict(lq=8, c=768, h=12, s=1, e=1024)


def _inputs(t, lq, c, h, s, e, dtype, b=1):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = e**-0.5
    xs = (torch.randn(b, lq, c, generator=g, device="cuda"),
          torch.randn(b, t, s, e, generator=g, device="cuda"),
          torch.randn(t, e, generator=g, device="cuda") * 0.5,
          torch.randn(c, e, generator=g, device="cuda") * w,
          torch.randn(c, generator=g, device="cuda") * 0.1,
          torch.randn(c, e, generator=g, device="cuda") * w,
          torch.randn(c, generator=g, device="cuda") * 0.1)  # fmt: skip
    return [x.to(dtype) for x in xs], h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 7, 33, 1000])
@pytest.mark.parametrize("shape", [VIDEO, AUDIO], ids=["video", "audio"])
def test_forward_backward_cuda(dtype, t, shape):
    inputs, h = _inputs(t, **shape, dtype=dtype)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out, lse = op(*leaves, h, return_lse=True)
    rleaves = [x.float().requires_grad_(True) for x in inputs]
    r, rl = ref(*rleaves, h, return_lse=True)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3  # fp32: TF32 dots
    torch.testing.assert_close(out.float(), r, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rl, atol=tol * 4, rtol=tol)
    go = torch.randn_like(r)
    gl = torch.randn_like(rl)
    ((out.float() * go).sum() + (lse * gl).sum()).backward()
    ((r * go).sum() + (rl * gl).sum()).backward()
    for a, e in zip(leaves, rleaves, strict=True):
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.float(), e.grad, atol=tol * 4 * scale, rtol=tol * 4)


def test_streaming_ragged_chunks_cuda():
    inputs, h = _inputs(100, **VIDEO, dtype=torch.float16)
    q, frames, pos, *w = inputs
    out = lse = None
    t0 = 0
    for n in (1, 30, 64, 5):
        o, l_ = op(q.float(), frames[:, t0:t0 + n].float(), pos[t0:t0 + n].float(),
                   *(x.float() for x in w), h, return_lse=True)  # fmt: skip
        out, lse = (o, l_) if out is None else qformer_merge(out, lse, o, l_)
        t0 += n
    r = ref(*[x.float() for x in inputs], h)
    torch.testing.assert_close(out, r, atol=5e-3, rtol=5e-3)


def test_fp64_routed_to_torch_paths_cuda():
    inputs, h = _inputs(40, **AUDIO, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out, lse = op(*leaves, h, return_lse=True)
    rleaves = [x.clone().requires_grad_(True) for x in inputs]
    r, rl = ref(*rleaves, h, return_lse=True)
    torch.testing.assert_close(out, r)
    torch.testing.assert_close(lse, rl)
    (out.sum() + lse.sum()).backward()
    (r.sum() + rl.sum()).backward()
    for a, e in zip(leaves, rleaves, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


def _peak_above_entry(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _peaks(t):
    """(forward peak, backward peak minus its outputs) above entry, bytes, at T = t."""
    inputs, h = _inputs(t, **VIDEO, dtype=torch.float16)
    fwd = _peak_above_entry(lambda: op(*inputs, h))
    leaves = [x.requires_grad_(True) for x in inputs]
    out, lse = op(*leaves, h, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = []
    bwd = _peak_above_entry(lambda: grads.extend(torch.autograd.grad((out, lse), leaves,
                                                                     (go, gl))))  # fmt: skip
    # the O(T) outputs (dframes, the size of frames, and dpos) are allowed to grow
    return fwd, bwd - sum(g.numel() * g.element_size() for g in grads)


def test_peak_memory_flat_in_frames():
    # both T above one backward chunk (16,384 keys = 512 frames of 32 tokens)
    (f0, b0), (f1, b1) = _peaks(1024), _peaks(4096)
    # K/V would be t * 32 * 768 * 2 * 2 bytes (400 MB at 4,096 frames): not materialised
    assert f1 <= f0 + (1 << 20), (f0, f1)
    assert b1 <= b0 + (4 << 20), (b0, b1)
