"""Benchmark cases for ``qformer_cross_attention`` (Video-LLaMA Q-Former cross-attention,
K/V projection and frame position fused, streaming).

Shapes (released widths):
  * ``video``: 32 queries (768 = 12 heads x 64) over T = 256 frames x 32 image-Q-Former
    tokens of 768 (the Video Q-Former's cross-attention, one layer);
  * ``audio``: 8 queries over T = 1,000 ImageBind clip embeddings of 1,024 (S = 1).
``--quick``: video layout at 16 frames.

Impls: ``fused`` = ``lvlm_fast.ops.qformer_cross_attention`` on the whole video; ``seed`` =
the released path (``encode_videoQformer_visual`` + ``BertSelfAttention``): add the
position rows, flatten to (T*S, E), materialise K and V with ``nn.Linear`` and the
(H, Lq, T*S) score matrix, softmax, weighted sum; ``reference`` =
``lvlm_fast.reference.qformer_cross_attention``. ``peak_bytes`` is the point: the seed's
grows with T*S*C, the fused op's does not.

Bytes model (what must move): read frames, position rows, q and the two projections once,
write out: (T*S*E + T*E + 2*C*E + 2*C + 2*Lq*C) * elt.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("qformer_cross_attention",)

# tag, Lq, C, H, T, S, E
FULL = [("video", 32, 768, 12, 256, 32, 768), ("audio", 8, 768, 12, 1000, 1, 1024)]
QUICK = [("quick", 32, 768, 12, 16, 32, 768)]


def _inputs(lq, c, t, s, e, device):
    g = torch.Generator().manual_seed(0)
    w = e**-0.5
    xs = (torch.randn(1, lq, c, generator=g), torch.randn(1, t, s, e, generator=g),
          torch.randn(t, e, generator=g), torch.randn(c, e, generator=g) * w,
          torch.randn(c, generator=g) * 0.1, torch.randn(c, e, generator=g) * w,
          torch.randn(c, generator=g) * 0.1)  # fmt: skip
    return [x.to(device) for x in xs]


def seed_qformer_cross_attention(q, frames, pos, wk, bk, wv, bv, num_heads):
    """The released composition: (frames + pos) flattened, K/V and scores materialised."""
    b, lq, c = q.shape
    e = frames.shape[-1]
    enc = (frames + pos[None, :, None]).reshape(b, -1, e)
    dh = c // num_heads
    k = torch.nn.functional.linear(enc, wk, bk).view(b, -1, num_heads, dh).transpose(1, 2)
    v = torch.nn.functional.linear(enc, wv, bv).view(b, -1, num_heads, dh).transpose(1, 2)
    qh = q.view(b, lq, num_heads, dh).transpose(1, 2)
    scores = qh @ k.transpose(-1, -2) / dh**0.5
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops
    from lvlm_fast.reference.qformer_cross_attention import qformer_cross_attention as ref

    note = fused_kernel_note("lvlm_fast::qformer_cross_attention", device)
    out = []
    for tag, lq, c, h, t, s, e in QUICK if quick else FULL:
        inp = Lazy(lambda lq=lq, c=c, t=t, s=s, e=e: _inputs(lq, c, t, s, e, device))
        shape = f"{tag}:Lq={lq},C={c},H={h},T={t},S={s},E={e}"
        nbytes = (t * s * e + t * e + 2 * c * e + 2 * c + 2 * lq * c) * 4
        common = dict(op="qformer_cross_attention", shape=shape, dtype="fp32", bytes=nbytes,
                      track_peak=True, setup=inp.get, teardown=inp.release, rtol=1e-4,
                      atol=1e-4)  # fmt: skip

        def fused(inp=inp, h=h):
            return lvlm_fast.ops.qformer_cross_attention(*inp.get(), h)

        def seed(inp=inp, h=h):
            return seed_qformer_cross_attention(*inp.get(), h)

        def reference(inp=inp, h=h):
            return ref(*inp.get(), h)

        out.append(Case(impl="fused", fn=fused, note=note, **common))
        out.append(Case(impl="seed", fn=seed, **common))
        out.append(Case(impl="reference", fn=reference, **common))
    return out
