"""``stream``: any visual token stream prefilled through a hard KV budget (InfiniPot-V's
continual KV compression, arXiv 2506.15745; fused ``kv_compact``), so the KV cache and
the peak memory stay flat however many frames the video has.

The stream is ``full``'s (every frame's pooled tokens, then the family's end tokens),
made on demand (:class:`~lvlm_fast.models.strategies.base.VisualStream`: one vision chunk
alive at a time, never a tensor of every frame's tokens). After the prefix, the visual
tokens go through the decoder in windows of ``window_frames`` frames into a
:class:`lvlm_fast.stream_cache.BudgetedKVCache`; after each window that leaves more than
``kv_budget`` rows, every layer is compacted in place to ``kv_budget`` rows by one
``kv_compact`` call (protected: the prefix and the newest ``recent_frames`` frames; the
rest chosen by TaR for ``tar_ratio`` of the slots and VaN for the others). Nothing
depends on the question (query-agnostic, as a true stream must be); the question is run
after the last compaction, then the answer is decoded.

Positions: a row's RoPE position is its slot in the bounded buffer (kept keys are
re-rotated by their slot delta inside ``kv_compact``), so the decoder's default 1-D
positions (cache length + arange) are right for every window, the question and the answer,
and no position ever exceeds ``kv_budget + max(window, question + answer)`` (InfiniPot-V's
released code instead continues the uncompressed logical index, which passes any
trained RoPE range on long streams; see ``lvlm_fast/reference/kv_compact.py``).

Deviation from the released code, on purpose: it does not compress after the last block
(it knows the total frame count); a stream does not know which window is the last, so
this strategy compacts after every window, and the question always sees at most
``kv_budget`` video+prefix rows.

Knobs (:class:`StreamConfig`), defaults from the method facts
(``shared/methods/infinipot_v.md``), for LLaVA-OneVision-7B (196 tokens per frame):

- ``kv_budget = 6144`` rows per layer: the paper's "6K" setting, where InfiniPot-V matches
  the 50K full cache on Qwen-2-VL-7B (65.6/65.8/62.8/58.4 vs 65.2/65.8/63.9/58.8) and is
  within ~2 points on LLaVA-Next-Video-7B. 6144 rows = 31 LLaVA-OV frames.
- ``window_frames = 8``: the trigger. The released code adds ``block_size -
  compress_frame_num = 32 - 24 = 8`` frames per block, then compresses: the cache reaches
  |M| = budget + 8 frames and is cut to |C| = budget (|C|/|M| = 0.80 here vs the code's
  0.75).
- ``recent_frames = 8``: protected newest frames; the code keeps ``query_ratio`` (0.25) x
  32 = 8 frames, exactly its newest block (here: the window just added).
- ``tar_ratio = None``: share of the selectable slots filled by TaR, the rest by VaN;
  None = the code's default 0.5 on families whose frames are fixed-size rows, 0 (VaN) on
  Qwen3-VL / Qwen3.5 (below); 0 = VaN only, 1 = TaR only.

Composition: ``slowfast``, ``llamavid`` and ``vilamp`` take a ``kv_budget`` knob; when set,
:class:`~lvlm_fast.models.strategies.base.EmbeddingStrategy` streams their (reduced) visual
tokens through the same budgeted cache with :func:`budgeted_prefill` (one place, no
per-strategy copy). Their tokens are not whole frames of one grid, so TaR's patch index is
undefined there: they use VaN only, no protected recent rows, and windows of the wrapper's
``prefill_chunk_tokens`` (the chunk it already prefills in, so the activation peak is
unchanged). ``videoxl`` takes ``kv_budget`` as well: it drives its own windows, and
after each one compacts its sink + summaries (:func:`lvlm_fast.stream_cache.compact_per_layer`;
1-D RoPE: kept summaries re-rotated to their slots; M-RoPE families: moved unrotated, so
videoxl's logical positions are kept, see its module doc).

Families. The position rule is defined here, once; each family's
:class:`~lvlm_fast.models.families.PositionPlan` implements it (``stream_chunk`` /
``stream_tail``; nothing here tests which family it is).

- **1-D RoPE** (LLaVA-OneVision): a row's position is its slot (above).
- **M-RoPE** (Qwen2.5-VL blocked sections; Qwen3-VL and Qwen3.5 interleaved sections,
  Qwen3.5 with partial rotary), one rule for every window, the question and the answer:

  * a cached row's temporal id is its slot (the prefix: slots ``0 .. P-1``; a window's
    rows: ``cache length + arange``); ``kv_compact`` re-rotates only the temporal
    frequency pairs of a kept key by its slot delta (blocked: the first ``t`` pairs;
    interleaved: the pairs transformers' ``apply_interleaved_mrope`` gives the temporal
    id; partial rotary: those pairs within the rotated dims), so this stays true after
    every compaction;
  * a visual row's height/width ids are ``P + y``, ``P + x`` of the token inside its
    :class:`TokenBlocks` block; a text row (prefix, and on Qwen3-VL / Qwen3.5 the
    timestamp text and ``<|vision_start|>`` / ``<|vision_end|>`` of each unit) gets its
    slot at insertion on all three axes. Height/width ids never move;
  * the question starts at ``max(cached rows, P + max(h, w))`` on all three axes (after
    every cached temporal and spatial id, as the plans put text after the video) and the
    answer continues from there.

  So every id stays below ``max(C, P + max(h, w)) + question + answer`` with ``C =
  kv_budget + max(window rows, question + answer)``, independent of the frame count (on
  Qwen3-VL / Qwen3.5 a window's rows include its units' timestamps, which gain one token
  per 10x of video length: 8 units of a 100,000-frame video stay under 8 x (196 + 20)
  rows); :func:`budgeted_prefill` refuses a budget whose bound passes the model's
  ``max_position_embeddings``. The native Qwen3-VL ids (``cur``, ``cur + y``, ``cur + x``
  with ``cur`` growing every unit) are NOT bounded, which is why the rule differs. With
  nothing evicted this is not ``full``'s positions (``full`` gives a unit one temporal id;
  here each row has its slot), so the budget-covers-the-stream case equals the decoder
  fed this rule's ids with every row kept, not ``full``.

**Qwen3-VL / Qwen3.5 (units framed with timestamp text).** The stream feeds the video
segment exactly as ``full``'s prompt has it (the family's
:meth:`~lvlm_fast.models.families.ModelFamily.visual_layout`: per unit ``<t seconds>
<|vision_start|>``, the unit's tokens, ``<|vision_end|>``, the processor's layout), in
windows of ``window_frames`` whole units; ``recent_frames`` protects the newest units'
rows *including* their timestamp and start/end rows. TaR needs frames of a fixed number of
rows and a timestamp's length varies with its digits, so these families run VaN only (or
``attention_mass``): ``tar_ratio`` defaults to None = 0.5 (the method's) on fixed-size
frames and 0 here, and an explicit ``tar_ratio > 0`` raises ``ValueError``. What happens to
timestamp rows, i.e. what "coherent with the kept frames" means under ``stream``: every unit
enters the decoder with its own timestamp right before its tokens (so every row's K/V was
computed with the right timestamp in context); a compaction then keeps or drops every
non-protected row, timestamp rows included, per layer and KV head by its score alone, and
the kept rows keep their time order. So a kept timestamp row always precedes whatever is
kept of its own unit and follows what is kept of earlier units, but a unit's tokens may
survive in a head where its timestamp row does not (and vice versa). DeepStack (Qwen3-VL):
each prefill chunk of a window adds its visual rows' DeepStack levels at their positions,
exactly as the chunked prefill does (the rows are never all held); Qwen3.5 has none.
**Qwen3.5 (hybrid)**: the budgeted cache holds K/V rows for the full-attention layers only;
the linear-attention layers carry their conv and recurrent states across every chunk and
window in place, and a compaction never touches them (the recurrent state has already
absorbed every token, evicted ones included).

The ``kv_budget`` compositions use the same rule with the strategy's own ``TokenBlocks``
and layout (on Qwen3-VL / Qwen3.5: windows of ``prefill_chunk_tokens`` over the segment,
timestamp text included).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lvlm_fast.models.families.base import TokenBlocks
from lvlm_fast.models.strategies.base import (
    PrefillResult,
    Strategy,
    StrategyConfig,
    VideoPrompt,
    VisualStream,
    register,
)
from lvlm_fast.models.strategies.full import pooled_video_embeds
from lvlm_fast.stream_cache import BudgetedKVCache

if TYPE_CHECKING:
    from lvlm_fast.models.wrapper import LongVideoVLM

DEFAULT_KV_BUDGET = 6144  # the paper's "6K" (module doc)
DEFAULT_WINDOW_FRAMES = 8  # block 32 - keep 24 of the released code
DEFAULT_RECENT_FRAMES = 8  # query_ratio 0.25 x 32 frames
DEFAULT_TAR_RATIO = 0.5  # the released code's tar_ratio


def _check_int(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def check_kv_budget(value: object) -> None:
    """``kv_budget`` knob of the composing strategies: None (off) or an int >= 1."""
    if value is not None:
        _check_int("kv_budget", value, 1)


@dataclass
class StreamConfig(StrategyConfig):
    kv_budget: int = DEFAULT_KV_BUDGET  # rows per layer after each compaction (incl. prefix)
    window_frames: int = DEFAULT_WINDOW_FRAMES  # frames appended between compactions
    recent_frames: int = DEFAULT_RECENT_FRAMES  # newest frames always kept
    # TaR's share of the selectable slots (rest: VaN); None = the method's 0.5 where frames
    # are fixed-size rows, 0 (VaN) on families that frame units with timestamp text
    tar_ratio: float | None = None
    # score every selectable row by the attention mass it got from the window's queries
    # instead (not in the method; an explicit softmax pass per layer, see KeyMass)
    attention_mass: bool = False

    def __post_init__(self) -> None:
        _check_int("kv_budget", self.kv_budget, 1)
        _check_int("window_frames", self.window_frames, 1)
        _check_int("recent_frames", self.recent_frames, 0)
        r = self.tar_ratio
        if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool)
                              or not 0 <= r <= 1):
            raise ValueError(f"tar_ratio must be None or a number in [0, 1], got {r!r}")
        if r is not None and r > 0 and self.recent_frames < 1:
            raise ValueError("recent_frames must be >= 1 when tar_ratio > 0 (TaR compares "
                             "each token with the recent frames); use tar_ratio=0 for VaN")


class KeyMass:
    """Context manager: while active, the decoder's attention function (looked up by its
    registered name, so its mask function is unchanged) is wrapped to also add up, per layer,
    the attention mass every cached key receives from the queries of the current call:
    ``sum over query rows and the query heads of one KV head of softmax(Q K^T * scale)``
    under the bottom-right causal mask (batch 1, no padding, as the wrapper runs), fp32,
    query rows in blocks of 256 (bounded transient). :meth:`take` returns the (L, B, Hkv, C)
    scores (0 beyond the keys seen; L = the cache's full-attention layers, in order) and
    resets them (one window's queries per compaction)."""

    def __init__(self, lm: torch.nn.Module, cache: BudgetedKVCache) -> None:
        self.lm, self.cache = lm, cache
        self.mass: dict[int, torch.Tensor] = {}
        # the decoder's attention modules only: the vision tower (encoded on demand inside
        # the window) shares the registered function name
        self.mods = {id(m) for m in lm.modules() if hasattr(m, "layer_idx")}

    def _wrap(self, inner_of: Any) -> Any:
        def attn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            out = inner_of(module)(module, query, key, value, attention_mask, *args, **kwargs)
            if id(module) not in self.mods:
                return out
            b, hq, q, d = query.shape
            hkv, s = key.shape[1], key.shape[2]
            scale = kwargs.get("scaling") or module.scaling
            qq = query.reshape(b, hkv, hq // hkv, q, d).float()
            kf = key.float()
            cols = torch.arange(s, device=key.device)
            acc = torch.zeros(b, hkv, s, dtype=torch.float32, device=key.device)
            for lo in range(0, q, 256):
                hi = min(lo + 256, q)
                logits = torch.einsum("bhgqd,bhsd->bhgqs", qq[:, :, :, lo:hi], kf) * scale
                rows = torch.arange(lo, hi, device=key.device) + (s - q)
                logits.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
                acc += logits.softmax(-1).sum((2, 3))
            li = module.layer_idx
            prev = self.mass.get(li)
            if prev is not None:
                acc[..., : prev.shape[-1]] += prev
            self.mass[li] = acc
            return out
        return attn

    def __enter__(self) -> KeyMass:
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.name = name = self.lm.config._attn_implementation
        self.saved = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)

        def inner_of(module: Any) -> Any:
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward",
                            None)
            return (self.saved if self.saved is not None else
                    ALL_ATTENTION_FUNCTIONS._global_mapping.get(name, eager))

        ALL_ATTENTION_FUNCTIONS._local_mapping[name] = self._wrap(inner_of)
        return self

    def __exit__(self, *exc: object) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.saved is None:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(self.name, None)
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping[self.name] = self.saved

    def take(self) -> torch.Tensor:
        key = self.cache.key
        out = torch.zeros(key.shape[:4], dtype=torch.float32, device=key.device)
        # decoder layer index -> row of the stacked buffers (hybrid decoders: the
        # full-attention layers only)
        kv = {id(la): j for j, la in enumerate(self.cache.kv_layers)}
        for li, m in self.mass.items():
            out[kv[id(self.cache.layers[li])], :, :, : m.shape[-1]] = m
        self.mass = {}
        return out


def _segment(vlm: LongVideoVLM, prompt: VideoPrompt, n: int, blocks: TokenBlocks | None
             ) -> tuple[list[Any], Any]:
    """The video segment as the decoder reads it: pieces (``(lo, hi)`` visual row ranges
    or (k,) CPU id tensors, as :meth:`ModelFamily.visual_layout`) and the layout (None when
    the family puts no text between its units: then one piece, every visual row)."""
    layout = vlm.family.visual_layout(blocks, n, text_ids=prompt.text_ids)
    if layout is None:
        return ([(0, n)] if n else []), None
    return list(layout.pieces), layout


def _frame_ends(pieces: list[Any], lengths: list[int], fam_name: str) -> list[int]:
    """End offsets (in the segment) of the layout's frames: each frame is ``text, visual
    rows, text`` (:meth:`Qwen3VLFamily.visual_layout`)."""
    if len(pieces) % 3 or any(not isinstance(pc, tuple) for pc in pieces[1::3]):
        raise ValueError(f"the {fam_name} family's visual layout is not a sequence of "
                         "(text, visual rows, text) frames; stream windows need whole frames")
    ends, off = [], 0
    for i, length in enumerate(lengths):
        off += length
        if i % 3 == 2:
            ends.append(off)
    return ends


@torch.no_grad()
def budgeted_prefill(vlm: LongVideoVLM, prompt: VideoPrompt,
                     visual: torch.Tensor | VisualStream, frames_encoded: int, *,
                     kv_budget: int, window: int, recent: int = 0, tokens_per_frame: int = 0,
                     tar_ratio: float | None = 0.0, attention_mass: bool = False,
                     what: str = "kv_budget", blocks: TokenBlocks | None = None,
                     frames: tuple[int, int] | None = None) -> PrefillResult:
    """Prefix, then the video segment (``visual`` (1, N, feature_size), a tensor or a
    :class:`VisualStream`, with the family's text between units where it has a layout)
    in windows, each followed by an in-place compaction to ``kv_budget`` rows, then the
    question (module doc).

    Windows: families without a layout: ``window`` tokens, ``recent`` protected rows,
    TaR on ``tokens_per_frame`` rows per frame (``tar_ratio``; None = the method's 0.5).
    Families with a layout (Qwen3-VL / Qwen3.5 timestamps): ``frames = (window_frames,
    recent_frames)`` gives windows of whole layout frames and protects the newest
    ``recent_frames`` frames' rows (timestamp text included); without ``frames``,
    windows of ``window`` segment tokens and no protected rows. Their frames are not
    fixed-size, so TaR is refused there (``tar_ratio`` None = 0: VaN).
    ``attention_mass``: score the selectable rows by :class:`KeyMass` (window queries)
    instead of TaR/VaN. ``what`` names the knob in errors. ``blocks``: the visual tokens'
    :class:`TokenBlocks`, required on a family with grid positions (M-RoPE)."""
    _check_int("kv_budget", kv_budget, 1)
    _check_int("window", window, 1)
    p, n, q = prompt.prefix_ids.shape[1], visual.shape[1], prompt.question_ids.shape[1]
    fs = vlm.feature_size
    if visual.shape[2] != fs:
        raise ValueError(f"visual must be (1, N, feature_size={fs}), got {tuple(visual.shape)}")
    lm = vlm.language_model
    fam = vlm.family
    plan, layout = None, None
    pieces: list[Any] = [(0, n)] if n else []
    if fam.needs_blocks():  # grid (M-RoPE) positions: the family's bounded stream rule
        if n and blocks is None:
            raise ValueError(f"{what}: the {fam.name} family's M-RoPE positions need the "
                             "visual tokens' TokenBlocks (blocks=)")
        pieces, layout = _segment(vlm, prompt, n, blocks)
        plan = fam.position_plan(p, blocks, n, q) if layout is None else \
            fam.position_plan(p, blocks, n, q, layout=layout)
    lengths = [pc[1] - pc[0] if isinstance(pc, tuple) else pc.shape[0] for pc in pieces]
    seg = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    # window boundaries (segment offsets) and the protected recent rows of each
    if layout is not None:
        if tar_ratio is not None and tar_ratio > 0 and not attention_mass:
            raise ValueError(
                f"{what}: tar_ratio={tar_ratio} needs frames of a fixed number of rows, but "
                f"the {fam.name} family frames every unit with timestamp text of varying "
                "length, so TaR's patch index is undefined; use tar_ratio=0 (VaN, the "
                "default on this family) or attention_mass=True")
        tar_ratio, tokens_per_frame = 0.0, 0
        if frames is not None:
            edges = [0, *_frame_ends(pieces, lengths, fam.name)]  # frame k: edges[k:k+2]
            wf, rf = frames
            nf = len(edges) - 1
            ks = list(range(wf - 1, nf, wf))
            if nf and (not ks or ks[-1] != nf - 1):
                ks.append(nf - 1)  # the last, partial window
            # a window ends after frame k; the newest rf frames' rows are protected
            bounds = [(edges[k + 1], edges[k + 1] - edges[max(k + 1 - rf, 0)]) for k in ks]
        else:
            bounds = [(min(a + window, seg), 0) for a in range(0, seg, window)]
    else:
        if tar_ratio is None:
            tar_ratio = DEFAULT_TAR_RATIO
        if tar_ratio > 0 and recent < 1 and not attention_mass:
            raise ValueError("recent_frames must be >= 1 when tar_ratio > 0 (TaR compares "
                             "each token with the recent frames); use tar_ratio=0 for VaN")
        bounds = [(min(a + window, seg), recent) for a in range(0, seg, window)]
    cuts = [c for c, _ in bounds]
    widths = [b - a for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    big = max(widths, default=0)
    most_recent = max((r for _, r in bounds), default=0)
    if kv_budget < p + most_recent:
        raise ValueError(f"kv_budget must be >= prefix tokens + protected recent tokens = "
                         f"{p} + {most_recent} = {p + most_recent}, got {kv_budget}")
    tail = q + vlm.decode_reserve
    capacity = kv_budget + max(big, tail)
    try:  # refuses RoPE layouts kv_compact cannot re-rotate (scaled RoPE types)
        cache = BudgetedKVCache.for_text_config(
            vlm.config.text_config, capacity, budget=kv_budget,
            inv_freq=lm.rotary_emb.inv_freq, dtype=vlm.dtype, device=vlm.device)
    except NotImplementedError as e:
        raise NotImplementedError(f"{what} on the {fam.name} family: {e}") from None
    # every id stays below `top`, whatever the frame count (module doc): check it against
    # the trained range once, before any work
    top = capacity if plan is None else \
        max(capacity, plan.stream_tail(0).start + tail)
    limit = getattr(vlm.config.text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and top > limit:
        raise ValueError(f"{what}: kv_budget={kv_budget} gives positions up to {top - 1}, past "
                         f"the model's max_position_embeddings={limit}; use a smaller budget")
    step = vlm.prefill_chunk_tokens

    def feed(a: int, b: int) -> None:
        """Segment tokens [a, b) (embeddings and the family's DeepStack rows exactly as the
        chunked prefill builds them, :meth:`LongVideoVLM.segment_inputs`) at the rule's
        position ids."""
        x, kw = vlm.segment_inputs(pieces, starts, lengths, visual, a, b)
        pos = None if plan is None else plan.stream_chunk(p + a, p + b, cache.get_seq_length())
        vlm.run_llm(x, cache, pos, **kw)

    with vlm._stage("prefill"), vlm.llm_attention():
        vlm.run_llm(vlm.embed_tokens(prompt.prefix_ids), cache,
                    None if plan is None else plan.stream_chunk(0, p, 0))
        lo = 0
        for hi, rec in bounds:
            mass = KeyMass(lm, cache) if attention_mass else contextlib.nullcontext()
            with mass:
                for a in range(lo, hi, step):
                    feed(a, min(a + step, hi))
            if attention_mass:
                cache.compact(prefix=p, recent=rec, scores=mass.take())
            else:
                cache.compact(prefix=p, recent=rec, tokens_per_frame=tokens_per_frame,
                              tar_ratio=tar_ratio)
            lo = hi
        after = None if plan is None else plan.stream_tail(cache.get_seq_length())
        last = vlm.run_llm(vlm.embed_tokens(prompt.question_ids), cache,
                           None if after is None else after.chunk(0, q))[:, -1:].clone()
    return PrefillResult(last_hidden=last, cache=cache, llm_tokens=p + seg + q, visual_tokens=n,
                         frames_encoded=frames_encoded, positions=after)


def composed_prefill(vlm: LongVideoVLM, prompt: VideoPrompt, visual: torch.Tensor,
                     frames_encoded: int, kv_budget: int, name: str,
                     blocks: TokenBlocks | None = None) -> PrefillResult:
    """A reduction strategy's visual tokens under a ``kv_budget`` (module doc: VaN only,
    no protected recent rows, windows of ``prefill_chunk_tokens``); ``blocks``: its
    :class:`TokenBlocks` (M-RoPE families)."""
    return budgeted_prefill(vlm, prompt, visual, frames_encoded, kv_budget=kv_budget,
                            window=vlm.prefill_chunk_tokens, what=f"{name} with kv_budget",
                            blocks=blocks)


@register
class StreamStrategy(Strategy):
    """``full``'s tokens under a hard KV budget, compacted after every window (module doc)."""

    name = "stream"
    config_class = StreamConfig
    holds_all_patch_features = False  # one vision chunk and one window at a time

    def __init__(self, config: StreamConfig | None = None, **overrides: object) -> None:
        super().__init__(config, **overrides)
        self.cache: BudgetedKVCache | None = None  # the last prefill's cache (tests)

    @torch.no_grad()
    def prefill(self, vlm: LongVideoVLM, prompt: VideoPrompt) -> PrefillResult:
        cfg: StreamConfig = self.config
        pv = prompt.pixel_values
        gh, gw = vlm.family.token_grid((pv.shape[-2], pv.shape[-1]))
        per = gh * gw  # tokens per temporal unit (frame): TaR's patch index
        out = pooled_video_embeds(vlm, pv, fps=prompt.fps, stream=True)
        res = budgeted_prefill(vlm, prompt, out[0], out[1], kv_budget=cfg.kv_budget,
                               window=cfg.window_frames * per, recent=cfg.recent_frames * per,
                               tokens_per_frame=per, tar_ratio=cfg.tar_ratio,
                               attention_mass=cfg.attention_mass, what="stream",
                               blocks=out.blocks,
                               frames=(cfg.window_frames, cfg.recent_frames))
        self.cache = res.cache
        return res


__all__ = ["StreamConfig", "StreamStrategy", "budgeted_prefill", "check_kv_budget",
           "composed_prefill"]
