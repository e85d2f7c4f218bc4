"""Video-LLaMA-7B memory vs frames (issue 13.3): released-style path vs the fused stream.

A thin alias of ``lvlm-fast profile --model video-llama-7b`` (one source of figures:
``benchmarks/results/profile_video-llama-7b.*``, the README's Video-LLaMA table). The
released-style pipeline lives in the package as the ``video-llama-seed`` strategy
(:mod:`lvlm_fast.models.strategies.video_llama_seed`); the fused stream is ``uniform``
with ``num_frames`` = the frame count. Extra arguments go to the profile command.

    python benchmarks/video_llama_memory.py [--frames 8,32,...] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import sys

import torch

from lvlm_fast.models.strategies.video_llama_seed import hf_video_qformer, released_video_tokens

__all__ = ["hf_video_qformer", "main", "released_first_token"]


def released_first_token(vlm, hf_vq=None, prompt=None) -> torch.Tensor:
    """First-token logits of the released-style path (``video-llama-seed``); ``hf_vq`` is
    accepted for compatibility (the strategy builds its own transformers Q-Former)."""
    visual = released_video_tokens(vlm, prompt.pixel_values)
    res = vlm.prefill_embeds(prompt.prefix_ids, visual.to(vlm.dtype), prompt.question_ids,
                             frames_encoded=prompt.pixel_values.shape[0])
    return vlm.model.lm_head(res.last_hidden[:, -1]).float()


def main(argv: list[str] | None = None) -> int:
    from lvlm_fast import cli

    argv = sys.argv[1:] if argv is None else argv
    return cli.main(["profile", "--model", "video-llama-7b", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
