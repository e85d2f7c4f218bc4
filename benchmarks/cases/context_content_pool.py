"""Benchmark cases for ``context_content_pool`` (LLaMA-VID context + content tokens).

Setting (the released model at 224 px): EVA-ViT-G features, P = 256 patches (16 x 16),
C = 1408, Lq = 32 text queries shared by every frame, keys = X (the op's core; the nn module
folds the key projection into the queries), N = 1,024 frames, one content token
(``compress_type="mean"``); plus the ``grid:2`` content option (2 x 2 content tokens) at
N = 256. ``--quick``: N = 16, C = 256.

Impls: ``fused`` = ``lvlm_fast.ops.context_content_pool`` (C++ on CPU, Triton on CUDA),
``reference`` = ``lvlm_fast.reference.context_content_pool``, ``seed`` =
:func:`benchmarks.seed.llamavid.seed_context_content` (the release's per-frame query copies,
materialised (N, Lq, P) attention and (N, Lq, C) product before the mean).

Bytes model (what must move, same for every impl): read X once (N*P*C), read the queries
(Lq*C), write the tokens (N*(1 + g*g)*C); element size 4 (fp32). The op is compute-bound
on CPU, so ``bw_fraction`` is low by nature; its figure of merit is ``gemm_fraction``.

FLOPs model (same for every impl): the scores K Q^T, 2*N*P*Lq*C, plus the pooling of X
(the attention-weighted context and the plain content sum): 4*N*P*C.

Peak memory: the harness's live-tensor tracker sees only tensors that pass the dispatcher.
The fused C++ kernel's scratch is per thread and per frame, invisible to it: P*Lq scores +
(1 + g*g)*C accumulators (~45 KB at this shape), plus Lq*C scaled queries (~180 KB, once
for shared queries), so the reported fused peak (the outputs + lse) undercounts by well
under 1 MB per thread.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("context_content_pool",)

# (N, P, Lq, C, content_grid)
FULL = [(1024, 256, 32, 1408, 1), (256, 256, 32, 1408, 2)]
QUICK = [(16, 256, 32, 256, 1), (16, 256, 32, 256, 2)]


def make_inputs(n: int, p: int, lq: int, c: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, c, generator=g, dtype=torch.float32)
    q = torch.randn(lq, c, generator=g, dtype=torch.float32)
    return {"x": x.to(dtype=dtype, device=device), "q": q.to(dtype=dtype, device=device)}


def bytes_model(n: int, p: int, lq: int, c: int, grid: int, elt: int) -> int:
    return (n * p * c + lq * c + n * (1 + grid * grid) * c) * elt


def flops_model(n: int, p: int, lq: int, c: int) -> int:
    return 2 * n * p * lq * c + 4 * n * p * c


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops  # registers the op and loads the C++ kernels
    from benchmarks.seed.llamavid import seed_context_content
    from lvlm_fast.reference.context_content_pool import context_content_pool as ref_pool

    note = fused_kernel_note("lvlm_fast::context_content_pool", device)
    out: list[Case] = []
    dtype = torch.float32
    for n, p, lq, c, grid in QUICK if quick else FULL:
        inp = Lazy(lambda n=n, p=p, lq=lq, c=c: make_inputs(n, p, lq, c, dtype, device))
        shape = f"N={n},P={p},Lq={lq},C={c},g={grid}"
        common = dict(op="context_content_pool", shape=shape, dtype="fp32",
                      bytes=bytes_model(n, p, lq, c, grid, 4),
                      flops=flops_model(n, p, lq, c), track_peak=True,
                      setup=inp.get, teardown=inp.release, rtol=1e-4, atol=1e-5)

        def fused(inp=inp, grid=grid):
            i = inp.get()
            return lvlm_fast.ops.context_content_pool(i["x"], i["q"], content_grid=grid)

        def reference(inp=inp, grid=grid):
            i = inp.get()
            return ref_pool(i["x"], i["q"], content_grid=grid)

        def seed(inp=inp, grid=grid):
            i = inp.get()
            return seed_context_content(i["x"], i["q"], content_grid=grid)

        out += [Case(impl="fused", fn=fused, note=note, **common),
                Case(impl="reference", fn=reference, **common),
                Case(impl="seed", fn=seed, **common)]
    return out
