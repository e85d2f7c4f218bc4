"""Benchmark cases for ``kv_compact`` (InfiniPot-V-style compaction of every layer's cache).

Shapes (one compression at the end of a block, the released code's defaults: block of 32
frames, keep 24, the newest 8 protected, ``tar_ratio`` 0.5):
  * ``7b``: LLaVA-OneVision-7B's decoder cache (28 layers, 4 KV heads, head dim 128),
    196 tokens per frame, 14 system tokens: C = 14 + 32 x 196 = 6,286 rows, budget
    14 + 24 x 196 = 4,718.
  * ``--quick``: 2 layers, 2 KV heads, head dim 32, 16 tokens per frame, 6 system tokens,
    8 frames kept to 6 (2 recent).

Impls: ``fused`` = ``lvlm_fast.ops.kv_compact`` on one stacked (L, 1, H, C, D) buffer, in
place; ``seed`` = :func:`benchmarks.seed.infinipot_v.seed_process_kv_cache` (the released
per-layer loop: normalised copies, the 6-D broadcast TaR product, two top-k + sorts,
advanced-index gather + ``torch.cat`` into new tensors, a host-syncing assert);
``reference`` = :func:`lvlm_fast.reference.kv_compact.kv_compact` (a Python loop per head
and per row: quick shape only, minutes at 7b).

What is compared: every impl returns the kept-row mask (L, H, C) of its FIRST call (the
fused and reference masks come from the op; the seed's is scattered from its indices,
a few microseconds). ``tar_ratio`` is set so the fused op gives TaR exactly the seed's
TaR slots (``tar_budget - recent``). The fused op edits its buffer in place, so later
repeats compact an already-compacted buffer at the same length: the same work on
different rows (timing only).

Bytes model (what must move): read K and V of every row once (scores), write the kept
rows behind the system prefix once: ``L * H * (C + budget - sys) * (D + Dv) * elt``.
``peak_bytes``: the seed allocates a new cache per layer (plus its TaR product); the fused
op allocates only its (L, H, C) mask and (2, L, H, C) fp32 scores.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note, skipped

OPS = ("kv_compact",)

FULL = [dict(tag="7b", layers=28, heads=4, d=128, p=196, sys=14, frames=32, keep=24,
             recent=8)]
QUICK = [dict(tag="quick", layers=2, heads=2, d=32, p=16, sys=6, frames=8, keep=6, recent=2)]
TAR_RATIO = 0.5


def _sizes(s: dict) -> dict:
    c = s["sys"] + s["frames"] * s["p"]
    budget = s["sys"] + s["keep"] * s["p"]
    recent = s["recent"] * s["p"]
    keep_tokens = s["keep"] * s["p"]
    tar_budget = keep_tokens - round((1 - TAR_RATIO) * keep_tokens)
    k = budget - s["sys"] - recent
    return dict(c=c, budget=budget, recent=recent, primary=tar_budget - recent, k=k)


def _inputs(s: dict, device: str) -> dict:
    z = _sizes(s)
    g = torch.Generator().manual_seed(0)
    shape = (s["layers"], 1, s["heads"], z["c"], s["d"])
    k = torch.randn(*shape, generator=g)
    v = torch.randn(*shape, generator=g) * (1 + torch.rand(*shape[:4], 1, generator=g))
    inv = 1.0 / 1e6 ** (torch.arange(0, s["d"], 2, dtype=torch.float32) / s["d"])
    return {"k": k.to(device), "v": v.to(device), "k0": k.clone().to(device),
            "v0": v.clone().to(device),
            "inv": inv.to(device)}


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops
    from benchmarks.seed.infinipot_v import seed_process_kv_cache
    from lvlm_fast.reference.kv_compact import kv_compact as ref

    note = fused_kernel_note("lvlm_fast::kv_compact", device)
    out = []
    for s in QUICK if quick else FULL:
        z = _sizes(s)
        inp = Lazy(lambda s=s: _inputs(s, device))
        shape = (f"{s['tag']}:L={s['layers']},Hkv={s['heads']},D={s['d']},P={s['p']},"
                 f"sys={s['sys']},frames={s['frames']}->{s['keep']},recent={s['recent']},"
                 f"C={z['c']},budget={z['budget']}")
        nbytes = s["layers"] * s["heads"] * (z["c"] + z["budget"] - s["sys"]) * 2 * s["d"] * 4
        common = dict(op="kv_compact", shape=shape, dtype="fp32", bytes=nbytes,
                      track_peak=True, setup=inp.get, teardown=inp.release)
        ratio = z["primary"] / z["k"]

        def fused(inp=inp, s=s, z=z, ratio=ratio):
            i = inp.get()
            res = lvlm_fast.ops.kv_compact(
                i["k"], i["v"], z["c"], budget=z["budget"], inv_freq=i["inv"], prefix=s["sys"],
                recent=z["recent"], tokens_per_frame=s["p"], tar_ratio=ratio)
            return res.keep[:, 0]

        def seed(inp=inp, s=s, z=z):
            i = inp.get()
            keys = [i["k0"][li] for li in range(s["layers"])]
            values = [i["v0"][li] for li in range(s["layers"])]
            _, _, kept = seed_process_kv_cache(keys, values, s["sys"], s["p"], s["keep"],
                                               s["recent"], TAR_RATIO)
            mask = torch.zeros(s["layers"], s["heads"], z["c"], dtype=torch.bool,
                               device=device)
            mask[:, :, : s["sys"]] = True
            return mask.scatter_(2, torch.stack(kept) + s["sys"], True)

        def reference(inp=inp, s=s, z=z):
            i = inp.get()
            _, keep, _ = ref(i["k0"].clone(), i["v0"].clone(), z["c"], i["inv"],
                             budget=z["budget"], prefix=s["sys"], recent=z["recent"],
                             tokens_per_frame=s["p"], primary_slots=z["primary"])
            return keep[:, 0]

        out.append(Case(impl="fused", fn=fused, note=note, **common))
        out.append(Case(impl="seed", fn=seed, **common))
        if quick:
            out.append(Case(impl="reference", fn=reference, **common))
        else:
            out.append(skipped("kv_compact", "reference", shape, "fp32",
                               "the reference loops over every row in Python (minutes at "
                               "this shape); it is checked against the kernels in tests"))
    return out


def summarize(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        # run.py hands every case the rows of the whole run: keep this op's own
        if r["op"] == "kv_compact" and r["impl"] == "fused" and r.get("speedup_vs_seed"):
            lines.append(f"kv_compact {r['shape'].split(':')[0]}: fused {r['median_ms']:.2f} ms, "
                         f"{r['speedup_vs_seed']:.1f}x the seed")
    return lines
