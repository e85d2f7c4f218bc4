"""Tier 0: qformer_cross_attention C++ CPU kernel vs the reference (forward, backward to
q/frames/pos/Wk/bk/Wv/bv), T = 1, 7, 33, 1,000, video (32 queries, 768) and audio
(8 queries, 1024) shapes, streaming over ragged chunks through ``merge``, opcheck,
gradcheck, meta, torch.compile, the torch fallback paths, bad input."""

from __future__ import annotations

import pytest
import torch

import lvlm_fast  # noqa: F401
from lvlm_fast.ops import qformer_cross_attention as op
from lvlm_fast.ops import qformer_merge
from lvlm_fast.ops.qformer_cross_attention import chunked_backward, chunked_forward
from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention as ref

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
VIDEO = dict(lq=32, c=768, h=12, s=32, e=768)
AUDIO = dict(lq=8, c=768, h=12, s=1, e=1024)
SMALL = dict(lq=8, c=64, h=4, s=4, e=48)


def _inputs(b, t, lq, c, h, s, e, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 1 / e**0.5  # keep scores O(1), like a trained layer
    q = torch.randn(b, lq, c, generator=g)
    frames = torch.randn(b, t, s, e, generator=g)
    pos = torch.randn(t, e, generator=g) * 0.5
    wk, wv = torch.randn(c, e, generator=g) * w, torch.randn(c, e, generator=g) * w
    bk, bv = torch.randn(c, generator=g) * 0.1, torch.randn(c, generator=g) * 0.1
    return [x.to(dtype) for x in (q, frames, pos, wk, bk, wv, bv)], h


def _grads(fn, inputs, h, go, gl=None):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, lse = fn(*leaves, h, return_lse=True)
    loss = (out.double() * go).sum()
    if gl is not None:
        loss = loss + (lse.double() * gl).sum()
    loss.backward()
    return out, lse, [x.grad for x in leaves]


def test_cpu_kernel_registered():
    for name in ("qformer_cross_attention", "qformer_cross_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lvlm_fast::{name}", "CPU")
    from lvlm_fast import _extension

    assert "qformer_cross_attention" not in " ".join(_extension.cpu_kernel_status()["errors"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("shape", [VIDEO, AUDIO], ids=["video", "audio"])
def test_forward_matches_reference(dtype, t, shape):
    inputs, h = _inputs(1, t, **shape, dtype=dtype)
    out, lse = op(*inputs, h, return_lse=True)
    r, rl = ref(*inputs, h, return_lse=True)
    tol = TOL[dtype]
    assert out.shape == (1, shape["lq"], shape["c"]) and out.dtype == dtype
    assert lse.shape == (1, h, shape["lq"]) and lse.dtype == torch.float32
    torch.testing.assert_close(out, r, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, rl, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("shape", [VIDEO, AUDIO], ids=["video", "audio"])
def test_backward_matches_reference(t, shape):
    inputs, h = _inputs(2, t, **shape)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(2, shape["lq"], shape["c"], generator=g, dtype=torch.float64)
    gl = torch.randn(2, h, shape["lq"], generator=g, dtype=torch.float64)
    _, _, grads = _grads(op, inputs, h, go, gl)
    _, _, rgrads = _grads(ref, inputs, h, go, gl)
    names = ("q", "frames", "pos", "wk", "bk", "wv", "bv")
    for name, a, r in zip(names, grads, rgrads, strict=True):
        assert a.shape == r.shape, name
        scale = r.abs().max().item()
        torch.testing.assert_close(a, r, atol=2e-5 * max(1.0, scale), rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(dtype):
    inputs, h = _inputs(1, 7, **AUDIO, dtype=dtype)
    go = torch.randn(1, 8, 768, dtype=torch.float64)
    _, _, grads = _grads(op, inputs, h, go)
    _, _, rgrads = _grads(ref, [x.double() for x in inputs], h, go)
    for a, r in zip(grads, rgrads, strict=True):
        assert a.dtype == dtype
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        torch.testing.assert_close(a.double(), r, atol=tol * max(1.0, r.abs().max().item()),
                                   rtol=tol)  # fmt: skip


def test_thousand_frames_small_width():
    # T = 1,000 frames x 4 tokens (several kernel chunks), forward and backward
    inputs, h = _inputs(1, 1000, **SMALL, dtype=torch.float64)
    go = torch.randn(1, 8, 64, dtype=torch.float64)
    out, lse, grads = _grads(op, inputs, h, go, torch.ones(1, 4, 8, dtype=torch.float64))
    r, rl, rgrads = _grads(ref, inputs, h, go, torch.ones(1, 4, 8, dtype=torch.float64))
    torch.testing.assert_close(out, r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, rl, atol=1e-10, rtol=1e-10)
    for a, e in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


def test_thousand_frames_audio_width():
    inputs, h = _inputs(1, 1000, **AUDIO)
    torch.testing.assert_close(op(*inputs, h), ref(*inputs, h), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sizes", [[1, 7, 20, 5], [33], [16, 1, 16]])
def test_streaming_ragged_chunks_forward_and_backward(sizes):
    t = sum(sizes)
    inputs, h = _inputs(2, t, **SMALL, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    q, frames, pos, *w = leaves
    out = lse = None
    t0 = 0
    for n in sizes:  # each chunk with its own (global) position rows
        o, l_ = op(q, frames[:, t0:t0 + n], pos[t0:t0 + n], *w, h, return_lse=True)
        out, lse = (o, l_) if out is None else qformer_merge(out, lse, o, l_)
        t0 += n
    go = torch.randn(out.shape, dtype=torch.float64)
    (out * go).sum().backward()
    rleaves = [x.clone().requires_grad_(True) for x in inputs]
    r, rl = ref(*rleaves, h, return_lse=True)
    (r * go).sum().backward()
    torch.testing.assert_close(out, r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, rl, atol=1e-12, rtol=1e-10)
    for a, e in zip(leaves, rleaves, strict=True):
        torch.testing.assert_close(a.grad, e.grad, atol=1e-10, rtol=1e-9)


def test_merge_is_exact_and_order_free():
    inputs, h = _inputs(1, 10, **SMALL, dtype=torch.float64)
    q, frames, pos, *w = inputs
    a = op(q, frames[:, :3], pos[:3], *w, h, return_lse=True)
    b = op(q, frames[:, 3:], pos[3:], *w, h, return_lse=True)
    ab, ba = qformer_merge(*a, *b), qformer_merge(*b, *a)
    full = op(*inputs, h, return_lse=True)
    for x, y in ((ab, full), (ba, full)):
        torch.testing.assert_close(x[0], y[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(x[1], y[1], atol=1e-12, rtol=1e-12)


def test_unbatched():
    inputs, h = _inputs(1, 5, **SMALL)
    q, frames, *rest = inputs
    out, lse = op(q[0], frames[0], *rest, h, return_lse=True)
    r, rl = ref(*inputs, h, return_lse=True)
    assert out.shape == (8, 64) and lse.shape == (4, 8)
    torch.testing.assert_close(out, r[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, rl[0], atol=2e-5, rtol=2e-5)
    m, ml = qformer_merge(out, lse, out, lse)  # same partial twice: same out, lse + log 2
    torch.testing.assert_close(m, out)
    torch.testing.assert_close(ml, lse + torch.log(torch.tensor(2.0)))


def test_scale_default_and_explicit():
    inputs, h = _inputs(1, 3, **SMALL)
    torch.testing.assert_close(op(*inputs, h), ref(*inputs, h, scale=0.25), atol=2e-5, rtol=0)
    torch.testing.assert_close(op(*inputs, h, scale=0.1), ref(*inputs, h, scale=0.1),
                               atol=2e-5, rtol=2e-5)  # fmt: skip


def test_torch_paths_match_reference():
    # the chunked torch paths (CPU fallback without the C++ build, fp64 on CUDA) against the
    # reference, multi-chunk
    inputs, h = _inputs(2, 600, **SMALL, dtype=torch.float64)
    out, lse = chunked_forward(*inputs, h, 0.25)
    r, rl = ref(*inputs, h, return_lse=True)
    torch.testing.assert_close(out, r, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, rl, atol=1e-12, rtol=1e-10)
    go = torch.randn(out.shape, dtype=torch.float64)
    gl = torch.randn(lse.shape, dtype=torch.float64)
    grads = chunked_backward(go, gl, *inputs, out, lse, h, 0.25)
    cgrads = torch.ops.lvlm_fast.qformer_cross_attention_backward(go, gl, *inputs, out, lse,
                                                                  h, 0.25)  # fmt: skip
    _, _, rgrads = _grads(ref, inputs, h, go, gl)
    for a, c, e in zip(grads, cgrads, rgrads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(c, e, atol=1e-10, rtol=1e-9)


def test_gradcheck_fp64():
    inputs, h = _inputs(1, 3, lq=3, c=8, h=2, s=2, e=5, dtype=torch.float64)
    leaves = [x.requires_grad_(True) for x in inputs]

    def f(*xs):
        out, lse = op(*xs, h, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, leaves)


def test_opcheck():
    inputs, h = _inputs(2, 3, lq=5, c=16, h=2, s=3, e=12)
    inputs = [x.requires_grad_(True) for x in inputs]
    torch.library.opcheck(torch.ops.lvlm_fast.qformer_cross_attention.default,
                          (*inputs, h, 0.3))  # fmt: skip
    det = [x.detach() for x in inputs]
    out, lse = torch.ops.lvlm_fast.qformer_cross_attention(*det, h, 0.3)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.lvlm_fast.qformer_cross_attention_backward.default,
                          (go, gl, *det, out, lse, h, 0.3))  # fmt: skip
    torch.library.opcheck(torch.ops.lvlm_fast.qformer_cross_attention_backward.default,
                          (go, None, *det, out, lse, h, 0.3))  # fmt: skip


def test_meta_shapes():
    inputs, h = _inputs(2, 40, **VIDEO)
    meta = [x.to("meta") for x in inputs]
    out, lse = op(*meta, h, return_lse=True)
    assert out.shape == (2, 32, 768) and out.device.type == "meta"
    assert lse.shape == (2, 12, 32) and lse.dtype == torch.float32


def test_torch_compile_fullgraph():
    inputs, h = _inputs(1, 6, **SMALL)
    q, frames, pos, *w = inputs

    def f(q, frames, pos):
        a = op(q, frames[:, :4], pos[:4], *w, h, return_lse=True)
        b = op(q, frames[:, 4:], pos[4:], *w, h, return_lse=True)
        return qformer_merge(*a, *b)[0]

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, frames, pos), ref(*inputs, h), atol=2e-5, rtol=2e-5)
    fg = frames.clone().requires_grad_(True)
    compiled(q, fg, pos).sum().backward()
    fr = frames.clone().requires_grad_(True)
    ref(q, fr, pos, *w, h).sum().backward()
    torch.testing.assert_close(fg.grad, fr.grad, atol=2e-5, rtol=2e-4)


def _bad(name):
    inputs, h = _inputs(1, 3, **SMALL)
    kw = dict(zip(("q", "frames", "pos", "wk", "bk", "wv", "bv"), inputs, strict=True))
    kw["num_heads"] = h
    return kw


@pytest.mark.parametrize(("change", "err", "words"), [
    (lambda kw: kw.update(q=kw["q"][0, 0]), ValueError, "q must be"),
    (lambda kw: kw.update(q=torch.randn(1, 65, 64)), ValueError, "Lq <= 64"),
    (lambda kw: kw.update(frames=kw["frames"][0]), ValueError, "frames must be 4-D"),
    (lambda kw: kw.update(frames=torch.randn(2, 3, 4, 48)), ValueError, "frames.shape[0]"),
    (lambda kw: kw.update(pos=torch.randn(4, 48)), ValueError, "pos must be (T, E)"),
    (lambda kw: kw.update(wk=torch.randn(64, 47)), ValueError, "wk must be (C, E)"),
    (lambda kw: kw.update(bv=torch.randn(63)), ValueError, "bv must be (C,)"),
    (lambda kw: kw.update(num_heads=5), ValueError, "num_heads (5) must divide"),
    (lambda kw: kw.update(num_heads=2.0), TypeError, "num_heads must be a positive int"),
    (lambda kw: kw.update(wv=kw["wv"].double()), TypeError, "wv has dtype"),
    (lambda kw: kw.update(pos=kw["pos"].to("meta")), ValueError, "pos is on meta"),
    (lambda kw: kw.update(frames=kw["frames"].int()), TypeError, "frames must be float"),
    (lambda kw: kw.update(bk=[0.0]), TypeError, "bk must be a torch.Tensor"),
])  # fmt: skip
def test_bad_input(change, err, words):
    kw = _bad("x")
    change(kw)
    with pytest.raises(err, match=__import__("re").escape(words)):
        op(**kw)


def test_bad_scale_and_merge_shapes():
    kw = _bad("x")
    with pytest.raises(ValueError, match="scale must be"):
        op(**kw, scale=0.0)
    out, lse = op(**kw, return_lse=True)
    with pytest.raises(ValueError, match="out_b/lse_b"):
        qformer_merge(out, lse, out[:, :4], lse)
    with pytest.raises(ValueError, match="lse_a must be"):
        qformer_merge(out, lse[:, :3], out, lse[:, :3])
