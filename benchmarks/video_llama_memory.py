"""Video-LLaMA-7B memory vs frames (issue 13.3): released-style path vs the fused stream.

Simulated on meta tensors (bf16, no weights), video in -> first answer token, frames 8 ...
10,240 (224 x 224; frames counted as host memory, like ``lvlm-fast profile``). Pass peak =
the peak of tensors allocated during the call (weights not included; printed once).

- ``released``: the released code's composition at T frames: every frame through EVA ViT-g
  and the image Q-Former in ONE call (``encode_all_at_once``), + frame positions, the
  ``(1, T*32, 768)`` tokens through transformers' ``Blip2QFormerModel`` (eager attention:
  K/V ``(T*32, 768)`` per layer and the ``(12, 32, T*32)`` score matrix materialised),
  ``llama_proj``, the LLM prefill.
- ``stream``: the wrapper's ``uniform`` with ``num_frames = T``: frames encoded chunk by
  chunk (``vision_chunk_frames`` from the 1 GiB budget), the per-frame image-Q-Former
  tokens (T x 32 x 768) held, the Video Q-Former's two streaming passes through the fused
  op (no K/V, no scores), the LLM prefill.

Both use ``position="interpolate"`` beyond 32 frames (the released model raises there).

    python benchmarks/video_llama_memory.py [--frames 8,32,...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import time

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from lvlm_fast.models import LongVideoVLM
from lvlm_fast.nn.qformer import VideoQFormer, released_to_blip2_qformer
from lvlm_fast.profile.memory import SimulationTracker, make_prompt, model_static_bytes

GIB = 2**30
FRAMES = (8, 32, 128, 512, 2048, 10240)


def hf_video_qformer(vq: VideoQFormer) -> Blip2QFormerModel:
    """transformers' ``Blip2QFormerModel`` as the released Video Q-Former (method facts,
    section 4: cross-attention every layer, eager attention), holding ``vq``'s weights
    under the renamed released keys (``assign``: works on meta tensors too)."""
    layer = vq.layers[0]
    cfg = Blip2QFormerConfig(hidden_size=vq.query_tokens.shape[-1],
                             num_hidden_layers=len(vq.layers),
                             num_attention_heads=vq.num_heads,
                             intermediate_size=layer.intermediate_query.out_features,
                             hidden_act="gelu", layer_norm_eps=layer.output_query_LayerNorm.eps,
                             cross_attention_frequency=1, encoder_hidden_size=vq.encoder_width,
                             use_qformer_text_input=False)
    cfg._attn_implementation = "eager"
    ours = dict(vq.named_parameters())
    released = {theirs: ours[name] for name, theirs in
                vq.released_key_map(len(vq.layers), with_proj=False).items()}
    with torch.device("meta"):
        hf = Blip2QFormerModel(cfg)
    hf.load_state_dict(released_to_blip2_qformer(released, vq.RELEASED_PREFIX), strict=True,
                       assign=True)
    return hf.eval()


def released_first_token(vlm: LongVideoVLM, hf_vq: Blip2QFormerModel, prompt) -> torch.Tensor:
    m = vlm.model
    vq = m.model.video_qformer
    t = prompt.pixel_values.shape[0]
    tok = vlm.family.encode_all_at_once(prompt.pixel_values).squeeze(1)  # (T, 32, 768)
    tok = tok + vq.position_rows(0, t, t).to(tok.dtype).unsqueeze(1)
    e = tok.reshape(1, -1, tok.shape[-1])
    del tok
    out = hf_vq(query_embeds=vq.query_tokens, encoder_hidden_states=e).last_hidden_state
    del e
    visual = vq.project(out)
    res = vlm.prefill_embeds(prompt.prefix_ids, visual, prompt.question_ids, frames_encoded=t)
    return m.lm_head(res.last_hidden[:, -1]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", default=",".join(map(str, FRAMES)))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    frames = [int(x) for x in args.frames.split(",")]
    vlm = LongVideoVLM.from_config("video-llama-7b", "uniform", device="meta",
                                   dtype=torch.bfloat16)
    vq = vlm.model.model.video_qformer
    vq.position = "interpolate"
    hf_vq = hf_video_qformer(vq)
    weights = model_static_bytes(vlm.model)
    print(f"video-llama-7b, bf16, simulated; weights {weights / GIB:.2f} GiB; frames 224x224 "
          f"in host memory; vision_chunk_frames {vlm.vision_chunk_frames}")
    rows = []
    for t in frames:
        prompt = make_prompt(vlm.config, t, frame_hw=(224, 224))
        for path in ("released", "stream"):
            gc.collect()
            t0 = time.perf_counter()
            with torch.no_grad(), SimulationTracker() as tr:
                if path == "released":
                    released_first_token(vlm, hf_vq, prompt)
                else:
                    vlm.first_token(prompt, "uniform", num_frames=t)
            rows.append(dict(frames=t, path=path, pass_peak_bytes=tr.peak_bytes,
                             peak_bytes=weights + tr.peak_bytes,
                             seconds=round(time.perf_counter() - t0, 2)))
            print(f"  {path:>8} {t:>6} frames: pass {tr.peak_bytes / GIB:8.2f} GiB, "
                  f"total {(weights + tr.peak_bytes) / GIB:8.2f} GiB", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "video_llama_memory.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| frames | released-style pass peak (GiB) | fused stream pass peak (GiB) |",
             "|---:|---:|---:|"]
    for t in frames:
        r = {x["path"]: x["pass_peak_bytes"] / GIB for x in rows if x["frames"] == t}
        lines.append(f"| {t:,} | {r['released']:.2f} | {r['stream']:.2f} |")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
