"""`stream` and every `kv_budget` composition on the Qwen3-VL and Qwen3.5 families (issue 12 /
issue 11): interleaved M-RoPE, timestamp text between units, DeepStack (Qwen3-VL), a hybrid
decoder with linear-attention layers and partial rotary (Qwen3.5).

The rule under test (``lvlm_fast.models.strategies.stream`` module doc): the prompt's
video segment enters the decoder exactly as ``full``'s (per unit ``<t seconds>
<|vision_start|>``, its tokens, ``<|vision_end|>``), in windows of whole units; a text row
gets its cache slot on all three M-RoPE axes, a visual row ``(slot, P + y, P + x)``; after
a compaction a kept key's temporal pairs are re-rotated to its new slot, the other pairs
never move; the question starts at ``max(cached rows, P + max(h, w))``.

The reference is written here in plain PyTorch on transformers' decoder: a DynamicCache
(transformers' own hybrid cache on Qwen3.5), window by window with those ids built by hand
from the family's prompt layout (itself checked against transformers' processor layout),
DeepStack rows given at the window's visual positions, and after each window the reference
``kv_compact`` selection with every kept key re-rotated by transformers' own rotary
embedding and ``apply_rotary_pos_emb`` of the family (inverse at the old ids, forward at
the new ones): an independent check of the interleaved / partial-rotary layout."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import (  # tests/tier0 is on sys.path
    END,
    START,
    VIDEO,
    check_stale_rows_never_seen,
    reference_prompt,
    text_ids,
)
from transformers import DynamicCache

from lvlm_fast.models import LongVideoVLM, get_config, get_strategy
from lvlm_fast.models.strategies.stream import StreamConfig
from lvlm_fast.reference.kv_compact import kv_compact as ref_compact
from lvlm_fast.stream_cache import BudgetedKVCache

HW = (64, 96)  # merged grid 2 x 3 per unit (patch 16, merge 2)
GH, GW = 2, 3
PER = GH * GW
P, Q = 3, 5
MAX_NEW = 3
FAMILIES = {"qwen3_vl": "tiny-qwen3-vl", "qwen3_5": "tiny-qwen3.5"}


def _build(name: str):
    from transformers import Qwen3_5ForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = Qwen3VLForConditionalGeneration if name == "qwen3_vl" else \
        Qwen3_5ForConditionalGeneration
    torch.manual_seed(0)
    return cls(get_config(FAMILIES[name])).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return _build(request.param)


def spread_text_ids(text: str) -> list[int]:
    """A stand-in tokenizer for the compaction tests: one id per character like
    ``text_ids``, but mixed with the whole string, so the repeated ``< seconds>`` of every
    unit gets different ids per unit. Repeated identical tokens give (near-)identical
    value norms on a tiny random model, i.e. VaN ties that an ulp decides; the reference
    (transformers' RoPE and attention) and the fused path may then pick different, equally
    scored rows. Ids stay in [3, 243) (no placeholder / vision start / end id)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(text))
    return [3 + (ord(c) * 17 + i * 29 + seed) % 240 for i, c in enumerate(text)]


def _prompt(frames: int, seed: int = 0, ids=spread_text_ids):
    from lvlm_fast.models.strategies.base import VideoPrompt

    g = torch.Generator().manual_seed(seed)
    prefix = torch.cat([torch.randint(3, 250, (1, P - 1), generator=g),
                        torch.tensor([[START]])], 1)
    question = torch.cat([torch.tensor([[END]]), torch.randint(3, 250, (1, Q - 1),
                                                                generator=g)], 1)
    return VideoPrompt(torch.randn(frames, 3, *HW, generator=g), prefix, question, fps=2.0,
                       text_ids=ids)


def _rope_fn(vlm):
    """transformers' own apply_rotary_pos_emb of the family (partial rotary on Qwen3.5)."""
    if vlm.family.name == "qwen3_5":
        from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb
    return apply_rotary_pos_emb


def _rotate(vlm, k: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """k (R, D) rotated by transformers' M-RoPE at ids pos (3, R) (inverse: undone)."""
    lm = vlm.language_model
    cos, sin = lm.rotary_emb(k[None], pos[:, None, :])
    kk = k.view(1, 1, *k.shape)
    out = _rope_fn(vlm)(kk, kk, cos, -sin if inverse else sin)[1]
    return out.view_as(k)


def _segment(vlm, pr, out):
    """The video segment as the decoder reads it, from the family's prompt layout:
    (embeddings (1, S, hidden), DeepStack rows (S_vis, L * hidden) or None, visual mask
    (S,), (y, x) of each visual row (S, 2), frame of each row (S,))."""
    visual, blocks = out[0], out.blocks
    n, hid = visual.shape[1], vlm.hidden_size
    layout = vlm.family.visual_layout(blocks, n, text_ids=pr.text_ids)
    _, y, x = blocks.coords(0, n)
    embs, vis, yx, frame, deep = [], [], [], [], []
    for i, pc in enumerate(layout.pieces):
        if isinstance(pc, tuple):
            a, b = pc
            embs.append(visual[:, a:b, :hid])
            deep.append(visual[0, a:b, hid:])
            vis += [True] * (b - a)
            yx.append(torch.stack([y[a:b], x[a:b]], 1))
        else:
            embs.append(vlm.embed_tokens(pc.view(1, -1)))
            vis += [False] * pc.shape[0]
            yx.append(torch.zeros(pc.shape[0], 2, dtype=torch.int64))
        frame += [i // 3] * (embs[-1].shape[1])
    ds = torch.cat(deep) if visual.shape[2] > hid else None
    return (torch.cat(embs, 1), ds, torch.tensor(vis), torch.cat(yx), torch.tensor(frame))


def _unit_windows(frame: torch.Tensor, window: int, recent: int) -> list[tuple[int, int]]:
    """(end, protected recent rows) of windows of ``window`` whole frames."""
    f = frame.tolist()
    nf = max(f) + 1
    ends = [max(i for i, v in enumerate(f) if v == k) + 1 for k in range(nf)]
    starts = [0, *ends]
    cut = [k for k in range(nf) if (k + 1) % window == 0 or k == nf - 1]
    return [(ends[k], ends[k] - starts[max(k + 1 - recent, 0)]) for k in cut]


def _reference(vlm, pr, seg, budget, windows, max_new=0, mass=False):
    """The rule in plain PyTorch (module doc). Returns (first logits, tokens, K, V of the
    full-attention layers after the question (L, 1, Hkv, rows, D), linear-layer states,
    every id used). ``mass``: rows scored by the attention mass of the window's queries
    (transformers' eager attention probabilities, summed over the window's query rows and
    each KV head's query heads) instead of VaN."""
    lm = vlm.language_model
    embeds, deep, vis, yx, _ = seg
    try:
        types = lm.config.layer_types or ["full_attention"] * len(lm.layers)
    except AttributeError:  # Qwen3-VL's text config has no layer_types
        types = ["full_attention"] * len(lm.layers)
    full = [i for i, t in enumerate(types) if t != "linear_attention"]
    hkv = lm.config.num_key_value_heads
    rope = lm.config.rope_parameters
    seen = []
    cache = DynamicCache(config=lm.config)

    probs = []

    def run(x, pos, **kw):
        seen.append(pos)
        out = lm(inputs_embeds=x, position_ids=pos, past_key_values=cache, use_cache=True,
                 output_attentions=mass, **kw)
        if mass:
            probs[:] = [a for a in out.attentions if a is not None]
        return out.last_hidden_state

    with torch.no_grad():
        run(vlm.embed_tokens(pr.prefix_ids), torch.arange(P).view(1, 1, -1).expand(3, 1, -1))
        hw = torch.arange(P).view(1, 1, 1, -1, 1).expand(len(full), 1, hkv, -1, 2)
        vis_seen = 0
        lo = 0
        for hi, rec in windows:
            slot = cache.get_seq_length()
            t = torch.arange(slot, slot + hi - lo)
            v = vis[lo:hi]
            h = torch.where(v, P + yx[lo:hi, 0], t)
            w = torch.where(v, P + yx[lo:hi, 1], t)
            kw = {}
            if deep is not None and v.any():
                k = int(v.sum())
                rows = deep[vis_seen : vis_seen + k].reshape(k, -1, vlm.hidden_size)
                kw = dict(visual_pos_masks=v.view(1, -1),
                          deepstack_visual_embeds=list(rows.unbind(1)))
                vis_seen += k
            run(embeds[:, lo:hi], torch.stack([t, h, w]).view(3, 1, -1), **kw)
            hw = torch.cat([hw, torch.stack([h, w], 1).view(1, 1, 1, -1, 2)
                            .expand(len(full), 1, hkv, -1, 2)], 3)
            lo = hi
            length = cache.get_seq_length()
            if length <= budget:
                continue
            key = torch.stack([cache.layers[li].keys for li in full])
            value = torch.stack([cache.layers[li].values for li in full])
            sc = None
            if mass:  # (L, 1, Hkv, length): each key's mass from this window's queries
                assert len(probs) == len(full)
                sc = torch.stack([a.float().reshape(1, hkv, -1, a.shape[2], a.shape[3])
                                  .sum((2, 3)) for a in probs])
            _, keep, _ = ref_compact(key.clone(), value.clone(), length, lm.rotary_emb.inv_freq,
                                     budget=budget, prefix=P, recent=rec,
                                     primary_slots=budget - P - rec if mass else 0,
                                     scores=sc, mrope_section=rope["mrope_section"],
                                     mrope_interleaved=True)
            nk = torch.empty_like(key[:, :, :, :budget])
            nv = torch.empty_like(value[:, :, :, :budget])
            nhw = torch.empty_like(hw[:, :, :, :budget])
            for j in range(len(full)):
                for hh in range(hkv):
                    idx = keep[j, 0, hh, :length].nonzero()[:, 0]
                    assert idx.numel() == budget
                    ids = hw[j, 0, hh, idx]
                    old = torch.cat([idx.view(1, -1), ids.T])
                    new = torch.cat([torch.arange(budget).view(1, -1), ids.T])
                    raw = _rotate(vlm, key[j, 0, hh, idx], old, inverse=True)
                    nk[j, 0, hh] = _rotate(vlm, raw, new)
                    nv[j, 0, hh] = value[j, 0, hh, idx]
                    nhw[j, 0, hh] = ids
            hw = nhw
            for j, li in enumerate(full):
                cache.layers[li].keys, cache.layers[li].values = nk[j].clone(), nv[j].clone()
        start = max(cache.get_seq_length(), P + max(GH, GW))
        h = run(vlm.embed_tokens(pr.question_ids),
                torch.arange(start, start + Q).view(1, 1, -1).expand(3, 1, -1))[:, -1:]
        logits = vlm.model.lm_head(h[:, -1]).float()
        key = torch.stack([cache.layers[li].keys for li in full]).clone()
        value = torch.stack([cache.layers[li].values for li in full]).clone()
        states = [(la.conv_states[0].clone(), la.recurrent_states[0].clone())
                  for i, la in enumerate(cache.layers) if types[i] == "linear_attention"]
        tokens = []
        for step in range(max_new):
            tok = vlm.model.lm_head(h[:, -1]).float().argmax(-1)
            tokens.append(tok)
            if step + 1 < max_new:
                h = run(vlm.embed_tokens(tok.view(1, 1)),
                        torch.full((3, 1, 1), start + Q + step, dtype=torch.int64))
    return logits, (torch.stack(tokens, 1) if tokens else None), key, value, states, seen


def _stream_ref(vlm, pr, budget, window, recent, max_new=0):
    out = get_strategy("full").visual_embeds(vlm, pr)
    seg = _segment(vlm, pr, out)
    return seg, _reference(vlm, pr, seg, budget, _unit_windows(seg[4], window, recent),
                           max_new)


def _spy_compactions(monkeypatch):
    """Record every compaction's keep mask and the linear-layer states around it."""
    log = []
    orig = BudgetedKVCache.compact

    def compact(self, **kw):
        self.record = True
        before = [(la.conv_states[0].clone(), la.recurrent_states[0].clone())
                  for la in self.state_layers]
        n = self.get_seq_length()
        v0 = self.value[:, :, :, :n].clone()
        new = orig(self, **kw)
        after = [(la.conv_states[0].clone(), la.recurrent_states[0].clone())
                 for la in self.state_layers]
        log.append((n, new, kw.get("recent", 0), self.last_result, before, after,
                    v0, self.value[:, :, :, :new].clone()))
        return new

    monkeypatch.setattr(BudgetedKVCache, "compact", compact)
    return log


# --------------------------------------------------------------------------- stream
def test_timestamps_enter_as_in_the_processor_prompt(model):
    """The segment ``stream`` feeds (the family's layout of ``full``'s tokens) is the
    processor's prompt: each unit's own timestamp before its tokens (no misalignment)."""
    vlm = LongVideoVLM(model, "stream")
    pr = _prompt(9, ids=text_ids)  # 5 units, the last padded
    out = get_strategy("full").visual_embeds(vlm, pr)
    layout = vlm.family.visual_layout(out.blocks, out[0].shape[1], text_ids=text_ids)
    seq = []
    for pc in layout.pieces:
        seq += [VIDEO] * (pc[1] - pc[0]) if isinstance(pc, tuple) else pc.tolist()
    ids, _ = reference_prompt(pr, [(u, [(GH, GW)]) for u in range(5)], num_frames=9)
    assert pr.prefix_ids[0].tolist() + seq + pr.question_ids[0].tolist() == ids[0].tolist()


def test_budget_covering_the_stream_equals_rule_reference(model):
    """Nothing evicted: ``stream`` (windows of 1 unit, prefill chunks of 4 that cut units,
    DeepStack rows per chunk, Qwen3.5's linear states carried across every chunk) == ONE
    forward of the whole sequence with the rule's ids, every row kept."""
    pr = _prompt(8)  # 4 units
    vlm = LongVideoVLM(model, "stream", kv_budget=200, window_frames=1, recent_frames=1,
                       vision_chunk_frames=2, prefill_chunk_tokens=4)
    logits = vlm.first_token(pr)
    assert vlm.strategy.cache.compactions == 0
    tokens = vlm.generate(pr, MAX_NEW)
    out = get_strategy("full").visual_embeds(vlm, pr)
    seg = _segment(vlm, pr, out)
    s = seg[0].shape[1]
    ref_logits, ref_tokens, *_ = _reference(vlm, pr, seg, 10 ** 6, [(s, 0)], MAX_NEW)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    assert vlm.last_prefill.llm_tokens == P + s + Q


def test_deepstack_rows_are_added_window_by_window():
    """Qwen3-VL (Qwen3.5 has no DeepStack): every visual row's DeepStack levels reach the
    decoder once, in order, in the prefill chunk that carries the row, with the mask
    marking exactly that chunk's visual rows (the wrapper's chunked-prefill rule); the
    whole-sequence equality above then covers their values."""
    model = _build("qwen3_vl")
    assert len(model.config.vision_config.deepstack_visual_indexes) == 2
    pr = _prompt(8)
    vlm = LongVideoVLM(model, "stream", kv_budget=30, window_frames=1, recent_frames=1,
                       prefill_chunk_tokens=4)
    fam = vlm.family
    calls = []
    orig = fam.decoder_kwargs

    def spy(mask, extra):
        calls.append((mask.clone(), extra.clone()))
        return orig(mask, extra)

    fam.decoder_kwargs = spy
    try:
        vlm.first_token(pr)
    finally:
        del fam.decoder_kwargs
    out = get_strategy("full").visual_embeds(vlm, pr)
    seg = _segment(vlm, pr, out)
    assert all(int(m.sum()) == e.shape[0] and m.shape[1] <= 4 for m, e in calls)
    torch.testing.assert_close(torch.cat([e for _, e in calls]), seg[1], rtol=0, atol=0)
    mask = torch.cat([m[0] for m, _ in calls])
    assert int(mask.sum()) == int(seg[2].sum())


@pytest.mark.parametrize("frames,budget,window,recent", [
    (12, 40, 1, 1), (14, 50, 2, 1), (10, 22, 1, 0)])
def test_smaller_budget_equals_rule_reference(model, monkeypatch, frames, budget, window,
                                              recent):
    """Compactions: the kept K/V rows (re-rotated interleaved / partial-rotary keys),
    the linear-layer states and the answer == the whole-stream reference; only the
    full-attention layers are compacted, the linear states are never touched by it."""
    log = _spy_compactions(monkeypatch)
    pr = _prompt(frames, seed=budget)
    cfg = StreamConfig(kv_budget=budget, window_frames=window, recent_frames=recent)
    # one decoder call per window, as the reference makes: <|vision_start|> / <|vision_end|>
    # repeat in every unit, and on the first attention layer a repeated token has the
    # same value row, i.e. an exact VaN tie that only the earlier-row rule decides; a
    # different chunking could change the last bit of one copy and flip it (chunks that
    # cut units are covered by the budget-covering test)
    vlm = LongVideoVLM(model, get_strategy("stream", cfg), vision_chunk_frames=2,
                       prefill_chunk_tokens=128)
    logits = vlm.first_token(pr)
    cache = vlm.strategy.cache
    assert cache.compactions >= 2
    assert cache.mrope_interleaved
    tc = model.config.text_config
    types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    assert cache.key.shape[0] == sum(t != "linear_attention" for t in types)  # KV: full only
    _, (ref_logits, _, key, value, states, _) = _stream_ref(vlm, pr, budget, window, recent)
    m = cache.get_seq_length()
    assert m == budget + Q == key.shape[3]
    torch.testing.assert_close(cache.key[:, :, :, :m], key, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(cache.value[:, :, :, :m], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (conv, rec), (rconv, rrec) in zip(
            [(la.conv_states[0], la.recurrent_states[0]) for la in cache.state_layers],
            states, strict=True):
        torch.testing.assert_close(conv, rconv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec, rrec, rtol=1e-5, atol=1e-5)
    for _, _, _, _, before, after, _, _ in log:  # a compaction never touches a linear state
        for (c0, r0), (c1, r1) in zip(before, after, strict=True):
            assert torch.equal(c0, c1) and torch.equal(r0, r1)


def test_attention_mass_score_equals_reference(model):
    """attention_mass=True: rows scored by the mass the window's queries give each key
    (full-attention layers only on Qwen3.5) == the reference with transformers' eager
    attention probabilities as scores."""
    pr = _prompt(10, seed=5)
    cfg = StreamConfig(kv_budget=36, window_frames=1, recent_frames=1, attention_mass=True)
    vlm = LongVideoVLM(model, get_strategy("stream", cfg), prefill_chunk_tokens=128)
    logits = vlm.first_token(pr)
    cache = vlm.strategy.cache
    assert cache.compactions >= 2
    lm = vlm.language_model
    seg = _segment(vlm, pr, get_strategy("full").visual_embeds(vlm, pr))
    old = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        ref_logits, _, key, value, _, _ = _reference(
            vlm, pr, seg, 36, _unit_windows(seg[4], 1, 1), mass=True)
    finally:
        lm.set_attn_implementation(old)
    m = cache.get_seq_length()
    torch.testing.assert_close(cache.key[:, :, :, :m], key, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(cache.value[:, :, :, :m], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_timestamp_rows_are_rows_kept_in_time_order(model, monkeypatch):
    """What the docstring states about timestamp rows: the newest ``recent_frames`` units
    are protected whole (timestamp text and vision start/end included); every other row,
    timestamp rows included, is kept or dropped per layer and KV head by its score alone;
    kept rows keep their time order (so a kept timestamp row stays right before whatever
    is kept of its own unit)."""
    log = _spy_compactions(monkeypatch)
    pr = _prompt(12, seed=7)
    vlm = LongVideoVLM(model, "stream", kv_budget=30, window_frames=1, recent_frames=1)
    vlm.first_token(pr)
    seg = _segment(vlm, pr, get_strategy("full").visual_embeds(vlm, pr))
    vis = seg[2]
    windows = _unit_windows(seg[4], 1, 1)
    assert len(log) == len(windows)
    dropped_text = compactions = 0
    for (n, new, rec, res, _, _, v0, v1), (_, unit_rows) in zip(log, windows, strict=True):
        assert rec == unit_rows  # the newest unit, timestamp text and vision start/end included
        if n <= new:
            continue
        compactions += 1
        keep = res.keep[..., :n]
        assert keep[..., :P].all() and keep[..., n - rec : n].all()
        assert (keep.sum(-1) == new).all()
        for li, hh in torch.cartesian_prod(torch.arange(keep.shape[0]),
                                           torch.arange(keep.shape[2])).tolist():
            idx = keep[li, 0, hh].nonzero()[:, 0]
            assert torch.equal(v1[li, 0, hh], v0[li, 0, hh, idx])  # time order kept
        # VaN alone decides the middle, text rows included: no dropped row outranks a kept one
        score = res.score[1][..., P : n - rec]
        kept_mid = keep[..., P : n - rec]
        lo = torch.where(kept_mid, score, torch.inf).amin(-1)
        hi = torch.where(~kept_mid, score, -torch.inf).amax(-1)
        assert (hi <= lo).all()
        # which cache rows are text is only known for the first compaction (rows = stream)
        if compactions == 1:
            text_mid = ~vis[: n - P - rec]
            dropped_text += int((~kept_mid & text_mid).sum())
            assert (kept_mid & text_mid).any()  # some timestamp rows survive, some do not
    assert compactions >= 3 and dropped_text > 0


def test_positions_stay_bounded_whatever_the_length(model):
    """Every id fed to the decoder stays below a bound that does not depend on the frame
    count: the largest id is the same at 8 and 18 frames (timestamps of one digit before
    the point in both: the window's rows, and so the capacity, only grow by one row per
    unit for every 10x in video length), and the logical (``full``) ids of the longer
    video pass it."""
    budget = 30
    maxima, sizes = [], []
    for frames in (8, 18):
        pr = _prompt(frames, seed=1)
        vlm = LongVideoVLM(model, "stream", kv_budget=budget, window_frames=1,
                           recent_frames=1)
        seen = []
        orig = vlm.run_llm

        def run(x, cache, position_ids=None, _orig=orig, _seen=seen, **kw):
            assert position_ids is not None
            _seen.append(position_ids)
            return _orig(x, cache, position_ids, **kw)

        vlm.run_llm = run
        vlm.generate(pr, MAX_NEW)
        cache = vlm.strategy.cache
        ids = torch.cat([s.reshape(3, -1) for s in seen], 1)
        bound = max(cache.capacity, P + max(GH, GW)) + Q + MAX_NEW
        assert ids.min() >= 0 and ids.max() < bound
        maxima.append(int(ids.max()))
        sizes.append((cache.capacity, cache.kv_bytes(), cache.state_bytes()))
        if frames == 18:
            out = get_strategy("full").visual_embeds(vlm, pr)
            layout = vlm.family.visual_layout(out.blocks, out[0].shape[1],
                                              text_ids=pr.text_ids)
            plan = vlm.family.position_plan(P, out.blocks, out[0].shape[1], Q, layout=layout)
            assert int(plan.decode(0)[0]) >= bound
    assert maxima[0] == maxima[1]
    assert sizes[0] == sizes[1]  # flat memory: the same K/V rows and recurrent states


def test_stale_rows_poisoned_with_nan_are_never_seen(model):
    pr = _prompt(12, seed=3)
    vlm = LongVideoVLM(model, "stream", kv_budget=30, window_frames=1, recent_frames=1)
    check_stale_rows_never_seen(vlm, pr, MAX_NEW)


def test_tar_is_refused_on_timestamped_units(model):
    """Units framed with timestamp text of varying length are not fixed-size frames: an
    explicit tar_ratio > 0 is a clear error; the default (None) is VaN there."""
    pr = _prompt(6)
    vlm = LongVideoVLM(model, "stream", kv_budget=30, window_frames=1, recent_frames=1,
                       tar_ratio=0.5)
    with pytest.raises(ValueError, match=r"tar_ratio=0.5 .*timestamp text"):
        vlm.first_token(pr)
    ok = LongVideoVLM(model, "stream", kv_budget=30, window_frames=1, recent_frames=1,
                      tar_ratio=0.0)
    assert torch.isfinite(ok.first_token(pr)).all()


def test_budget_past_max_position_embeddings_is_refused():
    model = _build("qwen3_vl")
    old = model.config.text_config.max_position_embeddings
    model.config.text_config.max_position_embeddings = 40
    try:
        vlm = LongVideoVLM(model, "stream", kv_budget=60, window_frames=1, recent_frames=1)
        with pytest.raises(ValueError, match="max_position_embeddings=40"):
            vlm.first_token(_prompt(6))
    finally:
        model.config.text_config.max_position_embeddings = old


def test_ids_bounded_for_100000_frames_simulated():
    """Simulated, no model run: the rule's ids for 100,000 frames (50,000 units of a
    448 x 448 Qwen3-VL-8B grid: 14 x 14 tokens + timestamp text), windows of 8 units, a
    6,144-row budget: every id stays below ``max(capacity, P + 14) + tail`` and inside
    ``max_position_embeddings``, while ``full``'s logical ids pass 262,144."""
    from lvlm_fast.models.families import TokenBlocks

    model = _build("qwen3_vl")
    vlm = LongVideoVLM(model, "stream")
    fam = vlm.family
    units, g, budget, wf = 50_000, 14, 6144, 8
    blocks = TokenBlocks.grid(units, g, g, frame_hw=(448, 448), fps=2.0, num_frames=2 * units)
    n = units * g * g
    layout = fam.visual_layout(blocks, n, text_ids=text_ids)
    plan = fam.position_plan(P, blocks, n, Q, layout=layout)
    assert int(plan.decode(0)[0]) > 262_144  # the logical rule leaves the trained range
    lengths = [pc[1] - pc[0] if isinstance(pc, tuple) else pc.shape[0] for pc in layout.pieces]
    frame_len = [sum(lengths[i : i + 3]) for i in range(0, len(lengths), 3)]
    win = max(sum(frame_len[i : i + wf]) for i in range(0, units, wf))
    tail = Q + MAX_NEW
    capacity = budget + max(win, tail)
    bound = max(capacity, P + g) + tail
    top = int(plan.stream_chunk(0, P, 0).max())
    slot, off = P, P
    for i in range(0, units, wf):
        rows = sum(frame_len[i : i + wf])
        ids = plan.stream_chunk(off, off + rows, slot)
        top = max(top, int(ids.max()))
        assert int(ids[0].min()) == slot  # temporal ids are the slots
        slot, off = min(slot + rows, budget), off + rows
    after = plan.stream_tail(slot)
    top = max(top, int(after.chunk(0, Q).max()), int(after.decode(MAX_NEW - 1)[0]))
    assert top < bound <= 262_144
    # independent of the frame count: the budget, one window of 8 units (196 tokens and a
    # timestamp of at most 7 digits each) and the tail
    assert bound <= budget + wf * (g * g + 20) + tail


# --------------------------------------------------------------------------- compositions
def _composed_ref(vlm, pr, name, budget, chunk, kw):
    out = get_strategy(name, **kw).visual_embeds(vlm, pr)
    seg = _segment(vlm, pr, out)
    s = seg[0].shape[1]
    windows = [(min(a + chunk, s), 0) for a in range(0, s, chunk)]
    return _reference(vlm, pr, seg, budget, windows)


@pytest.mark.parametrize("name,kw", [
    ("slowfast", dict(slow_kernel=(1, 1), fast_grid=(1, 1))), ("llamavid", {}),
    ("vilamp", {})])
def test_kv_budget_composition_equals_rule_reference(model, name, kw):
    """A reduction + kv_budget (VaN only, windows of prefill_chunk_tokens over the
    segment with its timestamp text): the strategy's own tokens and layout through the
    same rule == the reference on them."""
    pr = _prompt(16, seed=4)
    budget, chunk = 14, 6
    vlm = LongVideoVLM(model, name, kv_budget=budget, prefill_chunk_tokens=chunk, **kw)
    logits = vlm.first_token(pr)
    cache = vlm.last_prefill.cache
    assert isinstance(cache, BudgetedKVCache) and cache.compactions >= 1
    ref_logits, _, key, value, _, _ = _composed_ref(vlm, pr, name, budget, chunk, kw)
    m = cache.get_seq_length()
    torch.testing.assert_close(cache.key[:, :, :, :m], key, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(cache.value[:, :, :, :m], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
