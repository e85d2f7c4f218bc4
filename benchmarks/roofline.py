"""Roofline report for the Triton kernels at the shipped 7B configs (ESTIMATES, no GPU ran).

    python benchmarks/roofline.py [--frames 10240] [--model llava-onevision-qwen2-7b]
                                  [--strategies full vilamp ...] [--out PATH]

1. Kernel launches per video. The wrapper runs the whole pass (video in, first answer token
   out) for each strategy on the meta device, as the memory profiler does (``lvlm_fast.
   profile.memory``: the model built from its config without weights, its shape cache and
   vision-chunk replay). A ``TorchDispatchMode`` records every ``lvlm_fast::*`` op call and
   replays it through that op's CUDA launcher (``lvlm_fast.kernels``) on the same meta
   tensors with every ``triton.jit`` kernel replaced by a recorder: the Triton launches
   counted are the ones the CUDA path would issue (grid, block sizes, warps, stages as the
   launcher picks them). Model kernels (aten / cuBLAS / SDPA) are not counted, nor the small
   torch reductions some launchers run (e.g. a sum over KV heads).
   "Before" counts the same op calls with the launch rules of the launchers before issue 14
   section 2: eviction was one ``evict_summaries`` launch per layer, summary_attention one
   launch per call (key mass by atomics inside it, decode without split-KV),
   diff_weighted_pool one launch per call (one program per frame, no patch split),
   context_content_pool one score launch per 64 queries + the pool launch (no patch split).
2. Per kernel: bytes that must move (compulsory: every input read once, every output
   written once), FLOPs, the grid and config the launcher picks, and the roofline time
   ``max(bytes / BW, FLOPs / peak)`` on H100 and A100 at the rates in ``MACHINES``.
3. Decode at long caches: summary_attention with Lq = 1 before (one program per query head,
   K/V re-read by every head of a group) and after (split-KV) by the bytes model.

Every time printed is an estimate from these models, never a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pkgutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (bytes/s, dense bf16 tensor-core FLOP/s, SMs): vendor datasheet peaks
MACHINES = {
    "H100": {"bw": 3.35e12, "flops": 989e12, "sms": 132, "what": "H100 SXM5 80GB: 3.35 TB/s "
             "HBM3, 989 TFLOP/s dense bf16"},
    "A100": {"bw": 2.039e12, "flops": 312e12, "sms": 108, "what": "A100 SXM4 80GB: 2.039 TB/s "
             "HBM2e, 312 TFLOP/s dense bf16"},
}
STRATEGIES = ("full", "uniform", "vilamp", "slowfast", "llamavid", "videoxl")
OVERRIDES = {"videoxl": {"ratio": 16}}  # as the committed memory profile
TOP_SHAPES = 4  # most frequent shape signatures listed per op


# --------------------------------------------------------------------------- launch recorder
class _Recorder:
    def __init__(self, name: str, log: list[dict]) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args: Any, **kwargs: Any) -> None:
            g = grid(kwargs) if callable(grid) else grid
            g = tuple(int(x) for x in g)
            self.log.append({"kernel": self.name, "grid": g, "programs": math.prod(g),
                             "config": {k: v for k, v in kwargs.items()
                                        if k.isupper() or k.startswith("num_")}})

        return launch


@contextlib.contextmanager
def recording_launches(log: list[dict]) -> Iterator[None]:
    """Replace every ``triton.jit`` kernel of ``lvlm_fast.kernels.*`` by a recorder."""
    import lvlm_fast.kernels as pkg
    import triton

    saved = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"lvlm_fast.kernels.{info.name}")
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.JITFunction) and name.startswith("_") \
                    and name.endswith("_kernel"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(name, log))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _cuda_launchers() -> dict[str, Any]:
    """op name -> the launcher its CUDA dispatch key calls (lvlm_fast/ops/*.py ->
    lvlm_fast.kernels.*; the registered ``_cuda*`` wrappers are thin calls of these)."""
    def k(mod: str, fn: str) -> Any:
        return getattr(importlib.import_module(f"lvlm_fast.kernels.{mod}"), fn)

    def evict_layers(keys, values, *rest):
        return k("evict_summaries", "evict_summaries_layers_fwd")(list(keys), list(values),
                                                                  *rest)

    return {
        "context_content_pool": k("context_content_pool", "context_content_pool_fwd"),
        "context_content_pool_backward": k("context_content_pool", "context_content_pool_bwd"),
        "diff_weighted_pool": k("diff_weighted_pool", "diff_weighted_pool_fwd"),
        "diff_weighted_pool_backward": k("diff_weighted_pool", "diff_weighted_pool_bwd"),
        "evict_summaries": k("evict_summaries", "evict_summaries_fwd"),
        "evict_summaries_layers": evict_layers,
        "keyframe_select": k("keyframe_select", "keyframe_select_fwd"),
        "kv_compact": k("kv_compact", "kv_compact_fwd"),
        "qformer_cross_attention": k("qformer_cross_attention", "qformer_cross_attention_fwd"),
        "slowfast_pool": k("slowfast_pool", "slowfast_pool_fwd"),
        "summary_attention": k("summary_attention", "summary_attention_fwd"),
        "summary_attention_backward": k("summary_attention", "summary_attention_bwd"),
    }


def _legacy_launches(op: str, args: tuple) -> int | None:
    """Launches of the same call under the pre-issue-14.2 launchers (None: unchanged)."""
    if op == "evict_summaries_layers":
        return len(args[0]) if args[6] > 0 else 0  # one per layer
    if op in ("summary_attention", "diff_weighted_pool"):
        return 1  # no split-KV / no patch split: one launch, no merge
    if op == "context_content_pool":  # one program per frame: a launch per 64 queries + pool
        return -(-args[1].shape[-2] // 64) + 1
    return None


class LaunchCounter(TorchDispatchMode):
    """Records each ``lvlm_fast::*`` call and the Triton launches its CUDA launcher makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self._launchers = _cuda_launchers()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lvlm_fast":
            op = func._opname
            log: list[dict] = []
            fn = self._launchers.get(op)
            if fn is not None:
                with torch._C._DisableTorchDispatch(), recording_launches(log):
                    fn(*args, **kwargs)
            legacy = _legacy_launches(op, args)
            self.calls.append({"op": op, "sig": _signature(args), "launches": log,
                               "legacy": len(log) if legacy is None else legacy,
                               "model": op_model(op, args)})
        return func(*args, **kwargs)


def _signature(args: tuple) -> str:
    """Tensor shapes, bools and floats of a call (ints such as a window's start row are left
    out so that calls of one shape group together)."""
    parts = []
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            continue
        if isinstance(a, torch.Tensor):
            parts.append("x".join(map(str, a.shape)) or "scalar")
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            parts.append(f"{len(a)}*[{'x'.join(map(str, a[0].shape))}]")
        elif isinstance(a, float):
            parts.append(f"{a:.3g}")
        else:
            parts.append(str(a))
    return "(" + ", ".join(parts) + ")"


# --------------------------------------------------------------------------- bytes / FLOPs
def _nb(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _attn_pairs(lq: int, s: int) -> int:
    """Visible (query, key) pairs under the bottom-right causal rule."""
    return lq * (s - lq) + lq * (lq + 1) // 2


def op_model(op: str, args: tuple) -> dict[str, float]:
    """Compulsory bytes (inputs read once, outputs written once) and FLOPs of one call."""
    if op == "summary_attention":
        q, k, v, _, mass = args[:5]
        b, hq, lq, d = q.shape
        s = k.shape[2]
        pairs = _attn_pairs(lq, s)
        flops = 4 * b * hq * pairs * d + (2 * b * hq * pairs * d if mass else 0)
        by = 2 * _nb(q) + _nb(k) + _nb(v) + 4 * b * hq * lq + (4 * b * s if mass else 0)
        return {"bytes": by, "flops": flops}
    if op == "evict_summaries_layers":
        keys, _, _, _, _, _, count = args[:7]
        k0 = keys[0]
        b, h, _, d = k0.shape
        row = b * h * d * k0.element_size()
        return {"bytes": 2 * 2 * len(keys) * count * row,
                "flops": 6 * len(keys) * count * b * h * d}
    if op == "evict_summaries":
        k0, count = args[0], args[6]
        b, h, _, d = k0.shape
        return {"bytes": 4 * count * b * h * d * k0.element_size(), "flops": 6 * count * b * h * d}
    if op == "diff_weighted_pool":
        x = args[0]
        n, p, c = x.shape
        return {"bytes": _nb(x) + n * c * x.element_size() + sum(_nb(a) for a in args[1:4]),
                "flops": 6 * n * p * c}
    if op == "context_content_pool":
        x, queries, keys, _, grid = args[:5]
        n, p, c = x.shape
        lq, ck = queries.shape[-2], queries.shape[-1]
        return {"bytes": _nb(x) + _nb(queries) + _nb(keys) + n * (1 + grid * grid) * c
                * x.element_size(), "flops": 2 * n * lq * p * ck + 4 * n * p * c}
    if op == "slowfast_pool":
        x = args[0]
        return {"bytes": 2 * _nb(x), "flops": x.numel()}  # upper bound: output <= input
    if op == "keyframe_select":
        f, qe = args[:2]
        return {"bytes": _nb(f) + _nb(qe), "flops": 2 * f.shape[0] * f.shape[-1] * 3}
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return {"bytes": 2 * sum(_nb(t) for t in tensors), "flops": 0}


def roofline_ms(by: float, flops: float, m: dict) -> float:
    return 1e3 * max(by / m["bw"], flops / m["flops"])


# --------------------------------------------------------------------------- runs
def run_strategy(profiler: Any, strategy: str, frames: int) -> LaunchCounter:
    from lvlm_fast.profile.memory import (
        SimulationTracker,
        _make_wrapper,
        _run_first_token,
        make_prompt,
    )

    strat = profiler.strategy(strategy)
    model = profiler.model_for(strategy)
    vlm = _make_wrapper(model, strat, profiler.vlm_kwargs)
    prompt = make_prompt(profiler.config, frames, dtype=profiler.dtype, device=profiler.device,
                         seed=0, frame_hw=profiler.frame_hw)
    tr = SimulationTracker(cache=True)
    vlm.family.encode = profiler.chunk_replay.wrap(vlm.family.encode, tr)
    counter = LaunchCounter()
    with torch.inference_mode(), tr, counter:
        _run_first_token(vlm, prompt)
    return counter


def decode_section(s_values: tuple[int, ...], out: list[str]) -> None:
    """summary_attention decode (Lq = 1) at the 7B heads (Hq 28, Hkv 4, Dh 128, bf16)."""
    from lvlm_fast.kernels import summary_attention as k

    hq, hkv, d, isz = 28, 4, 128, 2
    out.append("\n## summary_attention decode, Lq = 1, Hq 28 / Hkv 4 / Dh 128, bf16 (estimates)")
    out.append("before: one program per (b, query head) walking S serially (28 programs), K/V "
               "re-read by each of the G = 7 heads of a group; after: split-KV, one program "
               "per (split, KV group), K/V read once per group, + 1 merge launch. Occupancy "
               "model: achieved bandwidth = BW x min(1, programs / SMs) (one program per SM "
               "cannot saturate HBM, ~ the single-SM share).")
    hdr = f"{'S':>9} | {'design':6} | {'programs':>8} | {'bytes':>10} | " + " | ".join(
        f"{n} ms (est.)" for n in MACHINES)
    out.append(hdr)
    for s in s_values:
        kv = 2 * hkv * s * d * isz
        cfg = k.splitkv_config(torch.bfloat16, hq // hkv, 128)
        nsplit, _ = k.splitkv_splits(s, hkv, cfg["BLOCK_N"])
        for design, programs, by in (("before", hq, kv * (hq // hkv)),
                                     ("after", nsplit * hkv, kv + nsplit * hq * (d + 1) * 4)):
            ts = []
            for m in MACHINES.values():
                bw = m["bw"] * min(1.0, programs / m["sms"])
                ts.append(f"{1e3 * max(by / bw, 4 * hq * s * d / m['flops']):12.4f}")
            out.append(f"{s:>9} | {design:6} | {programs:>8} | {by / 1e6:8.1f}MB | "
                       + " | ".join(ts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=10240)
    ap.add_argument("--model", default="llava-onevision-qwen2-7b")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--out", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import lvlm_fast  # noqa: F401
    from lvlm_fast.profile.memory import Profiler

    out: list[str] = []
    out.append(f"# Roofline report (ESTIMATES: bytes/FLOPs models, no GPU timing) - {a.model}, "
               f"bf16, {a.frames} frames, simulated on the meta device")
    for n, m in MACHINES.items():
        out.append(f"rates {n}: {m['what']}, {m['sms']} SMs")
    out.append("bytes = compulsory traffic (inputs read once, outputs written once); roofline "
               "time = max(bytes / BW, FLOPs / peak).")
    prof = Profiler(a.model, strategy_overrides=OVERRIDES)
    totals = []
    per_op: dict[tuple[str, str], dict] = {}
    for strat in a.strategies:
        t0 = time.perf_counter()
        c = run_strategy(prof, strat, a.frames)
        after = sum(len(x["launches"]) for x in c.calls)
        before = sum(x["legacy"] for x in c.calls)
        ops = Counter(x["op"] for x in c.calls)
        totals.append((strat, before, after, dict(ops), time.perf_counter() - t0))
        for x in c.calls:
            key = (x["op"], x["sig"])
            e = per_op.setdefault(key, {"strategies": set(), "calls": 0, "call": x})
            e["strategies"].add(strat)
            e["calls"] += 1
        print(f"[{strat}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    out.append(f"\n## Triton launches per {a.frames}-frame video (first answer token), counted "
               "by a TorchDispatchMode on the meta device")
    out.append(f"{'strategy':10} | {'before':>8} | {'after':>8} | lvlm_fast op calls")
    for strat, before, after, ops, _ in totals:
        out.append(f"{strat:10} | {before:>8} | {after:>8} | "
                   + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) if ops else
                   f"{strat:10} | {before:>8} | {after:>8} | (none)")
    out.append("\n## Kernels at the shapes the wrapper calls them with (estimates): per op the "
               f"{TOP_SHAPES} most frequent shape signatures and the largest one by bytes")
    out.append("op (shape signature) [strategies] calls: per-launch kernel, grid, config; "
               "per-call bytes, FLOPs, roofline ms on " + ", ".join(MACHINES))
    shown: Counter = Counter()
    biggest: dict[str, tuple[str, int]] = {}  # op -> (signature, bytes) of its largest call
    for (op, sig), e in per_op.items():
        by = e["call"]["model"]["bytes"]
        if op not in biggest or by > biggest[op][1]:
            biggest[op] = (sig, by)
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1]["calls"])
    for (op, sig), e in ranked:
        shown[op] += 1
        if shown[op] > TOP_SHAPES and biggest[op][0] != sig:
            continue
        x = e["call"]
        m = x["model"]
        rt = ", ".join(f"{n} {roofline_ms(m['bytes'], m['flops'], mm):.4f}"
                       for n, mm in MACHINES.items())
        out.append(f"- {op}{sig} [{', '.join(sorted(e['strategies']))}] x{e['calls']}: "
                   f"bytes {m['bytes'] / 1e6:.2f} MB, FLOPs {m['flops'] / 1e9:.3f} G, "
                   f"roofline ms {rt}")
        runs: list[list] = []  # consecutive identical launches collapsed: [launch, count]
        for ln in x["launches"]:
            if runs and runs[-1][0] == ln:
                runs[-1][1] += 1
            else:
                runs.append([ln, 1])
        for ln, cnt in runs:
            out.append(f"    {ln['kernel']} grid {ln['grid']} ({ln['programs']} programs) "
                       f"{ln['config']}" + (f" x{cnt}" if cnt > 1 else ""))
    hidden = {op: n - TOP_SHAPES - 1 for op, n in shown.items() if n > TOP_SHAPES + 1}
    if hidden:
        out.append("(not listed: " + ", ".join(f"{op}: {n} rarer shape signatures"
                                             for op, n in sorted(hidden.items())) + ")")
    decode_section((32_768, 131_072, 1_048_576), out)
    text = "\n".join(out)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
