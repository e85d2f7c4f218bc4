"""``llamavid``: LLaMA-VID's two tokens per frame (context, content), streamed.

Per frame, on the projector output of its full patch grid X (P = h*w patches, LLM width D;
729 patches on LLaVA-OneVision, before the 2x2 pooling):

    context = sum_p mean_q softmax_p(Q X^T / sqrt(D))[q, p] X[p]     (text-guided)
    content = mean_p X[p]                                             (or a g x g grid)

through the fused :func:`lvlm_fast.ops.context_content_pool` (the ``(frames, Lq, P)``
attention is never built). Tokens: ``[context, content]`` per frame in time order
(``1 + content_grid**2`` per frame), then one ``image_newline``: ``2 T + 1`` by default.

Text queries Q (documented choice; LLaVA-OneVision has no LLaMA-VID Q-Former):

* default: the question's own token embeddings, ``vlm.embed_tokens(question_ids)`` (Lq = the
  question's length, the whole ``question_ids`` incl. any chat-template tokens); no key
  projection (keys = X), scale 1/sqrt(D). The features are already in the LLM space (after
  the model's projector), so context and content need no further projection.
* ``query_module``: a Q-Former-style callable ``(frame_feats (t, P, D), question_embeds
  (Lq, D)) -> queries`` returning ``(Lq', D)`` shared or ``(t, Lq', D)`` per frame (LLaMA-VID's
  Q-Former reads the instruction and the frame).
* ``pooling``: a :class:`lvlm_fast.nn.ContextContentPooling` with ``vision_dim = D`` and
  ``llm_dim = D`` (e.g. LLaMA-VID-style learned key / value / content projectors trained
  on this model's features) replaces the parameter-free pooling; its ``content_grid``
  then sets the tokens per frame.

Held in memory (``holds_all_patch_features = False``): the output ``(T * (1 + g*g) + 1, D)``,
the question embeddings and one vision chunk.

Other families: "frame" is the family's temporal unit (Qwen2.5-VL: a temporal patch of 2
frames, X = its merged grid, the merger output), the end token is the family's (none on
Qwen2.5-VL). Positions on a family with grid positions (M-RoPE): a unit's context token is
a 1 x 1 grid at the unit's time (row 0, column 0), its content tokens a ``g x g`` grid at
the same time (rows/columns 0 .. g-1); the end token 1 x 1 at the last unit.

Qwen3-VL: a unit's context and content tokens sit in ONE frame of the prompt with the
unit's timestamp (``<t seconds><|vision_start|> context content <|vision_end|>``), the
context at the running position ``(cur, cur, cur)``, the content grid after it
(``(cur + 1, cur + 1 + y, cur + 1 + x)``). DeepStack: the attention keys (and a
``query_module``) read the main channels only; the SAME attention weights and content bins
pool every DeepStack level, so a context/content token carries the pooled DeepStack rows
of its unit. A learned ``pooling`` module is refused there (it was trained on D channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    StrategyConfig,
    VideoPrompt,
    VisualEmbeds,
    register,
)
from lvlm_fast.models.strategies.full import end_blocks
from lvlm_fast.models.strategies.stream import check_kv_budget
from lvlm_fast.models.strategies.vilamp import _check_int
from lvlm_fast.nn.context_content import ContextContentPooling
from lvlm_fast.ops import context_content_pool

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class LlamaVIDConfig(StrategyConfig):
    """``content_grid`` g (1 = one content token, LLaMA-VID's default ``"mean"``);
    ``query_module`` / ``pooling``: see the module docstring; ``scale`` of the scores
    (None = 1/sqrt(D)); ``newline``: one ``image_newline`` after the video."""

    content_grid: int = 1
    query_module: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pooling: ContextContentPooling | None = None
    scale: float | None = None
    newline: bool = True
    # hard KV cap (issue 12): rows per layer; None = off. Set: the visual tokens are
    # streamed through the budgeted cache (strategies/stream.py, composed_prefill)
    kv_budget: int | None = None

    def __post_init__(self) -> None:
        check_kv_budget(self.kv_budget)
        _check_int("content_grid", self.content_grid, 1)
        if self.query_module is not None and not callable(self.query_module):
            raise TypeError(f"query_module must be callable (frame_feats, question_embeds) -> "
                            f"queries, got {type(self.query_module).__name__}")
        if self.pooling is not None and not isinstance(self.pooling, ContextContentPooling):
            raise TypeError(f"pooling must be a ContextContentPooling, got "
                            f"{type(self.pooling).__name__}")
        if self.scale is not None and (isinstance(self.scale, bool)
                                       or not isinstance(self.scale, (int, float))
                                       or not math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite float or None, got {self.scale!r}")


@register
class LlamaVID(EmbeddingStrategy):
    """Context + content tokens per frame (``holds_all_patch_features = False``)."""

    name = "llamavid"
    config_class = LlamaVIDConfig
    holds_all_patch_features = False

    def content_grid(self) -> int:
        cfg: LlamaVIDConfig = self.config
        return cfg.pooling.content_grid if cfg.pooling is not None else cfg.content_grid

    def tokens_per_frame(self) -> int:
        g = self.content_grid()
        return 1 + g * g

    def _check_pooling(self, vlm: LongVideoVLM) -> None:
        pool = self.config.pooling
        if pool is not None and (pool.vision_dim != vlm.hidden_size
                                 or pool.llm_dim != vlm.hidden_size):
            raise ValueError(f"pooling must map D={vlm.hidden_size} features to D="
                             f"{vlm.hidden_size} (got vision_dim={pool.vision_dim}, "
                             f"llm_dim={pool.llm_dim}): it runs on the model's projected "
                             "patch features")

    @torch.no_grad()
    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        cfg: LlamaVIDConfig = self.config
        self._check_pooling(vlm)
        pv = prompt.pixel_values
        t = vlm.family.units(pv.shape[0])
        d, fs = vlm.hidden_size, vlm.feature_size
        if cfg.pooling is not None and fs != d:
            raise ValueError(f"a learned pooling module maps D={d} features; the "
                             f"{vlm.family.name} family's rows carry DeepStack levels "
                             f"({fs} channels) it was not trained on: use pooling=None")
        per = self.tokens_per_frame()
        question = vlm.embed_tokens(prompt.question_ids)[0].to(vlm.dtype)  # (Lq, D)
        scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(d)
        n_end = vlm.family.num_end_tokens() if cfg.newline else 0
        out = torch.empty((t * per + n_end, fs), dtype=vlm.dtype, device=vlm.device)
        for s, feats in vlm.iter_patch_features(pv):
            n = feats.shape[0]
            x = feats.reshape(n, -1, fs)
            # DeepStack families: attention keys (and the query module) read the main
            # channels; the same attention weights and content bins pool every level
            xm = x if fs == d else x[..., :d].contiguous()
            queries = question if cfg.query_module is None else \
                cfg.query_module(xm, question).to(x.dtype)
            if cfg.pooling is not None:
                tok = cfg.pooling(x, queries)
            else:
                tok = context_content_pool(x, queries, None if fs == d else xm, scale=scale,
                                           content_grid=cfg.content_grid)
            out[s * per:(s + n) * per] = tok.reshape(n * per, fs).to(out.dtype)
            del feats, x, tok
        if n_end:
            out[t * per:] = vlm.family.end_tokens().to(vlm.dtype)
        blocks = None
        if vlm.family.needs_blocks():
            g = self.content_grid()
            hw = (pv.shape[-2], pv.shape[-1])
            blocks = TokenBlocks.per_unit([
                TokenBlocks.grid(t, 1, 1, device=vlm.device, frame_hw=hw, fps=prompt.fps,
                                 num_frames=pv.shape[0], times=prompt.frame_times),
                TokenBlocks.grid(t, g, g, device=vlm.device, frame_hw=hw, fps=prompt.fps,
                                 num_frames=pv.shape[0], times=prompt.frame_times)])
            if n_end:
                blocks = end_blocks(vlm, blocks, t - 1)
        return VisualEmbeds(out.unsqueeze(0), pv.shape[0], blocks)
