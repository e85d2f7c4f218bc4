"""Benchmark cases for ``keyframe_select`` (ViLAMP differential keyframe selection).

Inputs: frame embeddings E (N, 512) and a query embedding t (512,) shaped like a video:
N frames in scenes of 40 frames, each frame = its scene's random unit centroid + noise
(within-scene cosine ~0.9, above tau_f = 0.85), the query = a mix of 12 scene centroids
(relevance ~0.3 on those scenes, ~0 elsewhere, floor 0.2). So the greedy pass selects a
few frames per relevant scene, suppresses their scene-mates, stops at the floor, and the
budget fill places the rest: every stage of the algorithm runs. K = 32, tau_f = 0.85,
relevance floor 0.2 for every impl.

Impls: ``fused`` = ``lvlm_fast.ops.keyframe_select``, ``reference`` =
``lvlm_fast.reference.keyframe_select`` (both skipped with a note if not importable yet),
``seed`` = :func:`benchmarks.seed.vilamp.seed_keyframe_select` (full N x N matrix, Python
greedy loop with a host sync per step, Python budget fill). Outputs (the selected indices
in time order) are checked for exact equality against the reference.

Bytes model (what must move, same for every impl): read E once (N * E * elt) and t
(E * elt); write the K selected indices and the (N,) reference index, int64 (the op's
outputs). A greedy walk that re-streamed E for the relevance pass and once per selected
frame would move (K + 1) * N * E * elt, but at these sizes E (21 MB at N = 10,240) stays
largely in cache between passes, so that count would give bw_fraction > 1 and say nothing;
this op is latency/compute bound on CPU, and ``bw_fraction`` here only shows how far from
a single streaming read it is. The seed's N x N matrix (N^2 * 4 bytes) is not counted.

Shapes: ``N=10240,E=512,K=32`` (target: 10K frames), ``N=2048,E=512,K=32`` (smaller),
``--quick``: ``N=256,E=64,K=8``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note, skipped

OPS = ("keyframe_select",)
TAU_F = 0.85
FLOOR = 0.2
SCENE_LEN = 40
RELEVANT_SCENES = 12
FULL = [(10240, 512, 32), (2048, 512, 32)]
QUICK = [(256, 64, 8)]


def make_inputs(n: int, e: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    scenes = (n + SCENE_LEN - 1) // SCENE_LEN
    cent = torch.nn.functional.normalize(torch.randn(scenes, e, generator=g), dim=1)
    scene_of = torch.arange(n) // SCENE_LEN
    noise = torch.randn(n, e, generator=g) / e**0.5
    emb = cent[scene_of] + 0.3 * noise
    pick = torch.randperm(scenes, generator=g)[: min(RELEVANT_SCENES, scenes)]
    query = cent[pick].sum(0) + 0.1 * torch.randn(e, generator=g) / e**0.5
    return {
        "emb": emb.to(dtype=dtype, device=device),
        "query": query.to(dtype=dtype, device=device),
    }


def bytes_model(n: int, e: int, k: int, elt: int) -> int:
    return n * e * elt + e * elt + (k + n) * 8


_ALIASES = {
    "k": ("k", "num_keyframes", "num_frames", "max_frames", "max_frame_num", "budget"),
    "tau_f": (
        "tau_f",
        "threshold",
        "redundancy_threshold",
        "sim_threshold",
        "f2f_thrd",
        "tau",
        "redundancy",
    ),
    "floor": (
        "floor",
        "relevance_floor",
        "rel_floor",
        "min_relevance",
        "f2t_thrd",
        "relevance_threshold",
    ),
}


def _binder(fn: Callable, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Call ``fn(emb, query, <k>, <tau_f>, <floor>)`` whatever its keyword names are, and
    return the indices (the first element if it returns a tuple)."""
    params = inspect.signature(fn).parameters
    kw = {}
    for ours, value in (("k", k), ("tau_f", TAU_F), ("floor", FLOOR)):
        name = next((a for a in _ALIASES[ours] if a in params), None)
        if name is None:
            raise TypeError(
                f"cannot find the {ours} argument of {fn.__qualname__}{inspect.signature(fn)}"
            )
        kw[name] = value

    def call(emb: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        out = fn(emb, query, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    return call


def _load(module: str, device: str) -> tuple[Callable | None, str]:
    import importlib

    try:
        fn = importlib.import_module(module).keyframe_select
        if inspect.ismodule(fn):  # the submodule, not (yet) re-exported as the function
            fn = fn.keyframe_select
        return fn, ""
    except (ImportError, AttributeError) as exc:
        return None, f"{module}.keyframe_select not available yet ({exc.__class__.__name__})"


def cases(quick: bool, device: str) -> list[Case]:
    from benchmarks.seed.vilamp import seed_keyframe_select

    fused_fn, fused_why = _load("lvlm_fast.ops", device)
    ref_fn, ref_why = _load("lvlm_fast.reference", device)
    note = fused_kernel_note("lvlm_fast::keyframe_select", device) if fused_fn else ""
    out: list[Case] = []
    for n, e, k in QUICK if quick else FULL:
        inp = Lazy(lambda n=n, e=e: make_inputs(n, e, torch.float32, device))
        shape = f"N={n},E={e},K={k}"
        common = dict(
            op="keyframe_select",
            shape=shape,
            dtype="fp32",
            bytes=bytes_model(n, e, k, 4),
            track_peak=True,
            setup=inp.get,
            teardown=inp.release,
            rtol=0.0,
            atol=0.0,
        )
        for impl, fn, why in (("fused", fused_fn, fused_why), ("reference", ref_fn, ref_why)):
            if fn is None:
                print(f"note: keyframe_select {impl} skipped: {why}")
                out.append(skipped("keyframe_select", impl, shape, "fp32", why))
                continue
            try:
                call = _binder(fn, k)
            except TypeError as exc:
                out.append(skipped("keyframe_select", impl, shape, "fp32", str(exc)))
                continue
            out.append(
                Case(
                    impl=impl,
                    fn=lambda call=call, inp=inp: call(**inp.get()),
                    note=note if impl == "fused" else "",
                    **common,
                )
            )

        def seed(inp=inp, k=k):
            i = inp.get()
            return seed_keyframe_select(i["emb"], i["query"], k, TAU_F, FLOOR)

        out.append(Case(impl="seed", fn=seed, **common))
    return out
