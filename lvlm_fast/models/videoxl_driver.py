"""Video-XL window driver on a stock transformers decoder (Qwen2, Llama; 1-D RoPE).

``run_videoxl(model, prefix_ids, visual, question_ids, ratio=..., window=...)``:

1. the prefix (the sink) goes through the decoder into a :class:`SummaryKVCache`;
2. the visual token embeddings (1, N, D) are cut into windows of ``window`` raw tokens;
   each window gets its summary tokens interleaved by the fixed-stride rule (with the
   remainder carried from earlier windows), is run through the decoder with the summary
   q/k/v projections active on the summary rows (strided views), then the cache evicts
   the window's raw rows and keeps its summaries (re-rotated to ``sink + j``);
3. the question is run and kept raw, then ``max_new_tokens`` greedy tokens are generated.

The LM head runs only on the question's last position and on each generated token. The
model's attention implementation is switched to ``"lvlm_summary"`` for the call (and
restored). Layout and positions are host ints derived from sizes, never from device
values, so nothing syncs with the device per token or per window. EOS: tokens after the
first ``eos_token_id`` are replaced by it (masking on device, no early stop).
Batch 1 (every row of a batch would need the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lvlm_fast.cache import ATTN_NAME, SummaryKVCache, _check_ratio_window
from lvlm_fast.models._compat import cache_kwargs
from lvlm_fast.models.families.base import HOLD_KWARG
from lvlm_fast.nn.summary_proj import SummaryEmbedding, SummaryLayout, install_summary_projections


@dataclass
class VideoXLOutput:
    logits: torch.Tensor  # (max_new_tokens, vocab) fp32: row t = logits that chose token t
    tokens: torch.Tensor  # (max_new_tokens,) int64
    cache: SummaryKVCache


def window_layout(n_raw: int, ratio: int, carry: int) -> tuple[int, int, int, int]:
    """(summaries, first summary slot, stride, new carry) of a window of n_raw raw tokens."""
    k = (n_raw + carry) // ratio
    return k, ratio - carry, ratio + 1, (n_raw + carry) % ratio


def interleave(raw: torch.Tensor, summary: torch.Tensor, ratio: int, carry: int) -> torch.Tensor:
    """(1, n, D) raw tokens + (D,) summary embedding -> (1, n + k, D) window."""
    n = raw.shape[1]
    k, first, stride, _ = window_layout(n, ratio, carry)
    out = raw.new_empty((raw.shape[0], n + k, raw.shape[2]))
    if k:
        out[:, first :: stride] = summary.to(raw.dtype)
    t = torch.arange(n, device=raw.device)
    out.index_copy_(1, t + torch.div(t + carry, ratio, rounding_mode="floor"), raw)
    return out


class AttnImpl:
    """Context manager: switch the model's attention function, restore it afterwards."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        self.model, self.name, self.old = model, name, None

    def __enter__(self) -> None:
        self.old = self.model.config._attn_implementation
        self.model.set_attn_implementation(self.name)

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self.old)


@torch.no_grad()
def interleave_positions(raw_pos: torch.Tensor, ratio: int, carry: int) -> torch.Tensor:
    """Explicit position ids (..., n) of a window's raw tokens -> (..., n + k) of the
    interleaved window: each summary token takes the position of the raw token right
    before it (the last token of the group it summarises; there always is one, since the
    first summary slot is ``ratio - carry >= 1``)."""
    n = raw_pos.shape[-1]
    k, first, stride, _ = window_layout(n, ratio, carry)
    out = raw_pos.new_empty((*raw_pos.shape[:-1], n + k))
    t = torch.arange(n, device=raw_pos.device)
    out.index_copy_(-1, t + torch.div(t + carry, ratio, rounding_mode="floor"), raw_pos)
    if k:
        m = torch.arange(k, device=raw_pos.device)
        out[..., first::stride] = raw_pos.index_select(-1, first - 1 + m * ratio)
    return out


@torch.no_grad()
def run_window(model: torch.nn.Module, cache: SummaryKVCache, layout: SummaryLayout,
               raw: torch.Tensor, vst: torch.Tensor, ratio: int,
               raw_positions: torch.Tensor | None = None, **decoder_kwargs: Any) -> int:
    """One window: interleave summaries, forward (attention implementation must already be
    ``"lvlm_summary"``), evict. Returns the number of summaries kept.

    ``raw_positions``: None = the decoder's default positions (cache length + arange; 1-D
    RoPE, summaries re-rotated to ``sink + j`` on eviction); else explicit ids of the raw
    tokens (e.g. M-RoPE (3, 1, n)), summaries placed by :func:`interleave_positions`.
    ``decoder_kwargs``: the family's extra decoder inputs for the interleaved window
    (Qwen3-VL DeepStack: ``visual_pos_masks`` over the window incl. its summary slots,
    which are never visual, and the visual rows' DeepStack features)."""
    n = raw.shape[1]
    k, first, stride, _ = window_layout(n, ratio, cache.carry)
    x = interleave(raw, vst, ratio, cache.carry)
    w0 = cache.get_seq_length()
    cache.check_room(x.shape[1])
    kw = dict(decoder_kwargs)
    held = kw.pop(HOLD_KWARG, None)  # alive for the call, not a model input (families)
    if raw_positions is not None:
        kw["position_ids"] = interleave_positions(raw_positions, ratio, cache.carry)
    layout.set(first, stride, k)
    try:
        model.model(inputs_embeds=x, **cache_kwargs(model.model, cache), use_cache=True, **kw)
    finally:
        layout.clear()
    del held
    return cache.evict_window(w0, n, ratio)


@torch.no_grad()
def run_videoxl(
    model: torch.nn.Module,
    prefix_ids: torch.Tensor,
    visual: torch.Tensor,
    question_ids: torch.Tensor,
    *,
    ratio: int,
    window: int,
    max_new_tokens: int = 1,
    summary_embed: SummaryEmbedding | torch.Tensor | None = None,
    evict: bool = True,
    eos_token_id: int | None = None,
    cache: SummaryKVCache | None = None,
    on_window=None,
) -> VideoXLOutput:
    """Run prefix, video windows, question and greedy generation (see module doc).

    ``prefix_ids`` (1, P) and ``question_ids`` (1, Q) int64, ``visual`` (1, N, D) in the
    model's dtype. Summary projections are installed on first use (sharing the base
    weights, no copy, unless already installed). ``on_window(i)`` is called after each window
    (benchmarks use it to time windows).
    """
    _check_ratio_window(ratio, window)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for name, t in (("prefix_ids", prefix_ids), ("question_ids", question_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must be a (1, L>=1) id tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    hidden = model.config.hidden_size
    if not isinstance(visual, torch.Tensor) or visual.dim() != 3 or visual.shape[0] != 1 \
            or visual.shape[2] != hidden:
        raise ValueError(f"visual must be (1, N, hidden={hidden}), got "
                         f"{tuple(visual.shape) if isinstance(visual, torch.Tensor) else visual}")
    layout: SummaryLayout = install_summary_projections(model)
    if summary_embed is None:
        summary_embed = SummaryEmbedding.from_model(model)
    vst = summary_embed.weight if isinstance(summary_embed, SummaryEmbedding) else summary_embed
    n_vis = visual.shape[1]
    tail = question_ids.shape[1] + max_new_tokens - 1
    if cache is None:
        cache = SummaryKVCache.for_model(model, prefix=prefix_ids.shape[1], num_visual=n_vis,
                                         ratio=ratio, window=window, tail=tail, evict=evict)
    need = SummaryKVCache.capacity_for(prefix_ids.shape[1], n_vis, ratio, window, tail,
                                       evict=cache.evict)
    if need > cache.capacity - cache.get_seq_length():
        raise ValueError(f"cache capacity {cache.capacity} (holding {cache.get_seq_length()}) "
                         f"is too small for this input: {need} rows needed")
    inner = model.model
    embed = model.get_input_embeddings()

    def step(x: torch.Tensor) -> torch.Tensor:
        cache.check_room(x.shape[1])
        return inner(inputs_embeds=x, **cache_kwargs(inner, cache),
                     use_cache=True).last_hidden_state

    with AttnImpl(model, ATTN_NAME):
        step(embed(prefix_ids))
        cache.mark_sink()
        for wi, start in enumerate(range(0, n_vis, window)):
            run_window(model, cache, layout, visual[:, start : start + window], vst, ratio)
            if on_window is not None:
                on_window(wi)
        h = step(embed(question_ids))[:, -1:]
        logits = torch.empty(max_new_tokens, model.config.vocab_size, device=visual.device)
        tokens = torch.empty(max_new_tokens, dtype=torch.long, device=visual.device)
        for t in range(max_new_tokens):
            lg = model.lm_head(h)[0, -1].float()
            logits[t] = lg
            tokens[t] = lg.argmax()
            if t + 1 < max_new_tokens:
                h = step(embed(tokens[t : t + 1].view(1, 1)))
    if eos_token_id is not None:
        hit = (tokens == eos_token_id).long().cumsum(0)
        after = (hit - (tokens == eos_token_id).long()) > 0
        tokens = torch.where(after, torch.full_like(tokens, eos_token_id), tokens)
    return VideoXLOutput(logits, tokens, cache)
