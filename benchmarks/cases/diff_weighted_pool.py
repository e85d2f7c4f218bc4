"""Benchmark cases for ``diff_weighted_pool`` (ViLAMP differential feature merging).

Setting: the parameter-free form A = B = X (``rel``/``red`` omitted), one query vector
q (D,), a bank of K keyframes R = X[keyframe positions] (K, P, D), ``ref_index[n]`` = the
nearest keyframe at or before frame n (-1 before the first keyframe), tau = 0.01 (ViLAMP's
initial temperature). Keyframes sit at the middle of K equal segments, so the first few
frames have no reference and every keyframe compares with itself, as in the release.

Impls: ``fused`` = ``lvlm_fast.ops.diff_weighted_pool`` (C++ on CPU, Triton on CUDA),
``reference`` = ``lvlm_fast.reference.diff_weighted_pool``, ``seed`` =
:func:`benchmarks.seed.vilamp.seed_diff_weighted_pool` (materialised (N, P, D) repeats).

Bytes model (what must move, same for every impl): read X once (N*P*D), the keyframe bank
once (K*P*D), q (D) and ref_index (N int64); write out (N*D). Element size = dtype size.

Shapes: ``N=512,P=729,D=1152,K=32`` (target: SigLIP-so400m patches, 512 frames),
``N=128,P=729,D=1152,K=32`` (smaller), ``--quick``: ``N=16,P=49,D=64,K=4``.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("diff_weighted_pool",)
TAU = 0.01
FULL = [(512, 729, 1152, 32), (128, 729, 1152, 32)]
QUICK = [(16, 49, 64, 4)]


def keyframe_positions(n: int, k: int) -> list[int]:
    """Middle of each of k equal segments of n frames (sorted, distinct for k <= n)."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def make_inputs(n: int, p: int, d: int, k: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, d, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
    q = torch.randn(d, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
    pos = keyframe_positions(n, k)
    pos_t = torch.tensor(pos, device=device)
    bank = x[pos_t].contiguous()
    ref_index = torch.searchsorted(pos_t, torch.arange(n, device=device), right=True) - 1
    return {
        "x": x,
        "q": q,
        "bank": bank,
        "ref_index": ref_index.to(torch.int64),
        "pos": pos,
        "tau_t": torch.tensor(TAU, dtype=torch.float32, device=device),
    }


def bytes_model(n: int, p: int, d: int, k: int, elt: int) -> int:
    return (n * p * d + k * p * d + d + n * d) * elt + n * 8


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops  # registers the op, loads the C++ kernels (before the note below)
    from benchmarks.seed.vilamp import seed_diff_weighted_pool

    note = fused_kernel_note("lvlm_fast::diff_weighted_pool", device)
    out: list[Case] = []
    dtype = torch.float32
    for n, p, d, k in QUICK if quick else FULL:
        inp = Lazy(lambda n=n, p=p, d=d, k=k: make_inputs(n, p, d, k, dtype, device))
        shape = f"N={n},P={p},D={d},K={k}"
        common = dict(
            op="diff_weighted_pool",
            shape=shape,
            dtype="fp32",
            bytes=bytes_model(n, p, d, k, 4),
            track_peak=True,
            setup=inp.get,
            teardown=inp.release,
            rtol=1e-3,
            atol=1e-4,
        )

        def fused(inp=inp):
            i = inp.get()
            return lvlm_fast.ops.diff_weighted_pool(
                i["x"], i["q"], i["bank"], i["ref_index"], tau=i["tau_t"]
            )

        def reference(inp=inp):
            import lvlm_fast.reference

            i = inp.get()
            return lvlm_fast.reference.diff_weighted_pool(
                i["x"], i["q"], i["bank"], i["ref_index"], tau=TAU
            )

        def seed(inp=inp):
            i = inp.get()
            return seed_diff_weighted_pool(i["x"], i["pos"], i["q"], TAU)

        out += [
            Case(impl="fused", fn=fused, note=note, **common),
            Case(impl="reference", fn=reference, **common),
            Case(impl="seed", fn=seed, **common),
        ]
    return out
