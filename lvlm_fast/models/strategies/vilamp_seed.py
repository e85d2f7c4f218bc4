"""``vilamp-seed``: ViLAMP the way the released code runs it (the profiler's seed baseline).

Same tokens as :mod:`.vilamp` (same selection, same DFM math, same layout; agreement is
tested up to float tolerance), but with the released code's memory behaviour
(shared/methods/vilamp.md, "Cost of the released code"; ``benchmarks/seed/vilamp.py`` and
``benchmarks/seed/vilamp_dfm.py`` are the benchmark-side versions):

* all N frames go through the vision tower in ONE call with ``output_hidden_states=True``
  (the released LLaVA tower: every layer's ``(N, P, C)`` hidden states are alive at once),
  then the projector on all of them: the ``(N, P, D)`` patch features of every frame are
  kept until the end (``encode="chunked"`` streams the tower through
  ``vlm.iter_patch_features`` instead and only concatenates the projector outputs);
* keyframe selection materialises the full ``N x N`` frame-to-frame cosine matrix and the
  ``N`` relevances, as the release does; the greedy walk + budget fill themselves run in
  :func:`lvlm_fast.ops.keyframe_select` (the release's Python loop reads ``.item()`` every
  step, which cannot run on meta tensors; the op returns the same frames), while the
  matrix is alive, so the peak includes it;
* DFM (dense branch) with the released full-size intermediates: the per-frame reference
  repeated to ``(N, P, D)``, the text query repeated to ``(N, P, text_dim)`` (``(N, P, D)``
  zeros in the parameter-free form), the four projections on ``(N, P, .)`` tensors (learned
  form), two ``F.cosine_similarity`` over ``(N, P, D)``, softmax over patches, ``mask * X``
  (another ``(N, P, D)``) and ``.sum(1)``.

Tokens per frame: keyframe 196 (pooled) or h*w (full), other frames 1, plus one newline.
``holds_all_patch_features = True``. ``frames_encoded = N``.

Qwen3-VL: as :mod:`.vilamp` (timestamps per kept unit / DFM token; scores on the main
channels, the same weights on every DeepStack level); the released-style tensors hold all
levels' rows (``(N, P, (1 + L) D)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lvlm_fast.models.strategies.base import (
    EmbeddingStrategy,
    VideoPrompt,
    VisualEmbeds,
    register,
)
from lvlm_fast.models.strategies.vilamp import (
    KeyframeLayout,
    ViLAMPConfig,
    _check_choice,
    finish_output,
    keyframe_blocks,
    keyframe_tokens_of,
    new_output,
    resolve_dfm,
    select_keyframes,
    selector_embeddings,
    selector_query,
    tokens_per_keyframe,
    unit_embeddings,
)

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM

ENCODE_MODES = ("all_at_once", "chunked")


@dataclass
class ViLAMPSeedConfig(ViLAMPConfig):
    """:class:`ViLAMPConfig` plus ``encode``: ``"all_at_once"`` (released: one vision-tower
    call over every frame with all hidden states) or ``"chunked"``."""

    encode: str = "all_at_once"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("encode", self.encode, ENCODE_MODES)


def encode_all_frames(vlm: LongVideoVLM, pixel_values: torch.Tensor, mode: str
                      ) -> torch.Tensor:
    """(N, h, w, D) LLM-space features of every temporal unit, kept together: the
    family's one-call transformers path (``all_at_once``) or the wrapper's chunks."""
    if mode == "chunked":
        return torch.cat([f for _, f in vlm.iter_patch_features(pixel_values)])
    return vlm.family.encode_all_at_once(pixel_values)


@register
class ViLAMPSeed(EmbeddingStrategy):
    """Seed-style ViLAMP: every frame's patch features, N x N similarities and the released
    DFM intermediates all at once (``holds_all_patch_features = True``)."""

    name = "vilamp-seed"
    config_class = ViLAMPSeedConfig
    holds_all_patch_features = True

    def __init__(self, config: ViLAMPSeedConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._dfm_cache: dict = {}

    @torch.no_grad()
    def visual_embeds(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> tuple[torch.Tensor, int]:
        cfg: ViLAMPSeedConfig = self.config
        pv = prompt.pixel_values
        frame_hw = (pv.shape[-2], pv.shape[-1])
        x4 = encode_all_frames(vlm, pv, cfg.encode)  # (N, h, w, D), kept to the end
        n = x4.shape[0]  # temporal units (frames on LLaVA-OneVision)
        h, w, fs = x4.shape[1], x4.shape[2], x4.shape[3]
        x = x4.view(n, h * w, fs)
        # DeepStack families: scores from the main channels; the weights pool every level
        d = vlm.hidden_size
        xm = x[..., :d]
        if cfg.selector is not None:
            emb = unit_embeddings(vlm, selector_embeddings(cfg, vlm, pv))
            text_query = selector_query(cfg, emb.device)
        else:
            emb = x4[..., :d].mean(dim=(1, 2)).float()
            text_query = None
        # released: the full N x N frame-to-frame matrix (and N x 1 relevances)
        en = F.normalize(emb, p=2, dim=1)
        f2f = en @ en.T
        f2t = en @ F.normalize(text_query, dim=0) if text_query is not None else None
        indices, ref_pos = select_keyframes(cfg, emb, text_query)
        del f2f, f2t, en, emb
        dfm = resolve_dfm(cfg, vlm, text_query, self._dfm_cache)
        layout = KeyframeLayout(indices, ref_pos, n, tokens_per_keyframe(cfg, vlm, frame_hw))

        # released DFM (dense branch): full-size repeated reference and query
        frames = torch.arange(n, device=x.device)
        ref_rows = torch.where(layout.ref_frame < 0, frames, layout.ref_frame)
        key_frame_expanded = xm.index_select(0, ref_rows)  # (N, P, D)
        if dfm is None or not dfm.learned:
            query_expanded = torch.zeros(d, dtype=x.dtype, device=x.device
                                         ).view(1, 1, -1).repeat(n, h * w, 1)
            iq, ik, q, k = xm, xm, query_expanded, key_frame_expanded
            tau: float | torch.Tensor = (float(cfg.dfm_tau) if dfm is None
                                         else dfm.tau.detach().to(x.device, x.dtype))
        else:
            wdt = dfm.linear_q.weight.dtype
            query_expanded = text_query.to(wdt).view(1, 1, -1).repeat(n, h * w, 1)

            def lin(v, m):
                return F.linear(v, m.weight.to(v.dtype), m.bias.to(v.dtype))

            iq, ik = lin(xm, dfm.linear_iq), lin(xm, dfm.linear_ik)
            q = dfm.linear_q(query_expanded).to(x.dtype)
            k = lin(key_frame_expanded, dfm.linear_k)
            tau = dfm.tau.detach().to(x.dtype)
        score_i2q = F.cosine_similarity(q, iq, dim=-1)
        score_i2k = F.cosine_similarity(k, ik, dim=-1)
        score = (score_i2q - score_i2k) / tau
        mask = F.softmax(score, dim=-1).unsqueeze(-1)
        tok = (mask * x).sum(1)
        del q, k, iq, ik, query_expanded, key_frame_expanded, score_i2q, score_i2k, mask

        out = new_output(vlm, layout, cfg.newline)
        out.index_copy_(0, layout.start, tok.to(out.dtype))
        kt = keyframe_tokens_of(cfg, vlm, x4.index_select(0, indices))  # (K, T_k, D)
        off = torch.arange(layout.tk, device=x.device)
        rows = (layout.start.index_select(0, indices).unsqueeze(1) + off).reshape(-1)
        out.index_copy_(0, rows, kt.reshape(-1, fs))
        return VisualEmbeds(finish_output(out, layout, cfg.newline, vlm), pv.shape[0],
                            keyframe_blocks(cfg, vlm, layout, frame_hw, prompt.fps,
                                            cfg.newline, pv.shape[0], prompt.frame_times))
