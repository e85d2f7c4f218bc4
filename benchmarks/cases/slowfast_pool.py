"""Benchmark cases for ``slowfast_pool`` (SlowFast-LLaVA dual-stream pooling).

Settings (one video, features after the projector, 24x24 CLIP-336 grid, D = 1152):
  * ``sf1.5``: the SlowFast-LLaVA-1.5 reading (:meth:`SlowFastConfig.sf_llava_1_5`):
    T = 128, 32 slow frames (released linspace = stride 4) with 2x2 average pooling, all
    128 frames adaptively pooled to 6x6 (4x4 pooling): 9,216 tokens.
  * ``sf1-1dmax``: the released v1 pooling (1-D pairwise max = kernel (1, 2), 4x4 fast)
    at the same T = 128 with 32 slow frames: 32*288 + 128*16 = 11,264 tokens.
  * ``sf1-T50``: the released v1 setting exactly (:meth:`SlowFastConfig.sf_llava`):
    50 frames, 10 slow, 3,680 tokens.
``--quick``: T = 8, 12x12 grid, D = 64.

Impls: ``fused`` = ``lvlm_fast.ops.slowfast_pool`` (C++ on CPU, Triton on CUDA),
``reference`` = ``lvlm_fast.reference.slowfast_pool``, ``seed`` =
:func:`benchmarks.seed.slowfast.seed_slowfast` (the released code's per-call pooling
modules and channels-first permute-copies, one video per call).

Bytes model (what must move, same for every impl): read x once (T*H*W*D), write the
tokens (tokens*D), read the slow indices (Ns int64). Inference (no grad): the max-mode
arg-max indices are not produced. Element size = dtype size (fp32 here).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("slowfast_pool",)

# (tag, T, Ns, grid, D, slow_kernel, slow_mode, fast_grid, seed slow aggregation)
FULL = [
    ("sf1.5", 128, 32, 24, 1152, (2, 2), "avg", (6, 6), "spatial_2d_avg_pool"),
    ("sf1-1dmax", 128, 32, 24, 1152, (1, 2), "max", (4, 4), "spatial_1d_max_pool"),
    ("sf1-T50", 50, 10, 24, 1152, (1, 2), "max", (4, 4), "spatial_1d_max_pool"),
]
QUICK = [
    ("sf1.5", 8, 2, 12, 64, (2, 2), "avg", (6, 6), "spatial_2d_avg_pool"),
    ("sf1-1dmax", 8, 2, 12, 64, (1, 2), "max", (4, 4), "spatial_1d_max_pool"),
]


def make_inputs(t: int, ns: int, side: int, d: int, dtype: torch.dtype, device: str) -> dict:
    from lvlm_fast.reference.slowfast_pool import released_slow_index

    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, side * side, d, generator=g, dtype=torch.float32)
    return {"x": x.to(dtype=dtype, device=device),
            "idx": released_slow_index(t, ns).to(device)}


def bytes_model(t: int, ns: int, side: int, d: int, tokens: int, elt: int) -> int:
    return (t * side * side * d + tokens * d) * elt + ns * 8


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops  # registers the op and loads the C++ kernels
    from benchmarks.seed.slowfast import seed_slowfast
    from lvlm_fast.ops.slowfast_pool import num_tokens

    note = fused_kernel_note("lvlm_fast::slowfast_pool", device)
    out: list[Case] = []
    dtype = torch.float32
    for tag, t, ns, side, d, sk, mode, fg, seed_how in QUICK if quick else FULL:
        inp = Lazy(lambda t=t, ns=ns, side=side, d=d: make_inputs(t, ns, side, d, dtype, device))
        tokens = num_tokens(t, ns, side, side, sk, fg, "all", "slow_fast", False)
        shape = f"{tag}:T={t},Ns={ns},{side}x{side},D={d}"
        common = dict(op="slowfast_pool", shape=shape, dtype="fp32",
                      bytes=bytes_model(t, ns, side, d, tokens, 4), track_peak=True,
                      setup=inp.get, teardown=inp.release, rtol=1e-4, atol=1e-5)
        opts = dict(slow_kernel=sk, slow_mode=mode, fast_grid=fg)

        def fused(inp=inp, side=side, opts=opts):
            i = inp.get()
            return lvlm_fast.ops.slowfast_pool(i["x"], grid=(side, side), slow_index=i["idx"],
                                               **opts)

        def reference(inp=inp, side=side, opts=opts):
            from lvlm_fast.reference.slowfast_pool import slowfast_pool as ref_pool

            i = inp.get()
            x = i["x"]
            return ref_pool(x.view(x.shape[0], side, side, x.shape[2]), i["idx"], **opts)

        def seed(inp=inp, ns=ns, seed_how=seed_how, fg=fg):
            return seed_slowfast(inp.get()["x"], ns, seed_how, fg)[0]

        out += [Case(impl="fused", fn=fused, note=note, **common),
                Case(impl="reference", fn=reference, **common),
                Case(impl="seed", fn=seed, **common)]
    return out
