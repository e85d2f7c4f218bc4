"""``videoxl``: Video-XL's visual summary tokens with KV eviction, streamed frame by frame.

The visual token stream is ``full``'s (every frame's pooled tokens, then one newline), but
it never exists as a whole: frames go through the vision tower ``vision_chunk_frames`` at
a time, their pooled tokens are copied into one preallocated window buffer of ``window``
raw tokens, and each full window is sent through the decoder by
:func:`lvlm_fast.models.videoxl_driver.run_window` (summary tokens interleaved every
``ratio`` raw tokens with the carried remainder, summary q/k/v projections on the
summary rows, then the window's raw KV rows evicted and its summaries kept, re-rotated to
``sink + j``). Window boundaries are exactly ``run_videoxl``'s (``visual[:, s : s + W]``),
so the result equals the driver run on the fully materialised stream (tested).

Memory: the KV cache is a :class:`lvlm_fast.cache.SummaryKVCache` sized from the frame
count: ``prefix + N // ratio + max(min(window, N), question + decode reserve)`` rows with
eviction (``prefix + N + N // ratio + tail`` without), N = T * tokens_per_frame + 1. Live
visual data: one vision chunk and one window buffer.

Knobs (:class:`VideoXLConfig`): ``ratio`` (16, the published needle-test setting),
``window`` (1,440 raw tokens = 10 frames of 144, the released value), ``evict`` (True;
False keeps raw rows too: the same sequence without the memory saving, for testing),
``summary_embed`` (the learned summary-token vector if the checkpoint has one; else one
vector initialised from the EOS embedding, zeros when there is no EOS id, as
:meth:`lvlm_fast.nn.summary_proj.SummaryEmbedding.from_model` does). Summary projections are
installed on the decoder on first use (sharing the base q/k/v weights, no copy, unless
already there); outside a window they are exactly the base layers, so other strategies are
unaffected.

.. warning:: A stream too short for one summary token (``N < ratio`` raw visual tokens, N
   counting the newline) keeps NOTHING of the video with eviction: every raw KV row is
   evicted and no summary row exists, so the answer does not depend on the video at all.
   That is faithful to Video-XL (only summaries survive a window), but rarely what a user
   wants: :meth:`VideoXLStrategy.prefill` then raises a :class:`StrategyWarning` and lists
   the caveat in :attr:`PrefillResult.warnings` (``lvlm-fast run`` prints it in its
   report). Use more frames, a smaller ``ratio`` or ``evict=False``.

Attention: prefix, windows and question run with the fused
:func:`lvlm_fast.ops.summary_attention` (``"lvlm_summary"``: bottom-right causal, no mask
tensor) when the decoder's head dim is one it supports (64, 80, 96, 128; every shipped
7B config). Other head dims (the toy configs: 16) keep the model's own attention with
transformers' causal mask built from the cache's length: the same bottom-right causal
attention, only slower and with a mask tensor. Decoding after the prompt uses the
model's own attention either way (one query row).

Families with explicit positions (M-RoPE, Qwen2.5-VL): **logical positions are kept**.
Every token has the position it has in the un-evicted interleaved stream: prefix and
question as in ``full`` (the question from ``P + max(h, w)``), each raw visual token its
``full`` M-RoPE position (temporal patch time, row, column), and each summary token the
position of the raw token right before it (the last token of the group it summarises:
:func:`lvlm_fast.models.videoxl_driver.interleave_positions`); generated tokens continue
after the largest prompt position, as in ``full``. Eviction moves the kept summary rows
without rotating them (the cache's ``inv_freq`` is zeros), so no key is ever re-rotated and
the three M-RoPE sections can never disagree. This equals running the whole interleaved
stream once with those positions under the mask "prefix, this window's rows and earlier
windows' summaries; the question sees prefix, all summaries and itself" (tested against
that plain-PyTorch reference through transformers' decoder). 1-D families keep the
released scheme above (summaries re-rotated to ``sink + j``).

Qwen3-VL (interleaved M-RoPE, timestamps, DeepStack): logical positions are kept the same
way, so the frequency interleaving of the sections never matters (no key is re-rotated).
The raw stream is the video segment as the prompt has it: per unit ``<t seconds>
<|vision_start|>``, the unit's tokens, ``<|vision_end|>`` (the family's
:meth:`~lvlm_fast.models.families.ModelFamily.visual_layout`); summaries follow every
``ratio`` raw tokens of that stream (timestamp text included, as the model reads it), each
at the position of the raw token before it. A window's DeepStack rows are added at its
visual tokens only (never at text or summary slots) in that window's forward, and evicted
with the window: only one window's DeepStack rows are alive. Tested against a plain-PyTorch
masked whole-stream reference through transformers' Qwen3-VL decoder.

``kv_budget`` (issue 12, a hard cap): after each window the sink + summaries are compacted
to ``kv_budget`` rows per full-attention layer (:func:`lvlm_fast.stream_cache.
compact_per_layer`: VaN only, the sink protected, kept rows in time order). 1-D RoPE
families: the kept summaries are re-rotated to their new slots (the released scheme,
positions = slots). M-RoPE families (Qwen2.5-VL, Qwen3-VL, Qwen3.5): the kept summary rows
are moved WITHOUT re-rotation (all-zero rotation frequencies), so every kept row keeps its
logical position, any section layout and partial rotary alike; the question and the answer
keep ``full``'s logical positions too. So with a budget the result equals the same masked
whole-stream reference with the evicted summaries also masked out (tested). Note the
logical positions, unlike ``stream``'s slots, grow with the video: the cap bounds memory,
not the largest position id. On Qwen3.5 the cap acts on the full-attention layers only (the
recurrent states absorbed every token).

``PrefillResult.visual_tokens`` counts what the LLM read of the video: N raw tokens
(timestamp text included on Qwen3-VL) plus the summary tokens; ``llm_tokens`` adds prefix
and question.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lvlm_fast.cache import ATTN_NAME, SummaryKVCache, _check_ratio_window
from lvlm_fast.models import videoxl_driver
from lvlm_fast.models.families import TokenBlocks
from lvlm_fast.models.strategies.base import (
    PrefillResult,
    Strategy,
    StrategyConfig,
    StrategyWarning,
    VideoPrompt,
    register,
)
from lvlm_fast.models.strategies.full import end_blocks
from lvlm_fast.models.strategies.stream import check_kv_budget
from lvlm_fast.nn.summary_proj import install_summary_projections
from lvlm_fast.ops.summary_attention import HEAD_DIMS
from lvlm_fast.stream_cache import compact_per_layer

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM


@dataclass
class VideoXLConfig(StrategyConfig):
    ratio: int = 16  # one summary token per `ratio` raw tokens
    window: int = 1440  # raw visual tokens per window
    evict: bool = True  # drop each window's raw KV rows after the window
    summary_embed: torch.Tensor | None = None  # learned summary-token embedding (hidden,)
    # hard KV cap (issue 12): after each window, sink + summaries are compacted to this
    # many rows per full-attention layer (kv_compact, VaN; module doc); None = off
    kv_budget: int | None = None

    def __post_init__(self) -> None:
        _check_ratio_window(self.ratio, self.window)
        check_kv_budget(self.kv_budget)


class DecoderView:
    """The LLaVA model seen as the causal LM the Video-XL driver expects: ``.model`` is
    the Qwen2 decoder, ``.config`` its config, plus the shared LM head and embeddings."""

    def __init__(self, vlm: LongVideoVLM) -> None:
        self.model = vlm.language_model
        self.config = vlm.config.text_config
        self.lm_head = vlm.model.lm_head
        self._embed = vlm.model.get_input_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._embed

    def set_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation(name)

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _summary_vector(vlm: LongVideoVLM, view: DecoderView, given: torch.Tensor | None
                    ) -> torch.Tensor:
    if given is not None:
        if given.shape != (vlm.hidden_size,):
            raise ValueError(f"summary_embed must be ({vlm.hidden_size},), got "
                             f"{tuple(given.shape)}")
        return given.to(vlm.device, vlm.dtype)
    cached = getattr(vlm, "_videoxl_summary_embed", None)
    if cached is None:
        # SummaryEmbedding.from_model's rule (EOS row, zeros without EOS), built with tensor
        # ops on the embedding itself so it also works on meta and fake tensors
        emb = view.get_input_embeddings().weight
        eos = view.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        cached = emb[eos].detach().clone() if eos is not None else emb.new_zeros(emb.shape[1])
        vlm._videoxl_summary_embed = cached
    return cached


@register
class VideoXLStrategy(Strategy):
    """Summary tokens + per-window KV eviction (drives the LLM itself).

    Warning: with eviction, a stream of fewer than ``ratio`` raw visual tokens yields no
    summary token and the answer ignores the video (see the module docstring); this is
    raised as a :class:`StrategyWarning` and listed in ``PrefillResult.warnings``."""

    name = "videoxl"
    config_class = VideoXLConfig
    holds_all_patch_features = False

    def __init__(self, config: VideoXLConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        # Cache rows right after the last window (sink + summaries with eviction): host int,
        # for tests and reports.
        self.rows_after_video: int | None = None

    @torch.no_grad()
    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        cfg = self.config
        view = DecoderView(vlm)
        layout = install_summary_projections(view)
        vst = _summary_vector(vlm, view, cfg.summary_embed)
        ratio, window = cfg.ratio, cfg.window
        fam = vlm.family
        pv = prompt.pixel_values
        t_frames = pv.shape[0]
        units = fam.units(t_frames)
        frame_hw = (pv.shape[-2], pv.shape[-1])
        gh, gw = fam.token_grid(frame_hw)
        end = fam.end_tokens()  # LLaVA-OneVision: the newline after the last frame
        n_vis = units * gh * gw + end.shape[0]
        p, q = prompt.prefix_ids.shape[1], prompt.question_ids.shape[1]
        hid, fs = vlm.hidden_size, vlm.feature_size
        # explicit positions (M-RoPE): the full stream's logical positions (module doc)
        plan, vlayout = None, None
        if fam.needs_blocks():
            blocks = end_blocks(vlm, TokenBlocks.grid(units, gh, gw, device=vlm.device,
                                                      frame_hw=frame_hw, fps=prompt.fps,
                                                      num_frames=t_frames,
                                                      times=prompt.frame_times), units - 1)
            # families that frame units with text (Qwen3-VL timestamps): the raw stream is
            # the video segment as the prompt has it, text included
            vlayout = fam.visual_layout(blocks, n_vis, text_ids=prompt.text_ids)
            plan = fam.position_plan(p, blocks, n_vis, q) if vlayout is None else \
                fam.position_plan(p, blocks, n_vis, q, layout=vlayout)
        n_stream = n_vis if vlayout is None else vlayout.length
        keep = None if plan is None else \
            torch.zeros_like(vlm.language_model.rotary_emb.inv_freq)
        budget, sized = cfg.kv_budget, n_stream
        if budget is not None:
            if budget < p:
                raise ValueError(f"kv_budget must be >= the prefix tokens ({p}), got {budget}")
            # at most budget rows survive a window, plus one interleaved window (window
            # raw + window // ratio + 1 summaries): size for that, not for every summary
            sized = min(n_stream, ratio * (budget - p + 1) + window)
        cache = SummaryKVCache.for_model(view, prefix=p, num_visual=sized, ratio=ratio,
                                         window=window, tail=q + vlm.decode_reserve,
                                         evict=cfg.evict, inv_freq=keep)
        raw_done = 0  # raw stream tokens already sent (global index of the next window)

        def step(x: torch.Tensor, lo: int) -> torch.Tensor:
            cache.check_room(x.shape[1])
            pos = None if plan is None else plan.chunk(lo, lo + x.shape[1])
            return vlm.run_llm(x, cache, pos)

        def window_run(raw: torch.Tensor, vis: torch.Tensor | None) -> None:
            nonlocal raw_done
            pos = None if plan is None else \
                plan.chunk(p + raw_done, p + raw_done + raw.shape[1])
            kw = {}
            # DeepStack rows of this window's visual tokens, a copy held for the call
            if vis is not None and raw.device.type != "meta":
                m = videoxl_driver.interleave(vis.view(1, -1, 1).to(raw.dtype),
                                              raw.new_zeros(1), ratio, cache.carry)
                kw = fam.decoder_kwargs(m[0, :, 0].gt(0.5).view(1, -1), raw[0, vis, hid:])
            elif vis is not None:
                # meta (boolean indexing has no meta implementation): the family holds a
                # copy of every window row's DeepStack channels for the call (an upper
                # bound: the window's few timestamp rows are counted too) and skips the add
                kw = fam.decoder_kwargs(vis.view(1, -1), raw[0, :, hid:].clone())
            with vlm._stage("prefill"):
                videoxl_driver.run_window(view, cache, layout, raw[..., :hid], vst, ratio, pos,
                                          **kw)
            raw_done += raw.shape[1]
            if budget is not None:  # the sink stays; summaries compete for the rest
                # 1-D: kept summaries re-rotated to their new slots (the released scheme);
                # M-RoPE: moved unrotated, logical positions kept (module doc)
                cache.frozen_length = compact_per_layer(
                    cache, budget, prefix=p, inv_freq=None if plan is not None else
                    cache.inv_freq)

        buf = torch.empty((1, min(window, n_stream), fs), dtype=vlm.dtype, device=vlm.device)
        vbuf = None if fs == hid else \
            torch.zeros(buf.shape[1], dtype=torch.bool, device=vlm.device)
        fill = 0

        def push(tokens: torch.Tensor, visual: bool = True) -> None:
            """Copy (1, n, F) tokens into the window buffer, running every full window."""
            nonlocal fill
            off, n = 0, tokens.shape[1]
            while off < n:
                take = min(buf.shape[1] - fill, n - off)
                buf[:, fill : fill + take, : tokens.shape[2]] = tokens[:, off : off + take]
                if vbuf is not None:
                    vbuf[fill : fill + take] = visual
                    if not visual:  # text rows carry no DeepStack channels
                        buf[:, fill : fill + take, tokens.shape[2]:] = 0
                fill, off = fill + take, off + take
                if fill == buf.shape[1]:
                    window_run(buf, vbuf)
                    fill = 0

        def visual_rows() -> Any:
            """The video's visual rows in order, one vision chunk at a time, then the end
            tokens."""
            for _start, feats in vlm.iter_patch_features(pv):
                out = [vlm.pool_2x2(feats).reshape(1, -1, fs)]
                del feats
                yield out.pop()  # no local keeps the chunk while suspended
            if end.shape[0]:
                yield end.to(vlm.dtype).unsqueeze(0)

        fused = view.head_dim in HEAD_DIMS
        attn = videoxl_driver.AttnImpl(view, ATTN_NAME) if fused else contextlib.nullcontext()
        with attn:
            with vlm._stage("prefill"):
                step(vlm.embed_tokens(prompt.prefix_ids), 0)
                cache.mark_sink()
            if vlayout is None:
                for rows in visual_rows():
                    push(rows)
            else:  # text pieces embedded in place, visual pieces pulled from the chunks
                src, cur, off = visual_rows(), None, 0
                for piece in vlayout.pieces:
                    if not isinstance(piece, tuple):
                        push(vlm.embed_tokens(piece.view(1, -1)), visual=False)
                        continue
                    need = piece[1] - piece[0]
                    while need:
                        if cur is None or off == cur.shape[1]:
                            cur = None  # the used chunk goes before the next is encoded
                            cur, off = next(src), 0
                        take = min(need, cur.shape[1] - off)
                        push(cur[:, off : off + take])
                        off, need = off + take, need - take
                del src, cur
            if fill:
                window_run(buf[:, :fill], None if vbuf is None else vbuf[:fill])
            self.rows_after_video = cache.get_seq_length()
            with vlm._stage("prefill"):
                last = step(vlm.embed_tokens(prompt.question_ids), p + n_stream)[:, -1:].clone()
        s = cache.num_summaries
        notes = []
        if s == 0 and cfg.evict:  # host ints: no device read, meta-safe
            notes.append(
                f"videoxl: the video gave {n_vis} raw visual tokens, fewer than ratio={ratio}, "
                "so no summary token was made and every raw KV row was evicted: the answer "
                "does not depend on the video (faithful to Video-XL). Use more frames, a "
                "smaller ratio or evict=False.")
            warnings.warn(notes[-1], StrategyWarning, stacklevel=2)
        return PrefillResult(last_hidden=last, cache=cache, llm_tokens=p + n_stream + s + q,
                             visual_tokens=n_stream + s, frames_encoded=t_frames, warnings=notes,
                             positions=plan)
