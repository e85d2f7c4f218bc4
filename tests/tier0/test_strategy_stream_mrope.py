"""`stream` on an M-RoPE family (issue 12, tiny Qwen2.5-VL): the bounded position rule.

Rule (``lvlm_fast.models.strategies.stream`` module doc): a cached row's temporal id is
its slot in the budgeted buffer, its height/width ids are the family's (``P + y``,
``P + x`` inside its block; prefix text: its index on every axis); the question starts at
``max(cached rows, P + max(h, w))`` on all axes and the answer continues from it.

Checked against a plain-PyTorch reference written here: transformers' decoder on a
DynamicCache with those ids built by hand, window by window; after each window the kept
set from the reference ``kv_compact`` and every kept key re-rotated with transformers' own
Qwen2.5-VL rotary embedding (inverse rotation at its old (slot, h, w), rotation at the new
one): an independent check of the op's blocked ``mrope_section`` layout.

With nothing evicted the rule does NOT reduce to ``full`` (``full`` gives every token of a
unit one temporal id, the rule gives slots), so the budget-covers-the-stream case is
compared with the rule's reference, not with ``full``."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from family_helpers import check_stale_rows_never_seen  # tests/tier0 is on sys.path
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

from lvlm_fast.models import LongVideoVLM, get_config, get_strategy
from lvlm_fast.models.strategies.base import VideoPrompt
from lvlm_fast.models.strategies.stream import StreamConfig
from lvlm_fast.reference.kv_compact import kv_compact as ref_compact
from lvlm_fast.stream_cache import BudgetedKVCache

START, END = 252, 253
H, W = 56, 84  # 2 x 3 merged tokens per unit (two frames)
GH, GW = 2, 3
PER = GH * GW
SECTION = [8, 12, 12]
MAX_NEW = 4


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(get_config("tiny-qwen2.5-vl")).eval()


def _prompt(frames: int, seed: int = 0) -> VideoPrompt:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.cat([torch.randint(3, 250, (1, 2), generator=g), torch.tensor([[START]])], 1)
    question = torch.cat([torch.tensor([[END]]), torch.randint(3, 250, (1, 4), generator=g)], 1)
    return VideoPrompt(torch.randn(frames, 3, H, W, generator=g), prefix, question, fps=2.0)


def _rotate(lm, k: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """k (R, D) rotated by transformers' M-RoPE at ids pos (3, R) (inverse: undone)."""
    cos, sin = lm.rotary_emb(k[None], pos[:, None, :])
    cos, sin = cos[0].float(), sin[0].float()
    kf = k.float()
    out = kf * cos - rotate_half(kf) * sin if inverse else kf * cos + rotate_half(kf) * sin
    return out.to(k.dtype)


def _reference(vlm, pr, budget, window_units, recent_units, tar, max_new=0):
    """The rule in plain PyTorch (module doc) on ``full``'s tokens. Returns (first logits,
    tokens, K, V, all position ids used)."""
    visual = get_strategy("full").visual_embeds(vlm, pr)[0]
    p, n = pr.prefix_ids.shape[1], visual.shape[1]
    rec = recent_units * PER
    primary = math.floor(tar * (budget - p - rec) + 0.5)
    j = torch.arange(n)
    hw_vis = torch.stack([p + (j % PER) // GW, p + j % GW])  # (2, n): a 2 x 3 grid per unit
    return _reference_tokens(vlm, pr, visual, hw_vis, budget, window_units * PER, rec, PER,
                             primary, max_new)


def _reference_tokens(vlm, pr, visual, hw_vis, budget, win, rec, tpf, primary, max_new):
    """``visual`` (1, N, hidden) whose rows have the (h, w) ids ``hw_vis`` (2, N), windows
    of ``win`` rows, ``rec`` protected recent rows, TaR on ``tpf`` rows per frame (0: none)
    for ``primary`` slots."""
    lm = vlm.language_model
    p, n, q = pr.prefix_ids.shape[1], visual.shape[1], pr.question_ids.shape[1]
    seen = []

    def run(x, cache, pos):
        seen.append(pos)
        return vlm.run_llm(x, cache, pos)

    cache = DynamicCache()
    run(vlm.embed_tokens(pr.prefix_ids), cache, torch.arange(p).view(1, 1, -1).expand(3, 1, -1))
    # (h, w) ids of every cached row, per layer / KV head (rows differ per head after a
    # compaction)
    layers = len(lm.layers)
    hkv = lm.config.num_key_value_heads
    hw = torch.arange(p).view(1, 1, 1, -1).expand(layers, 1, hkv, -1)
    hw = torch.stack([hw, hw], -1)  # (L, 1, Hkv, rows, 2)
    for lo in range(0, n, win):
        hi = min(lo + win, n)
        slot = cache.get_seq_length()
        pos = torch.cat([torch.arange(slot, slot + hi - lo).view(1, -1), hw_vis[:, lo:hi]])
        run(visual[:, lo:hi], cache, pos.view(3, 1, -1))
        hw = torch.cat([hw, hw_vis[:, lo:hi].T.view(1, 1, 1, -1, 2)
                        .expand(layers, 1, hkv, -1, 2)], 3)
        length = cache.get_seq_length()
        if length <= budget:
            continue
        key = torch.stack([la.keys for la in cache.layers])
        value = torch.stack([la.values for la in cache.layers])
        _, keep, _ = ref_compact(key.clone(), value.clone(), length,
                                 lm.rotary_emb.inv_freq, budget=budget, prefix=p, recent=rec,
                                 tokens_per_frame=tpf, primary_slots=primary,
                                 mrope_section=SECTION)
        nk = torch.empty_like(key[:, :, :, :budget])
        nv = torch.empty_like(value[:, :, :, :budget])
        nhw = torch.empty_like(hw[:, :, :, :budget])
        for li in range(layers):
            for h in range(hkv):
                idx = keep[li, 0, h, :length].nonzero()[:, 0]
                assert idx.numel() == budget
                rows_hw = hw[li, 0, h, idx]  # (budget, 2)
                old = torch.cat([idx.view(1, -1), rows_hw.T])
                new = torch.cat([torch.arange(budget).view(1, -1), rows_hw.T])
                raw = _rotate(lm, key[li, 0, h, idx], old, inverse=True)
                nk[li, 0, h] = _rotate(lm, raw, new)
                nv[li, 0, h] = value[li, 0, h, idx]
                nhw[li, 0, h] = rows_hw
        hw = nhw
        cache = DynamicCache()
        for li in range(layers):
            cache.update(nk[li].clone(), nv[li].clone(), li)
    start = max(cache.get_seq_length(), p + max(GH, GW))
    h = run(vlm.embed_tokens(pr.question_ids), cache,
            torch.arange(start, start + q).view(1, 1, -1).expand(3, 1, -1))[:, -1:]
    logits = vlm.model.lm_head(h[:, -1]).float()
    key = torch.stack([la.keys for la in cache.layers]).clone()
    value = torch.stack([la.values for la in cache.layers]).clone()
    tokens = []
    for step in range(max_new):
        tok = vlm.model.lm_head(h[:, -1]).float().argmax(-1)
        tokens.append(tok)
        if step + 1 < max_new:
            h = run(vlm.embed_tokens(tok.view(1, 1)), cache,
                    torch.full((3, 1, 1), start + q + step, dtype=torch.int64))
    return logits, (torch.stack(tokens, 1) if tokens else None), key, value, seen


def _spy_positions(vlm):
    seen = []
    orig = vlm.run_llm

    def run(x, cache, position_ids=None, **kw):
        assert position_ids is not None  # an M-RoPE decoder never gets default ids here
        seen.append(position_ids)
        return orig(x, cache, position_ids, **kw)

    vlm.run_llm = run
    return seen


def test_budget_covering_the_stream_equals_rule_reference(qwen):
    pr = _prompt(8)  # 4 units x 6 tokens
    vlm = LongVideoVLM(qwen, "stream", kv_budget=3 + 4 * PER, window_frames=1,
                       recent_frames=1, vision_chunk_frames=2, prefill_chunk_tokens=4)
    logits = vlm.first_token(pr)
    assert vlm.strategy.cache.compactions == 0
    tokens = vlm.generate(pr, MAX_NEW)
    ref_logits, ref_tokens, *_ = _reference(vlm, pr, 3 + 4 * PER, 1, 1, 0.5, MAX_NEW)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("frames,budget,window,recent,tar", [
    (12, 15, 1, 1, 0.5), (12, 12, 1, 1, 1.0), (16, 21, 2, 1, 0.5), (10, 9, 1, 1, 0.0)])
def test_smaller_budget_equals_rule_reference(qwen, frames, budget, window, recent, tar):
    pr = _prompt(frames, seed=budget)
    cfg = StreamConfig(kv_budget=budget, window_frames=window, recent_frames=recent,
                       tar_ratio=tar)
    vlm = LongVideoVLM(qwen, get_strategy("stream", cfg), vision_chunk_frames=2,
                       prefill_chunk_tokens=5)
    logits = vlm.first_token(pr)
    cache = vlm.strategy.cache
    assert cache.compactions >= 1
    assert cache.mrope_section == SECTION
    ref_logits, _, key, value, _ = _reference(vlm, pr, budget, window, recent, tar)
    m = cache.get_seq_length()
    assert m == budget + pr.question_ids.shape[1] == key.shape[3]
    torch.testing.assert_close(cache.key[:, :, :, :m], key, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.value[:, :, :, :m], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [
    ("slowfast", dict(slow_kernel=(1, 1), fast_grid=(1, 1))), ("llamavid", {}),
    ("vilamp", {})])
def test_kv_budget_composition_equals_rule_reference(qwen, name, kw):
    """A reduction + kv_budget (VaN only, windows of prefill_chunk_tokens): the strategy's
    own tokens and TokenBlocks through the same rule == the reference on those tokens."""
    pr = _prompt(16, seed=4)
    budget, chunk = 10, 4
    vlm = LongVideoVLM(qwen, name, kv_budget=budget, prefill_chunk_tokens=chunk, **kw)
    logits = vlm.first_token(pr)
    cache = vlm.last_prefill.cache
    assert isinstance(cache, BudgetedKVCache) and cache.compactions >= 1
    out = get_strategy(name, **kw).visual_embeds(vlm, pr)
    _, y, x = out.blocks.coords(0, out[0].shape[1])
    p = pr.prefix_ids.shape[1]
    ref_logits, _, key, value, _ = _reference_tokens(
        vlm, pr, out[0], torch.stack([p + y, p + x]), budget, chunk, 0, 0, 0, 0)
    m = cache.get_seq_length()
    torch.testing.assert_close(cache.key[:, :, :, :m], key, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.value[:, :, :, :m], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_positions_stay_bounded_whatever_the_length(qwen):
    """Every id fed to the decoder (prefix, windows, question, answer) stays below a bound
    that does not depend on the frame count; the largest id is the same at 8 and 40
    frames, while the family's own plan grows with the video."""
    budget, q = 15, 5
    maxima = []
    for frames in (8, 40):
        pr = _prompt(frames, seed=1)
        vlm = LongVideoVLM(qwen, "stream", kv_budget=budget, window_frames=1, recent_frames=1)
        seen = _spy_positions(vlm)
        vlm.generate(pr, MAX_NEW)
        cache = vlm.strategy.cache
        bound = max(cache.capacity, 3 + max(GH, GW) + q + MAX_NEW)
        ids = torch.cat([s.reshape(3, -1) for s in seen], 1)
        assert ids.min() >= 0 and ids.max() < bound
        # temporal ids of the windows are slots: never at or past the buffer capacity
        assert cache.capacity == budget + max(PER, q + MAX_NEW - 1)
        maxima.append(int(ids.max()))
        _, _, _, _, ref_seen = _reference(vlm, pr, budget, 1, 1, 0.5, MAX_NEW)
        assert len(ref_seen) <= len(seen)
        plan = vlm.family.position_plan(3, get_strategy("full").visual_embeds(vlm, pr).blocks,
                                        frames // 2 * PER, q)
        if frames == 40:  # the logical rule would have passed the bound
            assert int(plan.decode(MAX_NEW)[0]) >= bound
    assert maxima[0] == maxima[1]


def test_stale_rows_poisoned_with_nan_are_never_seen(qwen):
    pr = _prompt(14, seed=3)
    kw = dict(kv_budget=15, window_frames=1, recent_frames=1)
    vlm = LongVideoVLM(qwen, "stream", **kw)
    check_stale_rows_never_seen(vlm, pr, MAX_NEW)
