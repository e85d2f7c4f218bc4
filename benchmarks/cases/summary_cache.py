"""Model-level Video-XL benchmark: one window at the end of a 256-frame video.

Decoder: Qwen2-style, 4 layers, hidden 512, 8 query / 2 KV heads (head dim 64), MLP 1,536,
the real Qwen2 vocabulary (151,936; random weights, fp32). Video: 256 frames x 144 tokens
= 36,864 visual tokens, r = 16, window W = 1,440 (10 frames). The timed call is the last
full window: [sink = 14 ; 2,250 retained summaries ; 1,440 raw + 90 summaries], forward
through every layer and the eviction; the state is restored after each call so every
repeat sees the same cache. ``median_ms`` is therefore *time per window* at the video's
end (the most expensive one), ``peak_bytes`` the peak live bytes during that window above
the state at entry (the cache itself is not counted; see below).

Impls: ``fused`` = :func:`lvlm_fast.models.videoxl_driver.run_window` (preallocated
SummaryKVCache, summary_attention on views, evict_summaries in place, no LM head on the
window); ``seed`` = :class:`benchmarks.seed.videoxl.SeedVideoXL` (the released loop:
per-token placement, boolean gather/scatter projections, cat + whole-cache RoPE +
repeat_kv + float mask SDPA, LM head on every window token in fp32, eviction by boolean
indexing). ``--quick``: 2 layers, vocab 4,096, 20 frames x 36 tokens, r = 8, W = 144.

Persistent memory per frame (both keep only summaries after a window): 144 / 16 = 9 rows
x layers x 2 (K, V) x KV heads x head dim x 4 B; the fused cache's bytes after the video
are sink + summaries rows exactly (checked in ``setup``, and in tests/tier0).
Bytes model: None (compute-bound).

Whole-video passes (shape ``...,pass=<F>f``, F = 128 and 256 frames; full run only): from
the sink to the end of the video, both impls fed by the same stand-in for the vision tower
(``_VisualSource``: a fixed bank of token features; a call returns a fresh tensor of the
requested tokens, as the vision tower + projector would). ``fused`` asks it for one window
at a time and allocates its SummaryKVCache inside the pass; ``seed`` does what the released
pipeline does: all frames' features at once, placed into the whole input-embedding sequence,
then the window loop slices it. ``median_ms`` of these rows is the time of the whole pass
and ``peak_bytes`` its peak live bytes (everything allocated inside the pass, cache
included). :func:`summarize` prints the peak growth per frame, (peak(256) - peak(128)) / 128,
for each impl, and the per-window speedup.
"""

from __future__ import annotations

import torch

from benchmarks.harness import Case, Lazy, fused_kernel_note

OPS = ("summary_cache",)

FULL = dict(layers=4, hidden=512, heads=8, kv=2, inter=1536, vocab=151936,
            frames=256, per_frame=144, ratio=16, window=1440, sink=14)
PASS_FRAMES = (128, 256)  # whole-video passes (full run only)
QUICK = dict(layers=2, hidden=512, heads=8, kv=2, inter=1536, vocab=4096,
             frames=20, per_frame=36, ratio=8, window=144, sink=14)


def _build(p: dict) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.seed.videoxl import SeedVideoXL
    from lvlm_fast.cache import SummaryKVCache
    from lvlm_fast.nn.summary_proj import install_summary_projections, summary_weights

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=p["vocab"], hidden_size=p["hidden"],
                      intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                      head_dim=p["hidden"] // p["heads"], max_position_embeddings=65536)
    model = Qwen2ForCausalLM(cfg).eval()
    layout = install_summary_projections(model)
    n_vis = p["frames"] * p["per_frame"]
    r, w = p["ratio"], p["window"]
    # the last window of the video (a full-size one at that depth)
    before = n_vis // w if n_vis % w else n_vis // w - 1
    retained = before * (w // r)  # W divisible by r: no carry at window starts
    hd = p["hidden"] // p["heads"]
    g = torch.Generator().manual_seed(1)
    mem = [(torch.randn(1, p["kv"], p["sink"] + retained, hd, generator=g),
            torch.randn(1, p["kv"], p["sink"] + retained, hd, generator=g))
           for _ in range(p["layers"])]
    # fused: a cache sized for the whole video, filled up to the last window's start
    # (sized for a video ending with this full-size window: 256 frames end with a partial one)
    cache = SummaryKVCache.for_model(model, prefix=p["sink"], num_visual=(before + 1) * w,
                                     ratio=r,
                                     window=w, tail=32)
    for li, (k, v) in enumerate(mem):
        cache.update(k, v, li)
    cache.mark_sink()
    row_bytes = p["layers"] * 2 * p["kv"] * hd * 4
    assert cache.bytes() == (p["sink"] + retained) * row_bytes
    vst = torch.randn(p["hidden"], generator=g)
    seed = SeedVideoXL(model, summary_weights(model), vst)
    raw = torch.randn(1, w, p["hidden"], generator=g)
    sink = [(k[:, :, : p["sink"]].clone(), v[:, :, : p["sink"]].clone()) for k, v in mem]
    return dict(model=model, layout=layout, cache=cache, seed=seed, mem=mem, raw=raw, vst=vst,
                start=p["sink"] + retained, ratio=r, sink=sink, row_bytes=row_bytes,
                source=_VisualSource(p, g))


class _VisualSource:
    """Stand-in for vision tower + projector: token t of the video is row t % 2,304 of a
    fixed bank (16 frames); ``tokens(a, b)`` returns a fresh (1, b - a, hidden) tensor."""

    def __init__(self, p: dict, g: torch.Generator) -> None:
        self.bank = torch.randn(16 * p["per_frame"], p["hidden"], generator=g)

    def tokens(self, a: int, b: int) -> torch.Tensor:
        idx = torch.arange(a, b) % self.bank.shape[0]
        return self.bank.index_select(0, idx)[None]


def fused_pass(s: dict, p: dict, frames: int) -> None:
    """Sink -> every window of a ``frames``-frame video, streaming the visual tokens."""
    from lvlm_fast.cache import ATTN_NAME, SummaryKVCache
    from lvlm_fast.models.videoxl_driver import AttnImpl, run_window

    n_vis, w = frames * p["per_frame"], p["window"]
    cache = SummaryKVCache.for_model(s["model"], prefix=p["sink"], num_visual=n_vis,
                                     ratio=p["ratio"], window=w, tail=32)
    for li, (k, v) in enumerate(s["sink"]):
        cache.update(k, v, li)
    cache.mark_sink()
    with AttnImpl(s["model"], ATTN_NAME):
        for start in range(0, n_vis, w):
            raw = s["source"].tokens(start, min(start + w, n_vis))
            run_window(s["model"], cache, s["layout"], raw, s["vst"], p["ratio"])
    # the cache holds the sink and the summaries, nothing else
    assert cache.bytes() == (p["sink"] + n_vis // p["ratio"]) * s["row_bytes"], cache.bytes()


def seed_pass(s: dict, p: dict, frames: int) -> None:
    """The released way: encode every frame, build the whole input sequence, then loop."""
    n_vis, w = frames * p["per_frame"], p["window"]
    feats = s["source"].tokens(0, n_vis)
    embeds = torch.empty_like(feats)
    embeds.copy_(feats)  # placed into the full inputs_embeds (released: a per-token loop)
    seed = s["seed"]
    seed.set_memory([k for k, _ in s["sink"]], [v for _, v in s["sink"]])
    carry = 0
    for start in range(0, n_vis, w):
        raw = embeds[:, start : start + w]
        seed.window(raw, p["ratio"], carry)
        carry = (raw.shape[1] + carry) % p["ratio"]


def cases(quick: bool, device: str) -> list[Case]:
    import lvlm_fast.ops  # noqa: F401
    from lvlm_fast.cache import ATTN_NAME
    from lvlm_fast.models.videoxl_driver import AttnImpl, run_window

    if device != "cpu":
        from benchmarks.harness import skipped

        return [skipped("summary_cache", i, "-", "fp32", "CPU case (model built on CPU)")
                for i in ("fused", "seed")]
    p = QUICK if quick else FULL
    inp = Lazy(lambda: _build(p))
    shape = (f"L={p['layers']},H={p['hidden']},heads={p['heads']}/{p['kv']},V={p['vocab']},"
             f"{p['frames']}fx{p['per_frame']},r={p['ratio']},W={p['window']}")
    common = dict(op="summary_cache", shape=shape, dtype="fp32", bytes=None, track_peak=True,
                  setup=inp.get, teardown=inp.release, verify=False)

    def fused():
        s = inp.get()
        cache = s["cache"]
        with AttnImpl(s["model"], ATTN_NAME):
            k = run_window(s["model"], cache, s["layout"], s["raw"], s["vst"], s["ratio"])
        # restore the end-of-video state for the next repeat (host ints only)
        for layer in cache.layers:
            layer.length = s["start"]
            layer._refresh()
        cache.carry, cache.num_summaries = 0, cache.num_summaries - k

    def seed():
        s = inp.get()
        s["seed"].set_memory([m[0] for m in s["mem"]], [m[1] for m in s["mem"]])
        s["seed"].window(s["raw"], s["ratio"], 0)

    note = fused_kernel_note("lvlm_fast::summary_attention", device)
    out = [Case(impl="fused", fn=fused, note=note, **common),
           Case(impl="seed", fn=seed, **common)]
    for frames in () if quick else PASS_FRAMES:
        pc = dict(common, shape=f"{shape},pass={frames}f", repeats=1)
        out += [Case(impl="fused", fn=lambda f=frames: fused_pass(inp.get(), p, f), **pc),
                Case(impl="seed", fn=lambda f=frames: seed_pass(inp.get(), p, f), **pc)]
    return out


def summarize(rows: list[dict]) -> list[str]:
    """Per-window speedup and peak growth per frame between the two whole-video passes."""
    mine = [r for r in rows if r["op"] == "summary_cache"]
    lines = []
    for r in mine:
        if "pass=" not in r["shape"] and r["impl"] == "fused" and r["speedup_vs_seed"]:
            lines.append(f"summary_cache: time per window fused {r['median_ms']:.0f} ms, "
                         f"{r['speedup_vs_seed']:.2f}x faster than seed")
    lo, hi = PASS_FRAMES
    growth = {}
    for impl in ("fused", "seed"):
        peak = {f: r["peak_bytes"] for r in mine for f in PASS_FRAMES
                if r["impl"] == impl and r["shape"].endswith(f"pass={f}f")}
        if len(peak) == 2 and None not in peak.values():
            growth[impl] = (peak[hi] - peak[lo]) / (hi - lo)
            lines.append(f"summary_cache: {impl} peak {peak[lo]} B at {lo} frames, {peak[hi]} B "
                         f"at {hi}: growth {growth[impl]:.0f} B/frame")
    if len(growth) == 2 and growth["fused"] > 0:
        lines.append(f"summary_cache: peak growth per frame seed / fused = "
                     f"{growth['seed'] / growth['fused']:.2f}x")
    return lines
