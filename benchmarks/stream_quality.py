"""Quality proxy of the ``stream`` strategy without real weights (issue 12, item 4).

On a tiny RANDOM LLaVA-OneVision (``tiny-llava-onevision``, 4 tokens per frame, fp32),
``--frames`` frames of noise (257 visual tokens at 64 frames) and a random prompt: the
relative error of the first answer token's logits, ``||l_stream - l_full|| / ||l_full||``,
against ``full`` (every token kept), as the budget shrinks to 1/2, 1/4, 1/8 and 1/16 of the
visual tokens (``kv_budget = prefix + N / c``), for each score: ``tar`` (``tar_ratio = 1``),
``van`` (0), their combination ``tar+van`` (0.5, the default) and ``attention``
(``attention_mass=True``: the mass each key got from the window's queries, not a score of
the method). Windows of 4 frames, the newest frame protected. Mean and max over
``--seeds`` prompts (model fixed).

What this does NOT show: accuracy. A random model's logits say how much the answer moves
when rows are dropped, not whether the right rows are dropped; real benchmarks need real
weights.

Writes ``benchmarks/results/stream_quality.{csv,png}``. Run:
``python -m benchmarks.stream_quality``.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from lvlm_fast.models import LongVideoVLM, get_config
from lvlm_fast.models.strategies.base import VideoPrompt

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SCORES = {"tar": dict(tar_ratio=1.0), "van": dict(tar_ratio=0.0),
          "tar+van": dict(tar_ratio=0.5), "attention": dict(attention_mass=True)}
COMPRESSION = (2, 4, 8, 16)
PREFIX, QUESTION = 3, 5


def _prompt(frames: int, seed: int) -> VideoPrompt:
    g = torch.Generator().manual_seed(1000 + seed)
    return VideoPrompt(torch.randn(frames, 3, 56, 56, generator=g),
                       torch.randint(0, 250, (1, PREFIX), generator=g),
                       torch.randint(0, 250, (1, QUESTION), generator=g))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(get_config("tiny-llava-onevision")).eval()
    full = LongVideoVLM(model, "full")
    stream = LongVideoVLM(model, "stream")
    rows = []
    errs: dict[tuple[str, int], list[float]] = {}
    for seed in range(args.seeds):
        pr = _prompt(args.frames, seed)
        ref = full.first_token(pr)
        n_vis = full.last_prefill.visual_tokens
        for c in COMPRESSION:
            for name, knobs in SCORES.items():
                stream.set_strategy("stream", kv_budget=PREFIX + n_vis // c, window_frames=4,
                                    recent_frames=1, **knobs)
                out = stream.first_token(pr)
                err = float((out - ref).norm() / ref.norm())
                errs.setdefault((name, c), []).append(err)
    for (name, c), e in errs.items():
        rows.append(dict(score=name, compression=c, kv_budget=PREFIX + n_vis // c,
                         visual_tokens=n_vis, frames=args.frames, seeds=args.seeds,
                         rel_err_mean=sum(e) / len(e), rel_err_max=max(e)))
    rows.sort(key=lambda r: (r["score"], r["compression"]))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "stream_quality.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in SCORES:
        pts = [r for r in rows if r["score"] == name]
        ax.plot([r["compression"] for r in pts], [r["rel_err_mean"] for r in pts], "o-",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(COMPRESSION, [f"{c}x" for c in COMPRESSION])
    ax.set_xlabel("KV compression of the visual tokens (N / (kv_budget - prefix))")
    ax.set_ylabel("relative error of answer logits vs full")
    ax.set_title(f"stream quality proxy: tiny random LLaVA-OV, {args.frames} frames, "
                 f"{args.seeds} prompts", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "stream_quality.png"), dpi=120)
    for r in rows:
        print(f"{r['score']:>8} {r['compression']:>3}x  mean {r['rel_err_mean']:.4f}  "
              f"max {r['rel_err_max']:.4f}")
    return rows


if __name__ == "__main__":
    main()
