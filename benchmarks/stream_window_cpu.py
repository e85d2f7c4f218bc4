"""Compaction cost vs one window's prefill (issue 12, "Measured on CPU"): the ``stream``
strategy's steady state on CPU, measured in one run.

Geometry: LLaVA-OneVision-7B's decoder layer (hidden 3,584, 28 query / 4 KV heads, head
dim 128, MLP 18,944; random weights, fp32) with ``--layers`` layers (default 1: both the
prefill and the compaction scale linearly with the layer count, so the ratio is the 28-layer
one); 196 tokens per frame, 14 system tokens, the default knobs: a window of 8 frames (1,568
tokens) appended to a cache holding the budget (14 + 31 x 196 = 6,090 rows, the frame-aligned
budget nearest the default 6,144, so the seed baseline, which counts whole frames, does the
same work), then compacted back to the budget with the newest 8 frames protected.

Timed (median of ``--repeats``, each on fresh inputs):
  * ``prefill``: the window through the decoder into a ``BudgetedKVCache`` (the model's
    SDPA attention over budget + window keys; what the strategy runs per window);
  * ``fused``: ``BudgetedKVCache.compact`` (one ``kv_compact`` call for all layers, in place);
  * ``seed``: :func:`benchmarks.seed.infinipot_v.seed_process_kv_cache` on the same K/V
    (the released code's per-layer loop: normalised copies, 6-D TaR product, top-k, gather +
    ``torch.cat`` into new tensors).

Writes ``benchmarks/results/stream_window_cpu.json``. Run:
``python -m benchmarks.stream_window_cpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2Model

from benchmarks.seed.infinipot_v import seed_process_kv_cache
from lvlm_fast.models._compat import cache_kwargs
from lvlm_fast.stream_cache import BudgetedKVCache

P, SYS, KEEP_FRAMES, WINDOW_FRAMES = 196, 14, 31, 8
OUT = os.path.join(os.path.dirname(__file__), "results", "stream_window_cpu.json")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                      intermediate_size=18944, num_hidden_layers=args.layers, vocab_size=1000,
                      max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    model = Qwen2Model(cfg).eval()
    hkv, d = 4, 128
    budget, window, recent = SYS + KEEP_FRAMES * P, WINDOW_FRAMES * P, WINDOW_FRAMES * P
    keep_tokens = KEEP_FRAMES * P
    tar_budget = keep_tokens - round(0.5 * keep_tokens)  # the seed's TaR share (incl. recent)
    k_sel = budget - SYS - recent
    tar_ratio = (tar_budget - recent) / k_sel  # the same TaR slots in the fused op
    times: dict[str, list[float]] = {"prefill": [], "fused": [], "seed": []}
    for rep in range(args.repeats):
        g = torch.Generator().manual_seed(rep)
        cache = BudgetedKVCache.for_text_config(cfg, budget + window, budget=budget,
                                                inv_freq=model.rotary_emb.inv_freq,
                                                dtype=torch.float32, device="cpu")
        cache.key[:, :, :, :budget] = torch.randn(args.layers, 1, hkv, budget, d, generator=g)
        cache.value[:, :, :, :budget] = torch.randn(args.layers, 1, hkv, budget, d, generator=g)
        for layer in cache.kv_layers:
            layer.length = budget
            layer._refresh()
        x = torch.randn(1, window, cfg.hidden_size, generator=g)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(inputs_embeds=x, **cache_kwargs(model, cache), use_cache=True)
            t1 = time.perf_counter()
            n = cache.get_seq_length()
            keys = [cache.key[li, :, :, :n].clone() for li in range(args.layers)]
            values = [cache.value[li, :, :, :n].clone() for li in range(args.layers)]
            t2 = time.perf_counter()
            cache.compact(prefix=SYS, recent=recent, tokens_per_frame=P, tar_ratio=tar_ratio)
            t3 = time.perf_counter()
            seed_process_kv_cache(keys, values, SYS, P, KEEP_FRAMES, WINDOW_FRAMES, 0.5)
            t4 = time.perf_counter()
        assert cache.get_seq_length() == budget
        times["prefill"].append(t1 - t0)
        times["fused"].append(t3 - t2)
        times["seed"].append(t4 - t3)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "what": "stream steady state on CPU: one window prefill vs its compaction",
        "layers": args.layers, "kv_heads": hkv, "head_dim": d, "hidden": cfg.hidden_size,
        "tokens_per_frame": P, "system_tokens": SYS, "budget_rows": budget,
        "window_tokens": window, "recent_tokens": recent, "dtype": "float32",
        "repeats": args.repeats, "seconds": times, "median_seconds": med,
        "fused_share_of_prefill": med["fused"] / med["prefill"],
        "seed_share_of_prefill": med["seed"] / med["prefill"],
        "seed_over_fused": med["seed"] / med["fused"],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": platform.python_version(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"prefill {med['prefill'] * 1e3:.1f} ms, fused compaction {med['fused'] * 1e3:.2f} ms "
          f"({100 * out['fused_share_of_prefill']:.2f} %), seed {med['seed'] * 1e3:.1f} ms "
          f"({100 * out['seed_share_of_prefill']:.2f} %)")
    return out


if __name__ == "__main__":
    main()
