"""Benchmark cases for ``summary_attention`` (Video-XL window attention).

Shapes: one window of W = 1,440 raw tokens + 90 summaries (r = 16) = 1,530 queries over
[sink = 14 ; retained summaries ; window]:
  * ``bench``: the model-level decoder (8 query / 2 KV heads, head dim 64), 2,250 retained
    summaries (the last window of a 256-frame video);
  * ``7b``: Qwen2-7B heads (28 query / 4 KV, head dim 128), 1,000 retained summaries.
``--quick``: 4/2 heads, head dim 64, 200 queries over 500 keys.

Impls: ``fused`` = ``lvlm_fast.ops.summary_attention`` on views of a preallocated buffer;
``seed`` = the released SDPA path (concatenate memory and window, repeat KV heads, float
mask (1, 1, q, mem + q), ``F.scaled_dot_product_attention``); ``reference`` =
``lvlm_fast.reference.summary_attention``; ``sdpa_flash`` = torch's own flash kernel for CPU
(``aten._scaled_dot_product_flash_attention_for_cpu``) on exactly the work the op must do:
the Lq queries against the M = S - Lq memory keys (no mask) and against the Lq window keys
(causal), with the KV heads repeated to Hq in setup (untimed). It is the speed target: the
fused op (which runs the same flash kernel on stride-0 GQA views, then merges the two parts
with their log-sum-exps) must stay within 10% of it (``summarize`` prints the ratio).

Bytes model (what must move): read q, k, v once, write out: (2*Hq*Lq + 2*Hkv*S) * D * elt.
FLOPs model: QK^T and PV over the visible (query, key) pairs, 2 FLOPs per multiply-add:
4 * Hq * D * (Lq*M + Lq*(Lq+1)/2).
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("summary_attention",)

FULL = [("bench", 8, 2, 64, 1530, 14 + 2250 + 1530), ("7b", 28, 4, 128, 1530, 14 + 1000 + 1530)]
QUICK = [("quick", 4, 2, 64, 200, 500)]


def _inputs(hq, hkv, d, lq, s, device):
    g = torch.Generator().manual_seed(0)
    cap = s + 64  # preallocated buffer; k/v are views
    kbuf = torch.randn(1, hkv, cap, d, generator=g).to(device)
    vbuf = torch.randn(1, hkv, cap, d, generator=g).to(device)
    q = torch.randn(1, lq, hq, d, generator=g).to(device).transpose(1, 2)
    k, v = kbuf[:, :, :s], vbuf[:, :, :s]
    m = s - lq
    rep = lambda t: t.repeat_interleave(hq // hkv, dim=1).contiguous()
    flash = {"q": q.contiguous(), "k_mem": rep(k[:, :, :m]), "v_mem": rep(v[:, :, :m]),
             "k_win": rep(k[:, :, m:]), "v_win": rep(v[:, :, m:])}
    return {"q": q, "k": k, "v": v, "flash": flash}


def flops_model(hq: int, d: int, lq: int, s: int) -> int:
    return 4 * hq * d * (lq * (s - lq) + lq * (lq + 1) // 2)


def summarize(rows: list[dict]) -> list[str]:
    """fused / sdpa_flash median time per shape (the target: <= 1.10)."""
    out = []
    by = {(r["shape"], r["impl"]): r for r in rows if r["op"] == "summary_attention"}
    for (shape, impl), r in by.items():
        f = by.get((shape, "sdpa_flash"))
        if impl == "fused" and f is not None:
            out.append(f"summary_attention {shape}: fused / sdpa_flash time = "
                       f"{r['median_ms'] / f['median_ms']:.3f} (target <= 1.10)")
    return out


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops
    from benchmarks.seed.videoxl import seed_sdpa_attention
    from lvlm_fast.reference.summary_attention import summary_attention as ref

    note = fused_kernel_note("lvlm_fast::summary_attention", device)
    out = []
    for tag, hq, hkv, d, lq, s in QUICK if quick else FULL:
        inp = Lazy(lambda hq=hq, hkv=hkv, d=d, lq=lq, s=s: _inputs(hq, hkv, d, lq, s, device))
        shape = f"{tag}:Hq={hq},Hkv={hkv},D={d},Lq={lq},S={s}"
        common = dict(op="summary_attention", shape=shape, dtype="fp32",
                      bytes=(2 * hq * lq + 2 * hkv * s) * d * 4,
                      flops=flops_model(hq, d, lq, s), track_peak=True,
                      setup=inp.get, teardown=inp.release, rtol=1e-4, atol=1e-4)

        def fused(inp=inp):
            i = inp.get()
            return lvlm_fast.ops.summary_attention(i["q"], i["k"], i["v"])

        def seed(inp=inp, lq=lq, s=s, d=d):
            i = inp.get()
            m = s - lq
            return seed_sdpa_attention(i["q"], i["k"][:, :, :m], i["v"][:, :, :m],
                                       i["k"][:, :, m:], i["v"][:, :, m:], d**-0.5)

        def reference(inp=inp):
            i = inp.get()
            return ref(i["q"], i["k"], i["v"])

        def sdpa_flash(inp=inp):
            f = inp.get()["flash"]
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            mem = flash(f["q"], f["k_mem"], f["v_mem"])
            win = flash(f["q"], f["k_win"], f["v_win"], is_causal=True)
            return mem[0], win[0]  # the two unmerged parts: not comparable to the reference

        out.append(Case(impl="fused", fn=fused, note=note, **common))
        out.append(Case(impl="seed", fn=seed, **common))
        out.append(Case(impl="reference", fn=reference, **common))
        if device == "cpu":
            out.append(Case(impl="sdpa_flash", fn=sdpa_flash, verify=False, **common))
    return out
